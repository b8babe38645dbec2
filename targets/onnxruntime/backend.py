"""The ONNX Runtime backend behind qwen2c's backend interface (``targets/backends.py``).

Lowering is the fused ONNX export (``targets/onnx/``: GroupQueryAttention with past/present KV,
RMSNormalization, MoE) plus ONNX Runtime's own fusions (``ort_graph.py``); the engine directory gets
``model.onnx`` (and ``model.onnx.data`` over 2 GB), and opens with the CPU execution provider, or the
CUDA one for ``--target cuda`` where onnxruntime-gpu is installed.

As a TVM engine's library does, ``model.onnx`` carries the fingerprint of what it was built for
(``qwen2c/fingerprint.py``), in its metadata (``FINGERPRINT_KEY``); loading checks it against the
manifest and the weights file before anything runs, so an edited manifest (a larger
``max_context`` than the graph's RoPE tables hold, say) or a ``model.onnx`` from another build is
refused naming the field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from qwen2c.errors import BackendUnavailableError, ConfigError, EngineError

from ..onnx.requirements import require

MODEL = "model.onnx"
FINGERPRINT_KEY = "qwen2c.fingerprint"
DEVICES = ("cpu", "cuda")


@dataclasses.dataclass
class Lowered:
    exported: Any  # targets.onnx.export.Exported
    fusions: dict[str, int]
    device: str
    fingerprint: bytes


def prepare(spec, dtype: str, options: dict[str, Any]) -> None:
    require("onnx", "onnxscript", "onnxruntime", purpose="the onnxruntime backend")
    if spec.device not in DEVICES:
        raise ConfigError(f"--backend onnxruntime runs on {', '.join(DEVICES)}; target {spec.name} is {spec.device}.")
    if options.get("quantize") is not None:
        raise ConfigError(f"--quantize {options['quantize'].scheme} with --backend onnxruntime: quantized weights are a "
                          "TVM-engine format (qwen2c's own int8/int4 kernels); build with --backend tvm, or drop --quantize.")
    if options.get("moe_dispatch", "sparse") != "sparse":
        raise ConfigError("--moe-dispatch dense is a TVM baseline; the onnxruntime backend runs ONNX Runtime's "
                          "sparse MoE kernel (drop --moe-dispatch).")
    if spec.device == "cpu" and dtype == "bfloat16":
        raise ConfigError(
            "--dtype bfloat16 with --backend onnxruntime on a CPU: ONNX Runtime's CPU execution provider has no "
            "bfloat16 kernels for GroupQueryAttention, MoE or MatMul (its CUDA provider has); build float32 or "
            "float16 for the CPU."
        )


def lower(program, config, spec, dtype: str, max_context: int, options: dict[str, Any],
          progress: Callable[[str], None]) -> Lowered:
    from qwen2c.fingerprint import for_build
    from qwen2c.model_config import head_dim

    from ..onnx.export import export_onnx
    from .ort_graph import optimize_for_ort

    if spec.device == "cpu" and head_dim(config) % 16:
        raise ConfigError(
            f"head_dim {head_dim(config)} (hidden_size / num_attention_heads): ONNX Runtime's CPU GroupQueryAttention "
            "kernel takes head sizes that are multiples of 16 only; build this model with --backend tvm."
        )
    exported = export_onnx(program, config, dtype, max_context, op_set="onnxruntime")
    fusions = optimize_for_ort(exported.model)
    progress("    ONNX nodes: " + ", ".join(f"{k} {v}" for k, v in exported.op_counts().items()))
    progress("    ONNX Runtime fusions: " + ", ".join(f"{k} {v}x" for k, v in fusions.items()))
    return Lowered(exported, fusions, spec.device, for_build(spec, dtype, max_context, options))


def write(lowered: Lowered, staging: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import onnxscript

    from ..onnx.external_data import save
    from .runtime import PROVIDERS

    lowered.exported.model.metadata_props[FINGERPRINT_KEY] = lowered.fingerprint.decode()  # an onnx_ir model
    files = save(lowered.exported.model, staging, MODEL)
    return {
        "onnx": {**lowered.exported.io_manifest(), "files": files, "nodes": lowered.exported.op_counts(),
                 "ort_fusions": lowered.fusions},
        "execution_provider": PROVIDERS[lowered.device],
        "versions": {"onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
                     "onnxruntime": onnxruntime.__version__},
    }


def runs_here(spec) -> bool:
    if spec.device == "cpu":
        return True  # the ONNX file is the same for every CPU; ONNX Runtime picks its kernels at run time
    from .runtime import provider_available

    return provider_available(spec.device) and _cuda_device_present()


def _cuda_device_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def open_program(directory: Path, manifest: dict[str, Any]):
    require("onnxruntime", purpose="opening an onnxruntime engine")
    from qwen2c.fingerprint import check_embedded

    from ..onnx.external_data import check_locations
    from .runtime import OrtProgram

    io = manifest.get("onnx")
    if not isinstance(io, dict) or "inputs" not in io:
        raise EngineError(f"{directory}: the manifest has no 'onnx' section describing the graph; rebuild the engine.")
    path = directory / MODEL
    check_locations(path)
    try:
        program = OrtProgram(path, manifest["target"]["device"], io, manifest["dtype"])
    except BackendUnavailableError:
        raise
    except Exception as e:  # noqa: BLE001  (ONNX Runtime reports a bad model as its own exception types)
        raise EngineError(f"{path}: ONNX Runtime could not open the model ({e}).") from None
    embedded = program.session.get_modelmeta().custom_metadata_map.get(FINGERPRINT_KEY)
    check_embedded(directory, manifest, None if embedded is None else embedded.encode(), MODEL, "ONNX model")
    return program
