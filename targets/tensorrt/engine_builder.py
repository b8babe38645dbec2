"""Build a serialized TensorRT engine from the exported ONNX, with TensorRT's Python API (10.x).

Never executed here: TensorRT cannot be installed in this workplace (see the README). Written
against NVIDIA's documented Python API: ``tensorrt.Builder``, ``OnnxParser`` (errors per node via
``get_error``), ``IBuilderConfig`` (precision flags, memory pool, optimization profiles, timing
cache), ``build_serialized_network``.

The timing cache (what TensorRT measured about each kernel choice on this GPU) is kept per TensorRT
version and GPU under ``$QWEN2C_CACHE_DIR`` (default ``~/.cache/qwen2c``) and given to every build,
so a second build of the same shapes skips the measurements; it is written back by rename, so an
interrupted build never leaves a half cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from qwen2c.errors import BackendUnavailableError, UnsupportedModelError

from .profiles import Profile

PRECISION_FLAGS = {"float16": "FP16", "bfloat16": "BF16", "float32": None}


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN2C_CACHE_DIR", Path.home() / ".cache" / "qwen2c"))


def timing_cache_path(trt_version: str, compute_capability: str) -> Path:
    return cache_dir() / "tensorrt" / f"timing-trt{trt_version}-sm{compute_capability.replace('.', '')}.cache"


def compute_capability() -> str:
    """The GPU's compute capability ("9.0"), which a TensorRT engine is built for and runs on only."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "the tensorrt backend builds engines on the GPU they will run on, and this machine has no CUDA device."
        )
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def parser_errors(parser) -> list[str]:
    """Each ONNX parser error as one line naming its node (index, name, operator) and reason."""
    lines = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        where = f"node {error.node()}"
        if error.node_name():
            where += f" {error.node_name()!r}"
        if error.node_operator():
            where += f" ({error.node_operator()})"
        lines.append(f"{where}: {error.desc()} [{error.code()}]")
    return lines


def build_engine(onnx_path: Path, profiles: list[Profile], dtype: str, cache: Path,
                 progress: Callable[[str], None], workspace_bytes: int | None = None) -> bytes:
    """Parse ``onnx_path``, build with ``profiles`` and ``dtype``'s precision; return the serialized engine."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode of TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: external data is read beside it
        raise UnsupportedModelError(
            f"TensorRT {trt.__version__}'s ONNX parser refused {onnx_path.name}:\n  " + "\n  ".join(parser_errors(parser))
        )
    config = builder.create_builder_config()
    flag = PRECISION_FLAGS[dtype]
    if flag is not None:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    timing = config.create_timing_cache(cache.read_bytes() if cache.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    progress(f"    building the TensorRT engine ({dtype}, {len(profiles)} optimization profiles, timing cache "
             f"{'reused' if cache.is_file() else 'new'}: {cache})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UnsupportedModelError(f"TensorRT {trt.__version__} could not build an engine from {onnx_path.name} "
                                    "(its log above says why).")
    _save_atomically(cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _save_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
