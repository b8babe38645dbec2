"""The TVM pipeline for GPU targets (CUDA, ROCm, Metal, OpenCL): DLight schedules, qwen2c's GPU kernels.

Linear layers are legalized and scheduled by DLight's GPU rules (``Matmul`` for prompts, tensor
cores where the rule applies; ``GEMV`` for the decode step), RMSNorm by its reduction rules; the
KV cache brings TVM's GPU attention kernels; RMSNorm and MoE kernels come from ``schedules/gpu_norm.py``
and ``schedules/gpu_moe.py``.
Every kernel must come out with a thread binding: one that does not fails the build, named
(``check_scheduled.py``). Decode's static regions are captured in CUDA graphs where TVM can
(``RewriteCUDAGraph``, CUDA only).
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax
from tvm.relax.backend.gpu_generic import pipeline as gpu_generic
from tvm.s_tir import dlight as dl

from qwen2c.autotune import params
from qwen2c.autotune.metaschedule import apply_tir_records
from qwen2c.schedules import dequantize, gpu_moe, gpu_norm

from ...registry import TargetSpec
from .add_kv_cache_creation import add_kv_cache_creation
from .check_scheduled import check_scheduled
from .combine_parallel_linears import combine_parallel_linears, lift_weight_transforms
from .dispatch_kernels import dispatch_kernels
from .fuse_dequantize import fuse_dequantize
from .record_weight_layout import record_weight_layout

log = logging.getLogger(__name__)


def kernels(max_threads: int) -> dict:
    """The GPU kernels for qwen2c's abstract calls: ``name -> make(inputs, outputs, *statics)``.

    Kernels with tunable parameters ask ``autotune/params.py`` for them (a record, else the defaults)."""
    return {
        "rms_norm": lambda ins, outs, eps: _rms_norm(int(ins[0].shape[1]), eps, ins[0].dtype),
        "moe_route": lambda ins, outs, top_k, norm: gpu_moe.route_kernel(
            int(ins[0].shape[1]), top_k, bool(norm), ins[0].dtype),
        "moe_dense_route": lambda ins, outs: gpu_moe.dense_route_kernel(int(outs[0].shape[1]), int(ins[0].shape[1])),
        "moe_group": lambda ins, outs: gpu_moe.group_kernel(int(outs[2].shape[0]) - 1, max_threads),
        "moe_grouped_swiglu": lambda ins, outs, per_token, act: _grouped(
            "swiglu", int(ins[1].shape[0]), int(ins[0].shape[1]), int(outs[0].shape[1]), ins[0].dtype,
            top_k=per_token, act=int(act)),
        "moe_grouped_down": lambda ins, outs: _grouped(
            "down", int(ins[1].shape[0]), int(ins[1].shape[1]), int(ins[1].shape[2]), ins[1].dtype),
        "moe_combine": lambda ins, outs: gpu_moe.combine_kernel(
            int(ins[0].shape[1]), int(ins[2].shape[1]), outs[0].dtype),
        # Quantized weights (pipelines/fuse_dequantize.py): the dequantize is a block of the reading
        # kernel, which DLight inlines into the weight loads (GEMV for decode's one row, Matmul for prompts).
        "q_matmul": lambda ins, outs, bits, group: dequantize.gpu_matmul_kernel(
            int(ins[0].shape[2]), int(outs[0].shape[2]), bits, group, ins[0].dtype,
            rows=int(ins[0].shape[1]) if isinstance(ins[0].shape[1], tvm.tirx.IntImm) else None),
        "q_take": lambda ins, outs, bits, group: dequantize.take_kernel(
            int(ins[0].shape[0]), int(outs[0].shape[1]), bits, group, outs[0].dtype, ins[2].dtype),
        "moe_grouped_swiglu_q": lambda ins, outs, per_token, act, bits, group: _grouped(
            "swiglu", int(ins[1].shape[0]), int(ins[0].shape[1]), int(outs[0].shape[1]), ins[0].dtype,
            top_k=per_token, act=int(act), quant=(int(bits), int(group))),
        "moe_grouped_down_q": lambda ins, outs, bits, group: _grouped(
            "down", int(ins[1].shape[0]), int(outs[0].shape[1]), int(ins[0].shape[1]), "float32",
            quant=(int(bits), int(group))),
    }


def _rms_norm(hidden: int, eps: float, dtype):
    return params.kernel("gpu_rms_norm", {"hidden": hidden, "dtype": dtype}, {"threads": gpu_norm.THREADS},
                         lambda threads: gpu_norm.rms_norm_kernel(hidden, eps, dtype, threads))


def _grouped(which: str, experts: int, a: int, b: int, dtype, top_k: int = 0, act: int = 0, quant=None):
    """The experts' grouped matmuls: "swiglu" (a = hidden, b = intermediate, ``top_k`` copies of each
    token) or "down" (a = hidden, b = intermediate)."""
    shape = {"which": which, "experts": experts, "a": a, "b": b, "dtype": dtype, "quant": list(quant) if quant else None}
    defaults = {"cols": gpu_moe.COLS, "rows": gpu_moe.ROWS}
    if which == "swiglu":
        return params.kernel("gpu_moe_grouped", shape, defaults, lambda cols, rows: gpu_moe.grouped_swiglu_kernel(
            experts, a, b, top_k, dtype=dtype, act=act, quant=quant, cols=cols, rows=rows))
    return params.kernel("gpu_moe_grouped", shape, defaults, lambda cols, rows: gpu_moe.grouped_down_kernel(
        experts, a, b, dtype=dtype, quant=quant, cols=cols, rows=rows))


class _FallThrough(dl.ScheduleRule):
    """A DLight rule that declines, instead of failing the build, where it raises.

    TVM 0.27's GEMV rule raises on a matrix-vector product with a single output (MoE's shared-
    expert gate, [1, hidden]: "'fuse' requires at least 1 loop(s)") rather than returning None;
    the next rule then schedules the function.
    """

    def __init__(self, rule: dl.ScheduleRule):
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            return self.rule.apply(func, target, tunable)
        except Exception as e:  # noqa: BLE001  (any failure means "this rule does not fit")
            log.debug("DLight %s declined a function: %s", type(self.rule).__name__, str(e).splitlines()[0])
            return None


def pipeline(spec: TargetSpec) -> list[tvm.transform.Pass]:
    target = spec.tvm_target()
    max_threads = int(target.attrs.get("max_num_threads", 256))
    passes = [
        # dispatch: the target's KV cache (TVM's GPU attention kernels), MoE kernels, quantized weights' readers.
        add_kv_cache_creation(target),
        # Linear layers reading one input are combined (weights concatenated once, at load), and each
        # becomes one NT matmul: legalized apart, permute_dims(W) is a kernel that copies every
        # weight on every step. Quantized weights' readers become kernels that dequantize as they read.
        *combine_parallel_linears(),
        fuse_dequantize(),
        dispatch_kernels(kernels(max_threads), spec.device),
        *gpu_generic.library_dispatch_passes(target),
        relax.transform.FuseTransposeMatmul(),
        lift_weight_transforms(),
        record_weight_layout(),
        # legalize the remaining ops to TIR and fuse them.
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        # schedule: MetaSchedule's tuned schedules where the build applies a tuning database (static
        # shapes); DLight's GPU rules for the rest, most specific first; then every kernel must be
        # bound to threads.
        apply_tir_records(target),
        dl.ApplyDefaultSchedule(*(_FallThrough(rule) for rule in (
            dl.gpu.Matmul(),
            dl.gpu.GEMV(),
            dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        ))),
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
