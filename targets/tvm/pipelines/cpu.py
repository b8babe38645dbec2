"""The TVM pipeline for CPU targets (LLVM): qwen2c's CPU kernels, TVM's generic CPU passes."""

from __future__ import annotations

import tvm
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from qwen2c.autotune import params
from qwen2c.autotune.metaschedule import apply_tir_records
from qwen2c.schedules import (cpu_moe, cpu_norm, cpu_packed_matmul, cpu_qmatmul, cpu_vnni_gemm, cpu_vnni_gemv,
                              dequantize)
from qwen2c.schedules.cpu_injective import schedule_cpu_injective
from qwen2c.schedules.cpu_matmul import dispatch_cpu_matmul, tile_rows

from ...registry import TargetSpec
from .add_kv_cache_creation import add_kv_cache_creation
from .combine_parallel_linears import combine_parallel_linears, lift_weight_transforms
from .dispatch_kernels import dispatch_kernels
from .fuse_dequantize import fuse_dequantize
from .record_weight_layout import record_weight_layout
from .use_cpu_attention_kernels import use_cpu_attention_kernels


def kernels(vector: int, vnni: bool = False) -> dict:
    """The CPU kernels for qwen2c's abstract calls: ``name -> make(inputs, outputs, *statics)``.

    ``vnni``: the target has AVX-512 VNNI, so quantized layers use integer dot products (decode steps
    and prompts, with activations rounded to int8).

    Kernels with tunable parameters ask ``autotune/params.py`` for them (a tuning record, else the
    defaults written here)."""
    return {
        "rms_norm": lambda ins, outs, eps: cpu_norm.rms_norm_kernel(int(ins[0].shape[1]), eps, ins[0].dtype, vector),
        "moe_route": lambda ins, outs, top_k, norm: cpu_moe.route_kernel(
            int(ins[0].shape[1]), top_k, bool(norm), ins[0].dtype),
        "moe_dense_route": lambda ins, outs: cpu_moe.dense_route_kernel(int(outs[0].shape[1]), int(ins[0].shape[1])),
        "moe_group": lambda ins, outs: cpu_moe.group_kernel(int(outs[2].shape[0]) - 1),
        "moe_grouped_swiglu": lambda ins, outs, per_token, act: _grouped(
            "swiglu", vector, int(ins[1].shape[0]), int(ins[0].shape[1]), int(outs[0].shape[1]), ins[0].dtype,
            top_k=per_token, act=int(act)),
        "moe_grouped_down": lambda ins, outs: _grouped(
            "down", vector, int(ins[1].shape[0]), int(ins[1].shape[1]), int(ins[1].shape[2]), ins[1].dtype),
        "moe_combine": lambda ins, outs: cpu_moe.combine_kernel(
            int(ins[0].shape[1]), int(ins[2].shape[1]), vector, outs[0].dtype),
        # Quantized weights (pipelines/fuse_dequantize.py): dequantized in registers.
        "q_matmul": lambda ins, outs, bits, group: _q_matmul(
            vector, int(ins[0].shape[2]), int(outs[0].shape[2]), int(bits), int(group), ins[0].dtype, _one_row(ins[0]),
            vnni),
        "q_take": lambda ins, outs, bits, group: dequantize.take_kernel(
            int(ins[0].shape[0]), int(outs[0].shape[1]), bits, group, outs[0].dtype, ins[2].dtype),
        "moe_grouped_swiglu_q": lambda ins, outs, per_token, act, bits, group: _grouped(
            "swiglu", vector, int(ins[1].shape[0]), int(ins[0].shape[1]), int(outs[0].shape[1]), ins[0].dtype,
            top_k=per_token, act=int(act), quant=(int(bits), int(group))),
        "moe_grouped_down_q": lambda ins, outs, bits, group: _grouped(
            "down", vector, int(ins[1].shape[0]), int(outs[0].shape[1]), int(ins[0].shape[1]), "float32",
            quant=(int(bits), int(group))),
    }


