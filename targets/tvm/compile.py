"""The TVM compile pipeline for an engine's Relax module: one list, phase by phase."""

from __future__ import annotations

import logging

import tvm
from tvm import relax

from qwen2c.schedules.cpu_matmul import dispatch_cpu_matmul

from ..registry import TargetSpec

log = logging.getLogger(__name__)


def pipeline(spec: TargetSpec) -> list[tvm.transform.Pass]:
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    target = spec.tvm_target()
    if spec.device != "cpu":
        raise NotImplementedError(f"the TVM pipeline for {spec.device} targets is not written yet")
    passes = [
        # Library dispatch: linear layers to qwen2c's CPU kernels, vectorised to the target's width.
        dispatch_cpu_matmul(vector_lanes=spec.vector_bits // 32),
        *cpu_generic.library_dispatch_passes(target),
        # Legalize the remaining ops to TIR and fuse elementwise chains.
        *cpu_generic.legalize_passes(target),
        # Lower dataflow and plan memory: activations reuse static buffers across steps.
        *cpu_generic.dataflow_lower_passes(target),
        *cpu_generic.finalize_passes(target),
    ]
    return passes


def compile_module(mod: tvm.IRModule, spec: TargetSpec) -> relax.VMExecutable:
    target = spec.tvm_target()
    with target:
        mod = tvm.transform.Sequential(pipeline(spec))(mod)
    return tvm.compile(mod, target=target, relax_pipeline=None)
