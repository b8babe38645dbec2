"""The optional packages the ONNX export and ONNX Runtime need: one clear error when they are missing."""

from __future__ import annotations

import importlib

from qwen2c.errors import BackendUnavailableError

EXTRA = "qwen2c[onnx]"


def require(*modules: str, purpose: str = "the ONNX export") -> None:
    """Import ``modules`` or raise BackendUnavailableError naming the missing one and the extra to install."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise BackendUnavailableError(
                f"{purpose} needs the Python package {name!r}, which is not installed; install it with "
                f"`pip install '{EXTRA}'` (onnx, onnxscript, onnxruntime). Nothing was written."
            ) from None
