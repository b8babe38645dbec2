"""Fuse a Qwen2-MoE sparse block into ``qwen2c::fused_moe``.

Anchored on the router's ``topk``. What transformers traces for one block:

    logits  = linear(x, router_weight)                      # [tokens, experts]
    w, idx  = topk(softmax(logits, float32), k)             # (+ w /= w.sum(-1) if norm_topk_prob)
    routed  = <grouped experts over (w, idx)>               # sort by expert, grouped_mm (gate_up),
                                                            # act(gate) * up, grouped_mm (down), x w, sum
    shared  = down(act(gate(x)) * up(x))
    out     = routed + sigmoid(linear(x, shared_expert_gate)) * shared

The matcher checks the two ends exactly (router, shared expert, the final add) and the experts'
computation between them by what it is made of: the only ops allowed there are the grouping and
indexing ops of transformers' grouped experts, two grouped matmuls over this block's expert
weights, and one gated activation ``act(gate) * up``, where ``act`` is whichever of silu, gelu
(exact or tanh) and relu the trace holds (``hidden_act``: SwiGLU for Qwen2's silu), the same in the
shared expert. Anything else (another activation, a bias, a different combine) is refused with the
op at fault, and the pipeline's numeric check backs the structural one.

The fused op's second output is the routing (expert indices per token), so a program that returns
its routing (``export.py`` does, for MoE models) keeps returning it.
"""

from __future__ import annotations

import dataclasses
import operator
import re

import torch
from torch import fx

from qwen2c.errors import UnsupportedModelError
from qwen2c.model_config import moe_layers

from .pass_base import GraphPass, Miss, PassContext, PassReport, arg, aten, call, is_op, op_name

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout)
_SOFTMAX = (aten.softmax.int, aten._softmax.default)
_DIV = (aten.div.Tensor, aten.div_.Tensor)
_GROUPED_MM_NAMES = ("transformers.grouped_mm_fallback", "aten._grouped_mm", "aten.grouped_mm")

# What transformers' grouped experts (grouped_mm implementation) are built from, besides the two
# grouped matmuls and the SwiGLU: grouping tokens by expert, gathering, weighting and summing.
_EXPERT_PLUMBING = {
    "aten.sort", "aten.argsort", "aten.floor_divide", "aten.div", "aten.div_", "aten.index", "aten.histc", "aten.cumsum",
    "aten.bincount", "aten.transpose", "aten.t", "aten.permute", "aten.to", "aten._to_copy", "aten.chunk",
    "aten.split", "aten.split_with_sizes", "aten.slice", "aten.unsqueeze", "aten.squeeze", "aten.empty_like",
    "aten.zeros_like", "aten.zeros", "aten.empty", "aten.arange", "aten.index_put_", "aten.index_put",
    "aten.index_add", "aten.index_add_", "aten.view", "aten.reshape", "aten._unsafe_view", "aten.sum",
    "aten.mul", "aten.expand", "aten.contiguous", "aten.clone", "aten.sym_size",
    "aten._assert_tensor_metadata", "aten.masked_fill", "aten.clamp", "aten.clamp_",
    "operator.getitem", "operator.mul", "operator.floordiv", "operator.add",
}

# The traced activations the fused op computes, by op name (gelu: by its ``approximate`` argument).
_ACTIVATION_OPS = {"aten.silu": "silu", "aten.gelu": "gelu", "aten.relu": "relu"}

_ROUTER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.gate\.weight$")
# A Qwen2-MoE sparse block's parameters, named inside the block (layers.N.mlp.<name>).
_BLOCK_PARAMS = (
    "gate.weight", "experts.gate_up_proj", "experts.down_proj", "shared_expert.gate_proj.weight",
    "shared_expert.up_proj.weight", "shared_expert.down_proj.weight", "shared_expert_gate.weight",
)


@dataclasses.dataclass
class MoeMatch:
    layer: int
    x: fx.Node  # [tokens, hidden], the input of the shared expert
    weights: dict[str, fx.Node]  # the fused op's weight arguments, by name
    top_k: int
    norm_topk_prob: bool
    act: str  # the experts' activation (ops.ACTIVATIONS)
    indices: fx.Node  # topk's index output, which may have users outside the block
    region: set[fx.Node]  # the traced block's nodes, replaced by the fused op (erased once unused)
    out: fx.Node


def _strip_views(node):
    while is_op(node, *_VIEWS):
        node = node.args[0]
    return node


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_op(u, aten._assert_tensor_metadata.default)]


def _bias_free_linear(node) -> bool:
    return is_op(node, aten.linear.default) and arg(node, 2, "bias") is None


