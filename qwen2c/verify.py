"""``qwen2c verify``: parity of an engine against transformers, rebuilt from the engine's own files.

The engine directory is also a transformers checkpoint (config.json + model.safetensors), so the
reference model is loaded from exactly the weights the engine runs, on the engine's device (a
CUDA engine is checked against transformers on the same GPU). The result is recorded in the
manifest's ``parity`` field: an engine built where it could not run ("not run (no cuda device)")
gets its parity filled in where it runs.

A quantized engine's weights are not the model's: its reference is the float checkpoint (or preset)
it was quantized from, named in the manifest (``quantization.float_reference``) or given, and its
report is what quantization costs next to llama.cpp's format (``quant_parity.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import args, engine_dir
from .checkpoint import load_reference, resolve_model
from .errors import ConfigError
from .parity import DEFAULT_DECODE_STEPS, check_parity, format_report
from .quant_parity import check_quantized_parity, format_quantized_report
from .quantization import from_manifest
from .runtime import load

TORCH_DEVICES = {"cpu": "cpu", "cuda": "cuda", "rocm": "cuda"}  # PyTorch's ROCm build calls its GPUs "cuda"


def verify(directory: str | Path, decode_steps: int = DEFAULT_DECODE_STEPS, record: bool = True,
           trusted_keys=None, reference: str | None = None) -> dict[str, Any]:
    engine = load(directory, trusted_keys=trusted_keys)
    decode_steps = args.decode_steps(decode_steps, engine.max_context)
    dtype = engine.manifest["dtype"]
    device = TORCH_DEVICES.get(engine.manifest["target"]["device"], "cpu")
    on_gpu = device != "cpu"
    quantized = engine.manifest.get("quantization")
    if quantized:
        source = _float_reference(directory, quantized, reference)
        # The float reference, and its copy of the quantized weights while llama.cpp's format runs.
        _, model = load_reference(source, dtype, copies=1.2 if on_gpu else 2.4)
        report = check_quantized_parity(engine, model.to(device), from_manifest(quantized), dtype)
        if record:
            engine_dir.record_in_manifest(Path(directory), "parity", report)
        return report
    if reference is not None:
        raise ConfigError(f"--reference: {directory} is not quantized; its reference is its own weights.")
    # Host copies of the weights: the reference and (on the CPU) the engine.
    _, reference = load_reference(resolve_model(str(directory)), dtype, copies=1.2 if on_gpu else 2.2)
    report = check_parity(engine, reference.to(device), dtype, decode_steps=decode_steps)
    if record:
        engine_dir.record_in_manifest(Path(directory), "parity", report)
    return report


def _float_reference(directory, record: dict[str, Any], given: str | None):
    where = given or record["float_reference"]
    try:
        source = resolve_model(where)
    except ConfigError as e:
        raise ConfigError(
            f"{directory} is quantized; its reference is the float model it was quantized from, {where!r}, which "
            f"cannot be loaded ({e}). Give it with --reference CHECKPOINT_DIR."
        ) from None
    built = engine_dir.read_manifest(Path(directory), verify=False)["model"]["config"]
    differ = [f for f in SHAPE_FIELDS if source.config.get(f) != built.get(f)]
    if differ:
        raise ConfigError(f"--reference {where}: not the model {directory} was built from ({differ[0]} is "
                          f"{source.config.get(differ[0])}, the engine's is {built.get(differ[0])}).")
    return source


SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_experts", "moe_intermediate_size")


def format_verify(report: dict[str, Any]) -> str:
    return format_quantized_report(report) if report.get("kind") == "quantized" else format_report(report)