def _q_matmul(vector: int, k: int, n: int, bits: int, group: int, dtype: str, one_row: bool, vnni: bool):
    if vnni and cpu_vnni_gemm.serves(k, n, bits, group):
        if one_row:
            shape = {"k": k, "n": n, "rows": 1, "dtype": dtype, "bits": bits, "group": group}
            return params.kernel("q_gemv_vnni", shape, {"tile_cols": cpu_vnni_gemv.default_tile_cols(n)},
                                 lambda tile_cols: cpu_vnni_gemv.vnni_gemv_kernel(k, n, bits, group, dtype, tile_cols))
        # Prompts: weights packed to VNNI order per panel, 64 products per instruction (~3x the float panel).
        shape = {"k": k, "n": n, "rows": "m", "dtype": dtype, "bits": bits, "group": group}
        return params.kernel("q_gemm_vnni", shape, cpu_vnni_gemm.defaults(n), lambda rows, col_vectors: (
            cpu_vnni_gemm.vnni_gemm_kernel(k, n, bits, group, dtype, rows, col_vectors)))
    shape = {"k": k, "n": n, "rows": 1 if one_row else "m", "dtype": dtype, "vector": vector, "bits": bits,
             "group": group}
    packed = cpu_packed_matmul.defaults(vector)
    if not one_row and cpu_packed_matmul.fits(k, n, vector, packed["col_vectors"]):
        # Prompts: the weights dequantized once per call into packed panels, then outer products.
        return params.kernel("packed_matmul", shape, packed, lambda rows, col_vectors: cpu_packed_matmul.packed_matmul_kernel(
            k, n, vector, rows, col_vectors, dtype=dtype, quant=(bits, group)))
    defaults = {"tile_rows": 1 if one_row else tile_rows(vector), "tile_cols": cpu_qmatmul.default_tile_cols(n),
                "unroll": cpu_qmatmul.UNROLL}
    return params.kernel("q_matmul", shape, defaults, lambda tile_rows, tile_cols, unroll: cpu_qmatmul.q_matmul_kernel(
        k, n, bits, group, vector, tile_rows, dtype=dtype, tile_cols=tile_cols, unroll=unroll))


def _grouped(which: str, vector: int, experts: int, a: int, b: int, dtype: str, top_k: int = 0, act: int = 0,
             quant=None):
    """The experts' grouped matmuls: ``which`` "swiglu" (a = hidden, b = intermediate, over ``top_k``
    routed copies of each token) or "down" (a = hidden, b = intermediate)."""
    shape = {"which": which, "experts": experts, "a": a, "b": b, "dtype": dtype, "vector": vector,
             "quant": list(quant) if quant else None}
    if which == "swiglu":
        defaults = {"tile_rows": cpu_moe.swiglu_tile_rows(vector), "col_block": cpu_moe.COL_BLOCK}
        return params.kernel("moe_grouped", shape, defaults, lambda tile_rows, col_block: cpu_moe.grouped_swiglu_kernel(
            experts, a, b, top_k, vector, tile_rows, col_block, dtype=dtype, act=act, quant=quant))
    defaults = {"tile_rows": tile_rows(vector), "col_block": cpu_moe.COL_BLOCK}
    return params.kernel("moe_grouped", shape, defaults, lambda tile_rows, col_block: cpu_moe.grouped_down_kernel(
        experts, a, b, vector, tile_rows, col_block, dtype=dtype, quant=quant))


def _one_row(ty) -> bool:
    """A decode step's activations: one row, so a row tile of 1 (no work on clamped duplicates)."""
    import tvm

    return isinstance(ty.shape[1], tvm.tirx.IntImm) and int(ty.shape[1]) == 1


def uses_vnni(spec: TargetSpec) -> bool:
    """Whether quantized layers on ``spec`` round activations to int8 for VNNI dot products."""
    return spec.device == "cpu" and "avx512_vnni" in spec.cpu_features


def pipeline(spec: TargetSpec) -> list[tvm.transform.Pass]:
    target = spec.tvm_target()
    lanes = spec.vector_bits // 32
    return [
        # dispatch: the target's KV cache (with qwen2c's prefill attention), linear layers (those reading one
        # input combined, their weights concatenated once at load), quantized weights' readers, norm and MoE
        # kernels.
        add_kv_cache_creation(target),
        use_cpu_attention_kernels(lanes),
        *combine_parallel_linears(),
        fuse_dequantize(),
        dispatch_kernels(kernels(lanes, vnni=uses_vnni(spec)), "cpu"),
        dispatch_cpu_matmul(vector_lanes=lanes),
        lift_weight_transforms(),
        record_weight_layout(),
        *cpu_generic.library_dispatch_passes(target),
        # legalize the remaining ops to TIR and fuse elementwise chains.
        *cpu_generic.legalize_passes(target),
        # lower dataflow (reshapes become views first: they are recognised unscheduled).
        *cpu_generic.dataflow_lower_passes(target),
        # schedule: MetaSchedule's tuned schedules where the build applies a tuning database (static
        # shapes), then parallel, vectorized loops for the other legalized elementwise ops.
        apply_tir_records(target),
        schedule_cpu_injective(vector_lanes=lanes),
        # finalize: activations reuse static buffers across steps.
        *cpu_generic.finalize_passes(target),
    ]
