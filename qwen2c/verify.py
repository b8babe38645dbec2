"""``qwen2c verify``: parity of an engine against transformers, rebuilt from the engine's own files.

The engine directory is also a transformers checkpoint (config.json + model.safetensors), so the
reference model is loaded from exactly the weights the engine runs, on the engine's device (a
CUDA engine is checked against transformers on the same GPU). The result is recorded in the
manifest's ``parity`` field: an engine built where it could not run ("not run (no cuda device)")
gets its parity filled in where it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import args, engine_dir
from .checkpoint import load_reference, resolve_model
from .parity import DEFAULT_DECODE_STEPS, check_parity
from .runtime import load

TORCH_DEVICES = {"cpu": "cpu", "cuda": "cuda", "rocm": "cuda"}  # PyTorch's ROCm build calls its GPUs "cuda"


def verify(directory: str | Path, decode_steps: int = DEFAULT_DECODE_STEPS, record: bool = True,
           trusted_keys=None) -> dict[str, Any]:
    engine = load(directory, trusted_keys=trusted_keys)
    decode_steps = args.decode_steps(decode_steps, engine.max_context)
    dtype = engine.manifest["dtype"]
    device = TORCH_DEVICES.get(engine.manifest["target"]["device"], "cpu")
    on_gpu = device != "cpu"
    # Host copies of the weights: the reference and (on the CPU) the engine.
    _, reference = load_reference(resolve_model(str(directory)), dtype, copies=1.2 if on_gpu else 2.2)
    report = check_parity(engine, reference.to(device), dtype, decode_steps=decode_steps)
    if record:
        engine_dir.record_in_manifest(Path(directory), "parity", report)
    return report
