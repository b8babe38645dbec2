"""Fail a GPU build that holds a kernel without a GPU schedule, naming the kernel.

An unscheduled TIR function on a GPU target either fails deep inside TVM's codegen ("did you
forget to bind?") or, worse, runs on one thread. Runs after scheduling in the GPU pipeline; host
functions (the VM's shape functions) are exempt.
"""

from __future__ import annotations

import tvm
from tvm import tirx

from qwen2c.errors import BackendUnavailableError

from . import user_error


def check_scheduled(target_name: str) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="CheckScheduled")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        missing = [gv.name_hint for gv, f in mod.functions_items()
                   if isinstance(f, tirx.PrimFunc) and not _is_host(f) and not _binds_threads(f)]
        if missing:
            raise user_error(BackendUnavailableError(
                f"target {target_name}: {len(missing)} kernel(s) have no GPU schedule: {', '.join(sorted(missing))}. "
                "No engine was written; this is a qwen2c bug for this model, please report it with its config.json."
            ))
        return mod

    return _pass


def _is_host(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_host_func", False))


def _binds_threads(func: tirx.PrimFunc) -> bool:
    # TVM 0.27 exposes no TIR visitor to Python; the printed function names its thread axes.
    text = func.script()
    return "threadIdx." in text or "blockIdx." in text
