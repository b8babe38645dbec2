"""The TVM backend behind qwen2c's backend interface (``targets/backends.py``).

Lowers the rewritten program to a Relax module (``relax_module.py``), compiles it with the target's
device-kind pipeline (``compile.py``), writes ``model.so`` (with device code checked by
``device_code.py``), and opens engines with TVM's runtime alone (``runtime.py``).
"""

from __future__ import annotations

import dataclasses
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


def prepare(spec, dtype: str, options: dict[str, Any]) -> None:
    import tvm

    from .lower_moe import MOE_DISPATCHES

    if getattr(tvm.base, "_RUNTIME_ONLY", False):
        raise BackendUnavailableError(
            "this process opened an engine with TVM's runtime only (no compiler), so it cannot build. Build in a "
            "separate process, or `import tvm` before the first qwen2c.load()."
        )
    moe_dispatch = options.get("moe_dispatch", "sparse")
    if moe_dispatch not in MOE_DISPATCHES:
        raise ConfigError(f"--moe-dispatch {moe_dispatch!r} must be one of {', '.join(MOE_DISPATCHES)}.")
    from ..registry import linker_for
    from .device_code import check_device_toolchain

    linker_for(spec)  # fails fast when the library could not be linked here
    check_device_toolchain(spec)  # likewise for device code (nvcc for CUDA, ld.lld for ROCm)


def lower(program, config, spec, dtype: str, max_context: int, options: dict[str, Any],
          progress: Callable[[str], None]) -> Lowered:
    from ..registry import linker_for
    from .compile import compile_module
    from .relax_module import build_relax_module

    module = build_relax_module(program, config, dtype, options.get("moe_dispatch", "sparse"))
    compiled = compile_module(module, spec)
    if compiled.launches:
        n = compiled.launches
        progress(f"    decode step: {n['kernels']} kernels + {n['kv_cache_calls']} KV-cache calls; "
                 f"{n['host_launches']} host launches ({n['kernels_in_graphs']} kernels in "
                 f"{n['graph_replays']} CUDA-graph replays)")
    return Lowered(compiled, spec, linker_for(spec))


def write(lowered: Lowered, staging: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    import tvm

    from .device_code import write_library

    device_code = write_library(lowered.compiled.executable, lowered.spec, staging / LIBRARY, lowered.linker, progress)
    return {"device_code": device_code, "launches": lowered.compiled.launches, "versions": {"tvm": tvm.__version__}}


def runs_here(spec) -> bool:
    from ..registry import runs_on_this_host

    return runs_on_this_host(spec)


def open_program(directory: Path, manifest: dict[str, Any]):
    """The engine's TvmProgram: its weights (in the manifest's call order) uploaded to its device."""
    from safetensors.numpy import load_file

    from .runtime import TvmProgram

    try:
        tensors = load_file(str(directory / engine_dir.WEIGHTS))
    except Exception as e:
        raise EngineError(f"{directory / engine_dir.WEIGHTS}: unreadable weights ({e}).") from None
    try:
        weights = [tensors[p["key"]] for p in manifest["params"]]
    except KeyError as e:
        raise EngineError(f"{directory}: weight {e} named in the manifest is not in the weights file.") from None
    try:
        return TvmProgram(directory / LIBRARY, manifest["target"]["device"], weights, manifest["max_context"])
    except Qwen2cError:  # no device or device runtime here: already says what is missing
        raise
    except Exception as e:  # TVM reports a bad library as a generic error
        raise EngineError(f"{directory / LIBRARY}: could not open the compiled library ({e}).") from None
