"""The TVM backend behind qwen2c's backend interface (``targets/backends.py``).

Lowers the rewritten program to a Relax module (``relax_module.py``, quantized weights where the
build asks for them) carrying a fingerprint of what it was built for (``fingerprint.py``), compiles
it with the target's device-kind pipeline (``compile.py``), writes ``model.so`` (with device code
checked by ``device_code.py``) in a forked process, and opens engines with TVM's runtime alone
(``runtime.py``) over the mapped weights file, after checking the library's fingerprint.
"""

from __future__ import annotations

import dataclasses
import errno
import shutil
from pathlib import Path
from typing import Any, Callable

from qwen2c import engine_dir
from qwen2c.errors import BackendUnavailableError, ConfigError, EngineError, Qwen2cError

LIBRARY = engine_dir.LIBRARY


@dataclasses.dataclass
class Lowered:
    compiled: Any  # compile.Compiled
    spec: Any
    linker: str | None
    prefill_chunk: int


def prepare(spec, dtype: str, options: dict[str, Any]) -> None:
    from qwen2c.interrupts import deferred

    with deferred():  # C++ initialisation (qwen2c/interrupts.py)
        import tvm
    if getattr(tvm.base, "_RUNTIME_ONLY", False):
        raise BackendUnavailableError(
            "this process opened an engine with TVM's runtime only (no compiler), so it cannot build. Build in a "
            "separate process, or `import tvm` before the first qwen2c.load()."
        )
    with deferred():  # the compiler's modules, likewise
        import tvm.relax  # noqa: F401

    from .lower_moe import MOE_DISPATCHES
    moe_dispatch = options.get("moe_dispatch", "sparse")
    if moe_dispatch not in MOE_DISPATCHES:
        raise ConfigError(f"--moe-dispatch {moe_dispatch!r} must be one of {', '.join(MOE_DISPATCHES)}.")
    from ..registry import linker_for
    from .device_code import check_device_toolchain

    linker_for(spec)  # fails fast when the library could not be linked here
    check_device_toolchain(spec)  # likewise for device code (nvcc for CUDA, ld.lld for ROCm)


def lower(program, config, spec, dtype: str, max_context: int, options: dict[str, Any],
          progress: Callable[[str], None]) -> Lowered:
    """``options`` (from the builder): ``moe_dispatch``; ``formats`` (per parameter, its quantization or
    None; None when not quantized); and what the fingerprint records: ``model_config`` (the
    checkpoint's config.json), ``params`` (the builder's parameter table), ``moe`` (the manifest's MoE
    section) and ``weight_format``; ``kv_cache_dtype``: the cache's element type (None: ``dtype``)."""
    from qwen2c.fingerprint import for_build

    from ..registry import linker_for
    from .compile import compile_module
    from .fingerprint import add_fingerprint
    from .pipelines.add_kv_cache_creation import kv_cache_geometry, prefill_chunk_limit
    from .relax_module import build_relax_module

    module = add_fingerprint(
        build_relax_module(program, config, dtype, options.get("moe_dispatch", "sparse"), options.get("formats"),
                           options.get("kv_cache_dtype")),
        for_build(spec, dtype, max_context, options))
    compiled = compile_module(module, spec)
    if compiled.launches:
        n = compiled.launches
        progress(f"    decode step: {n['kernels']} kernels + {n['kv_cache_calls']} KV-cache calls; "
                 f"{n['host_launches']} host launches ({n['kernels_in_graphs']} kernels in "
                 f"{n['graph_replays']} CUDA-graph replays)")
    return Lowered(compiled, spec, linker_for(spec), prefill_chunk_limit(kv_cache_geometry(module)))


def write(lowered: Lowered, staging: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """``model.so``, written by a forked process: LLVM aborts the process when a write fails (a disk
    filling now), see ``qwen2c/isolate.py``. A child that died on a full disk is ENOSPC (the builder
    names the destination); any other death is an error of its own.

    ``weight_layout`` (the concatenations ``transform_params`` makes, as indices into the call order)
    tells the builder how to lay out the weights file so the runtime uses it in place."""
    import tvm

    from qwen2c.isolate import FULL_DISK_BYTES, ChildDied, run_forked

    from .device_code import write_library

    try:
        device_code = run_forked(lambda: write_library(lowered.compiled.executable, lowered.spec, staging / LIBRARY,
                                                       lowered.linker, progress), disk=staging)
    except ChildDied as e:
        if shutil.disk_usage(staging).free < FULL_DISK_BYTES:
            raise OSError(errno.ENOSPC, "No space left on device") from None
        raise RuntimeError(f"writing the compiled library failed: the process writing it {e}") from None
    return {"device_code": device_code, "launches": lowered.compiled.launches,
            "prefill_chunk": lowered.prefill_chunk,
            # transform_params' outputs as concatenations of params (stored end to end): see open_program.
            "weight_layout": lowered.compiled.weight_layout,
            "versions": {"tvm": tvm.__version__}}


def runs_here(spec) -> bool:
    from ..registry import runs_on_this_host

    return runs_on_this_host(spec)


def open_program(directory: Path, manifest: dict[str, Any]):
    """The engine's TvmProgram: its weights (in the manifest's call order) over the mapped weights
    file, on its device, once the library's fingerprint agrees with the manifest and the weights."""
    from qwen2c.weights_file import map_weights

    from .runtime import TvmProgram

    directory = Path(directory)
    # Mapped, not read: the VM uses the file's pages in place where it can (weights_file.py).
    tensors = map_weights(directory / engine_dir.WEIGHTS)
    try:
        weights = [tensors[p["key"]] for p in manifest["params"]]
    except (KeyError, TypeError) as e:
        raise EngineError(f"{directory}: weight {e} named in the manifest is not in the weights file.") from None
    try:
        return TvmProgram(
            directory / LIBRARY, manifest["target"]["device"], weights, manifest["max_context"],
            check_fingerprint=lambda embedded: check_fingerprint(directory, manifest, embedded),
            prefill_chunk=manifest.get("prefill_chunk"),
            weight_layout=manifest.get("weight_layout"),
        )
    except Qwen2cError:  # no device or device runtime here: already says what is missing
        raise
    except Exception as e:  # TVM reports a bad library as a generic error
        raise EngineError(f"{directory / LIBRARY}: could not open the compiled library ({e}).") from None


def check_fingerprint(directory: Path, manifest: dict[str, Any], embedded: bytes | None) -> None:
    """The library's fingerprint against the manifest and the weights file (``qwen2c/fingerprint.py``)."""
    from qwen2c.fingerprint import check_embedded

    check_embedded(directory, manifest, embedded, LIBRARY, "compiled library")
