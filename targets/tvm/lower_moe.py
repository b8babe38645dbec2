"""Lower ``qwen2c::fused_moe`` to Relax: qwen2c's grouped-expert kernels (``schedules/cpu_moe.py``).

Route (softmax, top-k, renormalisation) -> group the (token, slot) pairs by expert -> one SwiGLU
and one down projection per routed expert -> combine in the router's order. The router and the
shared expert are ordinary linear layers (served by ``dispatch_cpu_matmul``). The second result
is the routing, as int64 [tokens, top_k], which the engine returns.

``moe_dispatch="dense"`` routes every token to every expert (weight 0 where the router did not
choose it) and runs the same kernels: the all-experts baseline for benchmarks.
"""

from __future__ import annotations

from torch import fx
from tvm import relax

from qwen2c.schedules import cpu_moe
from qwen2c.schedules.cpu_matmul import tile_rows

MOE_DISPATCHES = ("sparse", "dense")


def lower_moe(node: fx.Node, importer, kernel, vector_lanes: int, moe_dispatch: str):
    """``fused_moe`` -> route, group by expert, grouped SwiGLU, grouped down, combine, + shared expert.

    ``kernel(make, *key)`` adds a kernel to the module once and returns its GlobalVar.
    """
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
    route = kernel(cpu_moe.route_kernel, experts, top_k, norm_topk_prob)
    weights, chosen = items(call(route, [logits], ((tokens, top_k), f32), ((tokens, top_k), i32)), 2)
    routed_weights, routed_experts, per_token = weights, chosen, top_k
    if moe_dispatch == "dense":
        dense = kernel(cpu_moe.dense_route_kernel, experts, top_k)
        routed_weights, routed_experts = items(
            call(dense, [weights, chosen], ((tokens, experts), f32), ((tokens, experts), i32)), 2)
        per_token = experts
    slots = tokens * per_token
    flat = bb.emit(relax.op.reshape(routed_experts, (slots,)))
    group = kernel(cpu_moe.group_kernel, experts)
    rows, slot_of, offsets = items(call(group, [flat], ((slots,), i32), ((slots,), i32), ((experts + 1,), i32)), 3)
    swiglu = kernel(cpu_moe.grouped_swiglu_kernel, experts, int(hidden), inter, per_token, vector_lanes,
                    cpu_moe.swiglu_tile_rows(vector_lanes))
    h = call(swiglu, [x, gate_up, rows, offsets], ((slots, inter), f32))
    down_k = kernel(cpu_moe.grouped_down_kernel, experts, int(hidden), inter, vector_lanes,
                    tile_rows(vector_lanes))
    y = call(down_k, [h, down, rows, offsets], ((slots, hidden), f32))
    combine = kernel(cpu_moe.combine_kernel, int(hidden), per_token, vector_lanes)
    routed = call(combine, [y, slot_of, routed_weights], ((tokens, hidden), f32))

    act = bb.emit(relax.op.multiply(bb.emit(relax.op.nn.silu(linear(x3, shared_gate))), linear(x3, shared_up)))
    shared = bb.emit(relax.op.multiply(bb.emit(relax.op.sigmoid(linear(x3, shared_expert_gate))),
                                       linear(act, shared_down)))
    out = bb.emit(relax.op.add(routed, bb.emit(relax.op.reshape(shared, (tokens, hidden)))))
    return (out, bb.emit(relax.op.astype(chosen, "int64")))
