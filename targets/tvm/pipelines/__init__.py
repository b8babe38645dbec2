"""One TVM compile pipeline per device kind, each with the same phases, picked by the target.

    dispatch   KV-cache creation for the target, kernels for qwen2c's abstract calls and linear layers
    legalize   the remaining Relax ops to TIR, fused
    lower      dataflow to VM calls
    schedule   every kernel gets a schedule for the device (a GPU kernel without one fails the build)
    finalize   memory planning, (GPU) CUDA-graph capture, VM lowering

The shape of TVM's own ``relax/pipeline.py`` and ``relax/backend/*/pipeline.py``.
"""

from __future__ import annotations

import contextlib
import threading

import tvm

from qwen2c.errors import BackendUnavailableError, Qwen2cError

from ...registry import TargetSpec


_pending = threading.local()


def user_error(error: Qwen2cError) -> Qwen2cError:
    """Remember ``error`` for ``run_pipeline``, then raise it: TVM's pass machinery turns every
    Python exception raised inside a pass into a RuntimeError, and the user should see this one."""
    _pending.error = error
    return error


@contextlib.contextmanager
def surfacing_user_errors():
    """Around a call into TVM that runs qwen2c's Python (passes, build callbacks): an error raised
    there with ``user_error`` comes out as itself, not as TVM's RuntimeError with a C++ traceback."""
    _pending.error = None
    try:
        yield
    except Exception:
        error, _pending.error = getattr(_pending, "error", None), None
        if error is not None:
            raise error from None
        raise


def run_pipeline(passes: list[tvm.transform.Pass], mod: tvm.IRModule) -> tvm.IRModule:
    with surfacing_user_errors():
        return tvm.transform.Sequential(passes)(mod)


def pipeline_for(spec: TargetSpec) -> list[tvm.transform.Pass]:
    from . import cpu, gpu

    pipelines = {"cpu": cpu.pipeline, "cuda": gpu.pipeline, "rocm": gpu.pipeline, "metal": gpu.pipeline,
                 "opencl": gpu.pipeline}
    if spec.device not in pipelines:
        raise BackendUnavailableError(
            f"target {spec.name}: no TVM pipeline for device kind {spec.device!r} "
            f"(pipelines: {', '.join(sorted(pipelines))})."
        )
    return pipelines[spec.device](spec)