def _linear_of(node, x_root) -> fx.Node | None:
    """The weight of ``node = linear(x, weight)`` (no bias) when x is a view of ``x_root``."""
    if not _bias_free_linear(node) or _strip_views(node.args[0]) is not x_root:
        return None
    return node.args[1]


class FuseMoe(GraphPass):
    name = "fuse_moe"
    anchor = aten.topk.default

    def __call__(self, ctx: PassContext) -> PassReport:
        self._fused_layers: list[int] = []
        report = super().__call__(ctx)
        # Every layer the config makes sparse must be fused: backends have no lowering for the traced
        # block (its grouped matmuls are a transformers custom op), and a block left unfused is one
        # this pass did not recognise, so compiling it would risk a silently wrong engine.
        unfused = sorted(set(moe_layers(ctx.config)) - set(self._fused_layers))
        if unfused:
            reasons = "; ".join(str(m) for m in report.misses) or "no router (softmax + topk) was found"
            raise UnsupportedModelError(
                f"qwen2c cannot compile the MoE block of layer(s) {unfused}: {reasons}. The fused MoE op computes "
                "the Qwen2-MoE block (softmax top-k router, gated-MLP experts, sigmoid-gated shared expert); a block "
                "that differs is refused rather than compiled into a wrong engine."
            )
        return report

    def rewrite(self, graph: fx.Graph, node: fx.Node, m: MoeMatch, ctx: PassContext) -> None:
        w = m.weights
        with graph.inserting_before(m.out):
            fused = call(
                graph, torch.ops.qwen2c.fused_moe.default, m.x, w["router"], w["gate_up"], w["down"],
                w["shared_gate"], w["shared_up"], w["shared_down"], w["shared_expert_gate"],
                m.top_k, m.norm_topk_prob, m.act, like=m.out,
            )
            out = call(graph, operator.getitem, fused, 0, like=m.out)
            experts = call(graph, operator.getitem, fused, 1, like=m.out)
        m.out.replace_all_uses_with(out)
        # The routing stays observable (e.g. as a program output); the block's own uses go away.
        m.indices.replace_all_uses_with(experts, delete_user_cb=lambda user: user not in m.region)
        # Erase the traced block explicitly: its index_put_ is in-place, so DCE would keep it (and
        # the router feeding it) alive.
        checks = {u for n in m.region for u in n.users if is_op(u, aten._assert_tensor_metadata.default)}
        for dead in reversed(list(graph.nodes)):
            if (dead in m.region or dead in checks) and not dead.users:
                graph.erase_node(dead)
        self._fused_layers.append(m.layer)

    def match(self, node: fx.Node, ctx: PassContext) -> MoeMatch | Miss:
        miss = lambda reason: Miss(node.name, reason)  # noqa: E731
        # --- router: topk(softmax(linear(x, W_router), float32), k) ---
        probs = node.args[0]
        k = node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
        largest = node.args[3] if len(node.args) > 3 else node.kwargs.get("largest", True)
        if not is_op(probs, *_SOFTMAX) or dim not in (-1, probs.meta["val"].dim() - 1) or not largest:
            return miss(f"topk input {probs} is not a softmax over experts taking the largest")
        if probs.meta["val"].dtype != torch.float32:
            return miss("router softmax is not computed in float32")
        logits = probs.args[0]
        if not _bias_free_linear(logits):
            return miss(f"router logits {logits} are not a bias-free linear layer")
        x_root = _strip_views(logits.args[0])
        router = logits.args[1]
        name = _param_name(ctx, router)
        found = _ROUTER_NAME.search(name or "")
        if found is None:
            return miss(f"router weight {router} ({name}) is not a layers.N.mlp.gate.weight parameter")
        layer = int(found.group(1))
        miss = lambda reason: Miss(f"layer {layer} ({node.name})", reason)  # noqa: E731
        if layer not in moe_layers(ctx.config):
            return miss(f"layer {layer} routes, but the config (decoder_sparse_step, mlp_only_layers) makes it dense")
        if k != ctx.config.num_experts_per_tok:
            return miss(f"top-{k} routing, but the config's num_experts_per_tok is {ctx.config.num_experts_per_tok}")
        outs = {u.args[1]: u for u in node.users if is_op(u, operator.getitem)}
        if set(outs) != {0, 1}:
            return miss("topk's values and indices are not both used")
        values, indices = outs[0], outs[1]
        norm = any(is_op(u, *_DIV) and u.args[0] is values and _is_sum_last(u.args[1], values) for u in _users(values))
        if norm != bool(getattr(ctx.config, "norm_topk_prob", False)):
            return miss(f"the graph {'renormalises' if norm else 'does not renormalise'} the top-k weights, "
                        f"but the config's norm_topk_prob is {ctx.config.norm_topk_prob}")

        # --- shared expert and its gate, found from the parameters of this layer ---
        prefix = name[: -len("gate.weight")]
        params = _layer_params(ctx, prefix)
        missing = [p for p in _BLOCK_PARAMS if p not in params]
        if missing:
            return miss(f"the block has no {missing[0]} parameter (not a Qwen2-MoE sparse block)")
        extra = sorted(set(params) - set(_BLOCK_PARAMS))
        if extra:
            return miss(f"the block has parameters the fused op does not compute: {extra}")
        gate_logit = _single_user(params["shared_expert_gate.weight"])
        if _linear_of(gate_logit, x_root) is None:
            return miss("the shared-expert gate is not linear(x, shared_expert_gate) on the block input")
        sig = _single_user(gate_logit)
        gated = _single_user(sig) if is_op(sig, aten.sigmoid.default) else None
        if not is_op(gated, aten.mul.Tensor):
            return miss("the shared-expert gate is not sigmoid(...) * shared_expert(x)")
        shared = gated.args[1] if gated.args[0] is sig else gated.args[0]
        act = _check_gated_mlp(shared, x_root, params)
        if act.startswith("!"):
            return miss(f"shared expert: {act[1:]}")
        out = _single_user(gated)
        if not is_op(out, aten.add.Tensor):
            return miss("the gated shared expert is not added to the routed experts' output")
        routed = out.args[0] if out.args[1] is gated else out.args[1]

        # --- the routed experts, checked by what they are made of ---
        boundary = {x_root, values, indices, *params.values()}
        region, problem = _expert_region(routed, boundary, x_root, params, act)
        if problem:
            return miss(f"routed experts: {problem}")
        reached = region | {routed}
        if not any(indices in n.all_input_nodes for n in reached):
            return miss("the routed experts' output does not depend on the router's choice")
        if not any(values in n.all_input_nodes for n in reached):
            return miss("the routed experts' output is not weighted by the router")
        x = gate_logit.args[0]
        if x.meta["val"].dim() != 2:
            return miss("the block input is not a [tokens, hidden] matrix")
        weights = {
            "router": router, "gate_up": params["experts.gate_up_proj"], "down": params["experts.down_proj"],
            "shared_gate": params["shared_expert.gate_proj.weight"], "shared_up": params["shared_expert.up_proj.weight"],
            "shared_down": params["shared_expert.down_proj.weight"],
            "shared_expert_gate": params["shared_expert_gate.weight"],
        }
        problem = _check_shapes(weights)
        if problem:
            return miss(problem)
        router_nodes = {logits, probs, node, values, indices, *_users(values)}
        return MoeMatch(layer, x, weights, k, norm, act, indices, region | router_nodes | {gated, sig, gate_logit, out}, out)


