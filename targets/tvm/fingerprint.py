"""Embed an engine's fingerprint (``qwen2c/fingerprint.py``) in its compiled library.

The fingerprint becomes a Relax function, ``qwen2c_fingerprint() -> uint8[n]``, returning the
canonical JSON bytes as a constant: it is compiled into the library with the model's own functions
(a library from another build carries that build's), runs no kernel, and the runtime reads it with
TVM's runtime alone (``targets/tvm/runtime.py``, ``read_fingerprint``).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .runtime import FINGERPRINT_FUNCTION


def add_fingerprint(mod: tvm.IRModule, data: bytes) -> tvm.IRModule:
    return add_constant_function(mod, FINGERPRINT_FUNCTION, data)


def add_constant_function(mod: tvm.IRModule, name: str, data: bytes) -> tvm.IRModule:
    """``mod`` with a Relax function ``name() -> uint8[n]`` returning ``data``: facts about the build
    that travel inside the library itself (read back by ``runtime.read_constant``)."""
    bb = relax.BlockBuilder(mod)
    with bb.function(name, [], pure=True):
        bb.emit_func_output(relax.const(np.frombuffer(data, dtype=np.uint8).copy(), "uint8"))
    return bb.finalize().with_attrs(mod.attrs) if mod.attrs is not None else bb.finalize()
