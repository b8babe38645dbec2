"""Lower qwen2c's fused ops to Relax while importing the rewritten ExportedProgram.

``fused_attention`` becomes a call into the KV cache that the engine owns: the cache applies RoPE
at each token's position, appends k/v to its pages, and attends over everything the sequence has
seen. One traced graph therefore serves prefill (seq = prompt length) and decode (seq = 1).

``fused_moe`` becomes qwen2c's grouped-expert kernels (``schedules/cpu_moe.py``): route, group the
tokens by expert, one SwiGLU and one down projection per routed expert, combine; the shared expert
and the router are ordinary linear layers. ``moe_dispatch="dense"`` runs every expert on every token
instead (a benchmark baseline with the same kernels).
"""

from __future__ import annotations

from typing import Callable

from tvm import relax
from torch import fx

from qwen2c.schedules import cpu_moe

KV_ATTENTION = "vm.builtin.attention_kv_cache_attention_with_fused_qkv"

ConvertMap = dict[str, Callable[[fx.Node, object], relax.Var]]


MOE_DISPATCHES = ("sparse", "dense")


def convert_map(kv_cache: relax.Var, vector_lanes: int, moe_dispatch: str = "sparse") -> ConvertMap:
    """Converters for the qwen2c ops, keyed as TVM's importer names call targets."""
    if moe_dispatch not in MOE_DISPATCHES:
        raise ValueError(f"moe_dispatch must be one of {MOE_DISPATCHES}, got {moe_dispatch!r}")
    kernels: dict[tuple, object] = {}

    def kernel(bb: relax.BlockBuilder, make, *key):
        """Add each distinct kernel to the module once; every layer with those shapes shares it."""
        if (make, *key) not in kernels:
            kernels[(make, *key)] = bb.add_func(make(*key), make.__name__.removesuffix("_kernel"))
        return kernels[(make, *key)]

    def attention(node: fx.Node, importer) -> relax.Var:
        bb = importer.block_builder
        q, k, v = (importer.env[a] for a in node.args[:3])
        layer, _theta, scale = node.args[3:6]  # theta is baked into the cache at creation
        batch, seq, q_heads, head_dim = q.ty.shape
        kv_heads = k.ty.shape[2]
        qkv = bb.emit(relax.op.concat([q, k, v], axis=2))
        qkv = bb.emit(relax.op.reshape(qkv, (batch * seq, q_heads + 2 * kv_heads, head_dim)))
        out = bb.emit(
            relax.call_dps_packed(
                KV_ATTENTION,
                [kv_cache, relax.prim_value(int(layer)), relax.prim_value(float(scale)), qkv],
                out_ty=relax.TensorType((batch * seq, q_heads, head_dim), q.ty.dtype),
            )
        )
        return bb.emit(relax.op.reshape(out, (batch, seq, q_heads, head_dim)))

    def rms_norm(node: fx.Node, importer) -> relax.Var:
        x, weight = importer.env[node.args[0]], importer.env[node.args[1]]
        return importer.block_builder.emit(relax.op.nn.rms_norm(x, weight, axes=[-1], epsilon=node.args[2]))

    def moe(node: fx.Node, importer):
        bb = importer.block_builder
        x, router, gate_up, down, shared_gate, shared_up, shared_down, shared_expert_gate = (
            importer.env[a] for a in node.args[:8]
        )
        top_k, norm_topk_prob = int(node.args[8]), bool(node.args[9])
        tokens, hidden = x.ty.shape
        experts, inter = int(router.ty.shape[0]), int(down.ty.shape[2])
        f32, i32 = "float32", "int32"

        def call(func, args, *outs):
            types = [relax.TensorType(shape, dtype) for shape, dtype in outs]
            return bb.emit(relax.call_tir(func, args, types if len(types) > 1 else types[0]))

        def items(value, n):
            return [bb.emit(relax.TupleGetItem(value, i)) for i in range(n)]

        def linear(inp, weight):  # matmul(x, W^T): what dispatch_cpu_matmul serves
            return bb.emit(relax.op.matmul(inp, bb.emit(relax.op.permute_dims(weight))))

        x3 = bb.emit(relax.op.reshape(x, (1, tokens, hidden)))
        logits = bb.emit(relax.op.reshape(linear(x3, router), (tokens, experts)))
        route = kernel(bb, cpu_moe.route_kernel, experts, top_k, norm_topk_prob)
        weights, chosen = items(call(route, [logits], ((tokens, top_k), f32), ((tokens, top_k), i32)), 2)
        routed_weights, routed_experts, per_token = weights, chosen, top_k
        if moe_dispatch == "dense":
            dense = kernel(bb, cpu_moe.dense_route_kernel, experts, top_k)
            routed_weights, routed_experts = items(
                call(dense, [weights, chosen], ((tokens, experts), f32), ((tokens, experts), i32)), 2)
            per_token = experts
        slots = tokens * per_token
        flat = bb.emit(relax.op.reshape(routed_experts, (slots,)))
        group = kernel(bb, cpu_moe.group_kernel, experts)
        rows, slot_of, offsets = items(call(group, [flat], ((slots,), i32), ((slots,), i32), ((experts + 1,), i32)), 3)
        swiglu = kernel(bb, cpu_moe.grouped_swiglu_kernel, experts, int(hidden), inter, per_token, vector_lanes,
                        cpu_moe.swiglu_tile_rows(vector_lanes))
        h = call(swiglu, [x, gate_up, rows, offsets], ((slots, inter), f32))
        down_k = kernel(bb, cpu_moe.grouped_down_kernel, experts, int(hidden), inter, vector_lanes,
                        cpu_moe.down_tile_rows(vector_lanes))
        y = call(down_k, [h, down, rows, offsets], ((slots, hidden), f32))
        combine = kernel(bb, cpu_moe.combine_kernel, int(hidden), per_token, vector_lanes)
        routed = call(combine, [y, slot_of, routed_weights], ((tokens, hidden), f32))

        act = bb.emit(relax.op.multiply(bb.emit(relax.op.nn.silu(linear(x3, shared_gate))), linear(x3, shared_up)))
        shared = bb.emit(relax.op.multiply(bb.emit(relax.op.sigmoid(linear(x3, shared_expert_gate))),
                                           linear(act, shared_down)))
        out = bb.emit(relax.op.add(routed, bb.emit(relax.op.reshape(shared, (tokens, hidden)))))
        return (out, bb.emit(relax.op.astype(chosen, "int64")))

    return {"fused_attention.default": attention, "fused_rms_norm.default": rms_norm, "fused_moe.default": moe}
