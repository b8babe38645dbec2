"""The TVM pipeline for GPU targets (CUDA, ROCm, Metal, OpenCL): DLight schedules, qwen2c's GPU kernels.

Linear layers are legalized and scheduled by DLight's GPU rules (``Matmul`` for prompts, tensor
cores where the rule applies; ``GEMV`` for the decode step), RMSNorm by its reduction rules; the
KV cache brings TVM's GPU attention kernels; MoE kernels come from ``schedules/gpu_moe.py``.
Every kernel must come out with a thread binding: one that does not fails the build, named
(``check_scheduled.py``). Decode's static regions are captured in CUDA graphs where TVM can
(``RewriteCUDAGraph``, CUDA only).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.gpu_generic import pipeline as gpu_generic
from tvm.s_tir import dlight as dl

from qwen2c.schedules import gpu_moe

from ...registry import TargetSpec
from .add_kv_cache_creation import add_kv_cache_creation
from .check_scheduled import check_scheduled
from .dispatch_kernels import dispatch_kernels


def kernels(max_threads: int) -> dict:
    """The GPU kernels for qwen2c's abstract calls: ``name -> make(inputs, outputs, *statics)``."""
    return {
        "moe_route": lambda ins, outs, top_k, norm: gpu_moe.route_kernel(
            int(ins[0].shape[1]), top_k, bool(norm), ins[0].dtype),
        "moe_dense_route": lambda ins, outs: gpu_moe.dense_route_kernel(int(outs[0].shape[1]), int(ins[0].shape[1])),
        "moe_group": lambda ins, outs: gpu_moe.group_kernel(int(outs[2].shape[0]) - 1, max_threads),
        "moe_grouped_swiglu": lambda ins, outs, per_token: gpu_moe.grouped_swiglu_kernel(
            int(ins[1].shape[0]), int(ins[0].shape[1]), int(outs[0].shape[1]), per_token, dtype=ins[0].dtype),
        "moe_grouped_down": lambda ins, outs: gpu_moe.grouped_down_kernel(
            int(ins[1].shape[0]), int(ins[1].shape[1]), int(ins[1].shape[2]), dtype=ins[1].dtype),
        "moe_combine": lambda ins, outs: gpu_moe.combine_kernel(
            int(ins[0].shape[1]), int(ins[2].shape[1]), outs[0].dtype),
    }


def pipeline(spec: TargetSpec) -> list[tvm.transform.Pass]:
    target = spec.tvm_target()
    max_threads = int(target.attrs.get("max_num_threads", 256))
    passes = [
        # dispatch: the target's KV cache (TVM's GPU attention kernels), MoE kernels.
        add_kv_cache_creation(target),
        dispatch_kernels(kernels(max_threads), spec.device),
        *gpu_generic.library_dispatch_passes(target),
        # legalize the remaining ops to TIR and fuse them.
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        # schedule: DLight's GPU rules, most specific first; then every kernel must be bound to threads.
        dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(),
            dl.gpu.GEMV(),
            dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        ),
        check_scheduled(spec.name),
        # lower dataflow.
        *gpu_generic.dataflow_lower_passes(target),
        # finalize: static memory plan, CUDA graphs for decode's static regions, VM lowering.
        relax.transform.StaticPlanBlockMemory(),
    ]
    if spec.device == "cuda":
        passes.append(relax.transform.RewriteCUDAGraph())
    passes += [
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]
    return passes
