"""The TensorRT backend behind qwen2c's backend interface (``targets/backends.py``).

``qwen2c build --backend tensorrt --target cuda``: the fused ONNX export with standard ops
(``targets/onnx``, op set "standard"), checked node by node against TensorRT's supported operators
(``supported_ops.py``), then parsed and built by TensorRT with a prefill and a decode optimization
profile (``profiles.py``) and a reused timing cache (``engine_builder.py``). The engine directory
gets ``model.plan``; the manifest records TensorRT's version and the GPU's compute capability,
and loading refuses an engine built by another TensorRT or for another GPU (TensorRT engines are
specific to both).

What runs here, without TensorRT: everything up to the TensorRT calls (export, operator check,
profiles). What has never run here: ``engine_builder.build_engine`` and ``runtime.TrtProgram``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tempfile
from pathlib import Path
from typing import Any, Callable

from qwen2c.errors import BackendUnavailableError, ConfigError, EngineError, UnsupportedModelError

from ..onnx.requirements import require

PLAN = "model.plan"
MISSING = ("the tensorrt backend needs NVIDIA TensorRT's Python package (`import tensorrt`), which is not installed "
           "here; install TensorRT 10.15 or newer for your CUDA (`pip install tensorrt-cu13` where NVIDIA's "
           "download servers are reachable) and build again; nothing was written.")


@dataclasses.dataclass
class Lowered:
    plan: bytes
    io: dict[str, Any]
    profiles: list
    tensorrt: str
    compute_capability: str
    nodes: dict[str, int]


def tensorrt_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def prepare(spec, dtype: str, options: dict[str, Any]) -> None:
    if spec.device != "cuda":
        raise ConfigError(f"--backend tensorrt builds for NVIDIA GPUs (--target cuda); target {spec.name} is {spec.device}.")
    if options.get("quantize") is not None:
        raise ConfigError(f"--quantize {options['quantize'].scheme} with --backend tensorrt: quantized weights are a "
                          "TVM-engine format (qwen2c's own int8/int4 kernels); build with --backend tvm, or drop --quantize.")
    if options.get("moe_dispatch", "sparse") != "sparse":
        raise ConfigError("--moe-dispatch dense is a TVM baseline; drop it with --backend tensorrt.")
    if not tensorrt_installed():
        raise BackendUnavailableError(MISSING)
    require("onnx", "onnxscript", purpose="the tensorrt backend")


def tensorrt_onnx(program, config, dtype: str, max_context: int):
    """The export TensorRT will parse, after the operator check; raises naming every refused node."""
    from ..onnx.export import export_onnx
    from .supported_ops import unsupported_nodes

    exported = export_onnx(program, config, dtype, max_context, op_set="standard")
    problems = unsupported_nodes(exported.model)
    if problems:
        raise UnsupportedModelError(
            f"TensorRT cannot parse {len(problems)} node(s) of this model's ONNX export, so no engine was built:\n  "
            + "\n  ".join(problems)
        )
    return exported


def lower(program, config, spec, dtype: str, max_context: int, options: dict[str, Any],
          progress: Callable[[str], None]) -> Lowered:
    import tensorrt as trt

    from ..onnx.external_data import save
    from .engine_builder import build_engine, compute_capability, timing_cache_path
    from .profiles import optimization_profiles

    exported = tensorrt_onnx(program, config, dtype, max_context)
    io = exported.io_manifest()
    profiles = optimization_profiles(io, max_context)
    capability = compute_capability()
    with tempfile.TemporaryDirectory(prefix="qwen2c-trt-") as tmp:
        save(exported.model, Path(tmp), "model.onnx")
        plan = build_engine(Path(tmp) / "model.onnx", profiles, dtype, timing_cache_path(trt.__version__, capability),
                            progress)
    return Lowered(plan, io, profiles, trt.__version__, capability, exported.op_counts())


def write(lowered: Lowered, staging: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    (staging / PLAN).write_bytes(lowered.plan)
    return {
        "onnx": {**lowered.io, "nodes": lowered.nodes},
        "tensorrt": {"version": lowered.tensorrt, "compute_capability": lowered.compute_capability,
                     "profiles": [p.to_json() for p in lowered.profiles]},
        "versions": {"tensorrt": lowered.tensorrt},
    }


def runs_here(spec) -> bool:
    if not tensorrt_installed():
        return False
    from .engine_builder import compute_capability

    try:
        compute_capability()
    except BackendUnavailableError:
        return False
    return True


def open_program(directory: Path, manifest: dict[str, Any]):
    if not tensorrt_installed():
        raise BackendUnavailableError(MISSING.replace("build again; nothing was written.", "load the engine again."))
    import tensorrt as trt

    from .engine_builder import compute_capability
    from .runtime import TrtProgram

    # No fingerprint check here, unlike the tvm and onnxruntime engines (qwen2c/fingerprint.py): a
    # serialized plan has no metadata to carry one. What guards it: the TensorRT version and GPU
    # below, the plan's checksum in the manifest, and its optimization profiles, which TensorRT
    # enforces on every call (no sequence longer than the plan was built for reaches its kernels).
    built = manifest.get("tensorrt") or {}
    here = {"version": trt.__version__, "compute_capability": compute_capability()}
    for key, what in (("version", "TensorRT"), ("compute_capability", "a GPU of compute capability")):
        if built.get(key) != here[key]:
            raise EngineError(
                f"{directory}: this engine was built by {what} {built.get(key)!r} and this machine has {here[key]!r}; "
                "TensorRT engines run only where they were built. Rebuild it here with --backend tensorrt."
            )
    try:
        return TrtProgram(directory / PLAN, manifest["onnx"], manifest["dtype"])
    except Exception as e:  # noqa: BLE001  (TensorRT reports a bad plan as a RuntimeError or None)
        raise EngineError(f"{directory / PLAN}: TensorRT could not open the engine ({e}).") from None
