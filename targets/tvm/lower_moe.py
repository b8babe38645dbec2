"""Lower ``qwen2c::fused_moe`` to Relax as a sequence of named kernels, for any device kind.

Route (softmax, top-k, renormalisation) -> group the (token, slot) pairs by expert -> one gated
activation (the model's: SwiGLU for silu) and one down projection per routed expert -> combine in the router's order. The router and the
shared expert are ordinary linear layers. The second result is the routing, as int64
[tokens, top_k], which the engine returns.

The kernels are abstract calls (``pipelines/dispatch_kernels.py``): each pipeline serves them with
its device kind's kernels (CPU: ``schedules/cpu_moe.py``; GPU: ``schedules/gpu_moe.py``).

``moe_dispatch="dense"`` routes every token to every expert (weight 0 where the router did not
choose it) and runs the same kernels: the all-experts baseline for benchmarks.
"""

from __future__ import annotations

from torch import fx
from tvm import relax

from qwen2c.schedules.activations import activation_index

from .pipelines.dispatch_kernels import kernel_call

MOE_DISPATCHES = ("sparse", "dense")
# The shared expert's activation, as the Relax op of each ``graphs/ops.ACTIVATIONS`` name.
_ACTIVATIONS = {"silu": relax.op.nn.silu, "gelu": relax.op.nn.gelu, "gelu_tanh": relax.op.nn.gelu_tanh,
                "relu": relax.op.nn.relu}


def lower_moe(node: fx.Node, importer, linear, moe_dispatch: str):
    """``fused_moe`` -> route, group by expert, grouped gated MLP, grouped down, combine, + shared expert.

    ``linear(x, W)`` emits a linear layer as every other one in the module is emitted.
    """
    bb = importer.block_builder
    x, router, gate_up, down, shared_gate, shared_up, shared_down, shared_expert_gate = (
        importer.env[a] for a in node.args[:8]
    )
    top_k, norm_topk_prob, act = int(node.args[8]), bool(node.args[9]), node.args[10]
    tokens, hidden = x.ty.shape
    dtype = x.ty.dtype
    experts, inter = int(router.ty.shape[0]), int(down.ty.shape[2])
    f32, i32 = "float32", "int32"

    def items(value, n):
        return [bb.emit(relax.TupleGetItem(value, i)) for i in range(n)]

    x3 = bb.emit(relax.op.reshape(x, (1, tokens, hidden)))
    logits = bb.emit(relax.op.reshape(linear(x3, router), (tokens, experts)))
    weights, chosen = items(kernel_call(bb, "moe_route", [logits], [top_k, norm_topk_prob],
                                        [((tokens, top_k), f32), ((tokens, top_k), i32)]), 2)
    routed_weights, routed_experts, per_token = weights, chosen, top_k
    if moe_dispatch == "dense":
        routed_weights, routed_experts = items(kernel_call(
            bb, "moe_dense_route", [weights, chosen], [], [((tokens, experts), f32), ((tokens, experts), i32)]), 2)
        per_token = experts
    slots = tokens * per_token
    flat = bb.emit(relax.op.reshape(routed_experts, (slots,)))
    rows, slot_of, offsets = items(kernel_call(
        bb, "moe_group", [flat], [], [((slots,), i32), ((slots,), i32), ((experts + 1,), i32)]), 3)
    h = kernel_call(bb, "moe_grouped_swiglu", [x, gate_up, rows, offsets], [per_token, activation_index(act)],
                    [((slots, inter), f32)])
    y = kernel_call(bb, "moe_grouped_down", [h, down, rows, offsets], [], [((slots, hidden), f32)])
    routed = kernel_call(bb, "moe_combine", [y, slot_of, routed_weights], [], [((tokens, hidden), dtype)])

    gated = bb.emit(relax.op.multiply(bb.emit(_ACTIVATIONS[act](linear(x3, shared_gate))), linear(x3, shared_up)))
    shared = bb.emit(relax.op.multiply(bb.emit(relax.op.sigmoid(linear(x3, shared_expert_gate))),
                                       linear(gated, shared_down)))
    out = bb.emit(relax.op.add(routed, bb.emit(relax.op.reshape(shared, (tokens, hidden)))))
    return (out, bb.emit(relax.op.astype(chosen, "int64")))
