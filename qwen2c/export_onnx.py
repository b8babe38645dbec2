"""``qwen2c export-onnx``: the fused ONNX of a model, for users who bring their own runtime.

The same export the onnxruntime and tensorrt backends build from (``targets/onnx/``): the model is
traced, rewritten by the graph passes (each checked in PyTorch), given its KV cache as past/present
inputs and outputs, and exported with each fused op as one node. The folder gets ``model.onnx``
(and ``model.onnx.data`` over 2 GB), the model's ``config.json`` and ``onnx.json`` describing the
graph's inputs, outputs and nodes. Nothing is left at the destination unless the export completes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from . import engine_dir
from .errors import ConfigError

log = logging.getLogger(__name__)

MARKER = "onnx.json"
MODEL = "model.onnx"


def export_onnx_dir(model: str, out: str | Path, dtype: str = "float32", max_context: int | None = None,
                    op_set: str = "onnxruntime", force: bool = False,
                    progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Export ``model`` (checkpoint directory or preset) into the folder ``out``; return ``onnx.json``.

    As ``qwen2c build``: arguments checked and the destination proven writable before any slow
    step; staged beside ``out`` and published whole; Ctrl-C leaves nothing behind (``interrupts.py``)."""
    from qwen2c.graphs.export import export_model
    from qwen2c.graphs.pipeline import run_passes
    from qwen2c.targets.onnx.export import export_onnx
    from qwen2c.targets.onnx.external_data import save
    from qwen2c.targets.onnx.requirements import require
    from qwen2c.targets.onnx.translations import OP_SETS

    from . import args
    from .builder import SUPPORTED_DTYPES
    from .checkpoint import load_reference, resolve_model
    from .interrupts import interrupt_guard
    from .model_config import context_limit

    require("onnx", "onnxscript")
    out = Path(out)
    if dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: one of {', '.join(SUPPORTED_DTYPES)}.")
    if op_set not in OP_SETS:
        raise ConfigError(f"--ops {op_set!r}: one of {', '.join(OP_SETS)}.")
    with interrupt_guard() as guard:
        engine_dir.check_destination(out, force, MARKER, "ONNX export")
        source = resolve_model(model)
        max_context = args.max_context(max_context, context_limit(source.config))
        with engine_dir.Staging(out) as staging:
            guard.checkpoint()
            progress(f"loading {source.name} ({dtype})")
            config, reference = load_reference(source, dtype, copies=1.2)
            guard.checkpoint()
            progress("exporting with torch.export and running the graph passes")
            program = export_model(reference, max_context)
            reports = run_passes(program, config, dtype)
            guard.checkpoint()
            progress(f"exporting to ONNX ({op_set} ops)")
            exported = export_onnx(program, config, dtype, max_context, op_set)
            guard.checkpoint()
            try:
                files = save(exported.model, staging.path, MODEL)
                (staging.path / engine_dir.CONFIG).write_text(json.dumps(dict(source.config), indent=2) + "\n")
                info = {**exported.io_manifest(), "dtype": dtype, "max_context": max_context, "files": files,
                        "nodes": exported.op_counts(), "passes": [r.to_json() for r in reports]}
                (staging.path / MARKER).write_text(json.dumps(info, indent=2) + "\n")
            except OSError as e:
                raise engine_dir.output_error(out, e) or e from None
            with guard.deferred():  # published whole, or (interrupted meanwhile) not at all
                guard.checkpoint()
                engine_dir.publish(staging.path, out, force, MARKER, "ONNX export", abort=lambda: guard.requested)
                staging.path = None
    return info
