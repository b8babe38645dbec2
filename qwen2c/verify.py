"""``qwen2c verify``: parity of an engine against transformers, rebuilt from the engine's own files.

The engine directory is also a transformers checkpoint (config.json + model.safetensors), so the
reference model is loaded from exactly the weights the engine runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import load_reference, resolve_model
from .parity import DEFAULT_DECODE_STEPS, check_parity
from .runtime import load


def verify(directory: str | Path, decode_steps: int = DEFAULT_DECODE_STEPS) -> dict[str, Any]:
    engine = load(directory)
    _, reference = load_reference(resolve_model(str(directory)), engine.manifest["dtype"], copies=2.2)
    return check_parity(engine, reference, engine.manifest["dtype"], decode_steps=decode_steps)