def _param_name(ctx: PassContext, node) -> str | None:
    if not isinstance(node, fx.Node) or node.op != "placeholder":
        return None
    for spec in ctx.program.graph_signature.input_specs:
        if spec.arg.name == node.name:
            return spec.target
    return None


def _layer_params(ctx: PassContext, prefix: str) -> dict[str, fx.Node]:
    """This block's parameters, keyed by their name inside the block (e.g. 'experts.down_proj')."""
    by_name = {spec.arg.name: spec.target for spec in ctx.program.graph_signature.input_specs if spec.target}
    out = {}
    for node in ctx.program.graph_module.graph.nodes:
        target = by_name.get(node.name) if node.op == "placeholder" else None
        if target and target.startswith(prefix):
            out[target[len(prefix):]] = node
    return out


def _single_user(node: fx.Node) -> fx.Node | None:
    users = _users(node)
    return users[0] if len(users) == 1 else None


def _is_sum_last(node, of: fx.Node) -> bool:
    return is_op(node, aten.sum.dim_IntList) and node.args[0] is of and list(node.args[1]) in ([-1], [1])


def traced_activation(node) -> str | None:
    """The name (``ops.ACTIVATIONS``) of the activation ``node`` computes, if it is one of them."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    name = _ACTIVATION_OPS.get(op_name(node))
    if name == "gelu" and arg(node, 1, "approximate", "none") == "tanh":
        return "gelu_tanh"
    if name == "gelu" and arg(node, 1, "approximate", "none") != "none":
        return None
    return name


def _check_gated_mlp(shared: fx.Node, x_root: fx.Node, params: dict[str, fx.Node]) -> str:
    """The activation of ``down(act(gate(x)) * up(x))``; else "!" and what is wrong."""
    if not _bias_free_linear(shared) or shared.args[1] is not params["shared_expert.down_proj.weight"]:
        return f"!its output {shared} is not down_proj(...) without bias"
    product = shared.args[0]
    if not is_op(product, aten.mul.Tensor):
        return f"!{product} is not act(gate_proj(x)) * up_proj(x)"
    act = next((a for a in product.args if traced_activation(a)), None)
    up = next((a for a in product.args if a is not act), None)
    if act is None:
        return f"!its activation ({', '.join(str(a) for a in product.args)}) is not one of {sorted(_ACTIVATION_OPS)}"
    if _linear_of(act.args[0], x_root) is not params["shared_expert.gate_proj.weight"]:
        return f"!{act} is not applied to gate_proj(x)"
    if _linear_of(up, x_root) is not params["shared_expert.up_proj.weight"]:
        return "!the gated product's other factor is not up_proj(x)"
    return traced_activation(act)


def _expert_region(routed: fx.Node, boundary: set[fx.Node], x_root, params, act: str) -> tuple[set[fx.Node], str | None]:
    """The nodes computing ``routed`` from the boundary, and what is wrong with them, if anything."""
    region: set[fx.Node] = set()
    todo = [routed]
    while todo:
        n = todo.pop()
        if n in region or n in boundary:
            continue
        if n.op == "placeholder":
            return region, f"reads {n.name}, which is not one of this block's expert weights"
        if n.op != "call_function":
            return region, f"contains {n.op} {n.name}"
        if is_op(n, aten.sym_size.int):
            continue  # a shape read; its input is not part of the block
        region.add(n)
        todo.extend(n.all_input_nodes)
    names = {n: op_name(n) for n in region}
    grouped = [n for n, name in names.items() if name in _GROUPED_MM_NAMES]
    acts = [n for n in region if traced_activation(n)]
    other = sorted({name for n, name in names.items()
                    if name not in _EXPERT_PLUMBING and n not in grouped and n not in acts})
    if other:
        return region, f"uses {', '.join(other)}, which the fused MoE op does not compute"
    if len(grouped) != 2:
        return region, f"has {len(grouped)} grouped matmuls, expected 2 (gate_up and down)"
    reads = [_strip_transpose(g.args[1]) for g in grouped]
    if {*reads} != {params["experts.gate_up_proj"], params["experts.down_proj"]}:
        return region, "its grouped matmuls do not read this block's gate_up_proj and down_proj"
    first = grouped[reads.index(params["experts.gate_up_proj"])]
    if len(acts) != 1:
        return region, f"has {len(acts)} activations, expected 1"
    if traced_activation(acts[0]) != act:
        return region, f"its activation {traced_activation(acts[0])} differs from the shared expert's {act}"
    problem = _check_expert_gated(acts[0], first)
    if problem:
        return region, problem
    # The experts' tokens are gathered from the block's own input.
    if not any(_strip_views(a) is x_root for n in region for a in n.all_input_nodes):
        return region, "its tokens are not gathered from the block input"
    return region, None


def _strip_transpose(node):
    while is_op(node, aten.transpose.int, aten.t.default, aten.permute.default, *_CASTS):
        node = node.args[0]
    return node


def _check_expert_gated(act: fx.Node, gate_up: fx.Node) -> str | None:
    """act(first half of gate_up(x)) * second half: the gate rows come first in gate_up_proj."""
    half = act.args[0]
    chunk = half.args[0] if is_op(half, operator.getitem) else None
    if not is_op(chunk, aten.chunk.default) or chunk.args[0] is not gate_up or half.args[1] != 0 or chunk.args[1] != 2:
        return f"{act} is not applied to the first half of the gate_up projection"
    if arg(chunk, 2, "dim", 0) not in (-1, 1):
        return "the gate_up projection is not split along its features"
    product = _single_user(act)
    other = None
    if is_op(product, aten.mul.Tensor):
        other = product.args[1] if product.args[0] is act else product.args[0]
    if not (is_op(other, operator.getitem) and other.args[0] is chunk and other.args[1] == 1):
        return "the activation is not multiplied by the second half of the gate_up projection (a gated MLP)"
    return None


def _check_shapes(w: dict[str, fx.Node]) -> str | None:
    shape = {k: tuple(v.meta["val"].shape) for k, v in w.items()}
    experts, hidden = shape["router"]
    e2, two_inter, h2 = shape["gate_up"]
    inter = two_inter // 2
    expected = {
        "gate_up": (experts, 2 * inter, hidden), "down": (experts, hidden, inter),
        "shared_expert_gate": (1, hidden),
    }
    shared_inter = shape["shared_gate"][0]
    expected.update(shared_gate=(shared_inter, hidden), shared_up=(shared_inter, hidden),
                    shared_down=(hidden, shared_inter))
    for key, want in expected.items():
        if shape[key] != want:
            return f"{key} weight has shape {list(shape[key])}, expected {list(want)}"
    return None
