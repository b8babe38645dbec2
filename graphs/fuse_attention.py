"""Fuse Qwen2 self-attention into ``qwen2c::fused_attention``.

Matches, around each ``aten.scaled_dot_product_attention``:
q/k RoPE (``x*cos + rotate_half(x)*sin``), the GQA repeat of k/v (unsqueeze/expand/reshape),
and the causal mask plumbing, and replaces them with one op whose meaning is "causal attention of
these tokens over everything the sequence has seen". The mask and cos/sin computations become
dead and are removed. After this pass no mask remains in the graph: the backend owns positions
and the KV cache.

The fused op carries the model's RoPE as the trace holds it: the rotary ``inv_freq`` buffer
(transformers computed it for the RoPE type: default, linear, YaRN, llama3, ...) and the constant
cos and sin are multiplied by (the type's attention factor, YaRN's mscale). A layer that
transformers makes a sliding-window layer (``layer_types``) gets the config's ``sliding_window``.

Preconditions: the program was exported from transformers' Qwen2 (or Qwen2-MoE) attention.
Runs before ``fuse_rms_norm`` (independent of it).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import fx

from qwen2c.model_config import sliding_window

from .pass_base import GraphPass, Miss, PassContext, aten, ancestors, arg, call, is_op

_TRANSPOSE = (aten.transpose.int,)
_RESHAPE = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


@dataclasses.dataclass
class AttentionMatch:
    q: fx.Node  # [b, s, hq, d] before RoPE
    k: fx.Node  # [b, s, hkv, d] before RoPE
    v: fx.Node  # [b, s, hkv, d]
    inv_freq: fx.Node  # the rotary embedding's [d / 2] buffer
    attention_scaling: float  # what cos and sin are multiplied by
    scale: float


def _rope_input(node: fx.Node) -> fx.Node | str:
    """x for ``x*cos + cat(-x[..., h:], x[..., :h])*sin``; else the reason it is not RoPE."""
    if not is_op(node, aten.add.Tensor):
        return f"expected the RoPE add, found {node}"
    for plain, rotated in (node.args, node.args[::-1]):
        if not (is_op(plain, aten.mul.Tensor) and is_op(rotated, aten.mul.Tensor)):
            continue
        cat = next((a for a in rotated.args if is_op(a, aten.cat.default)), None)
        if cat is None or len(cat.args[0]) != 2:
            continue
        neg, low = cat.args[0]
        if not (is_op(neg, aten.neg.default) and is_op(low, aten.slice.Tensor)):
            continue
        high = neg.args[0]
        if not is_op(high, aten.slice.Tensor):
            continue
        x = low.args[0]
        if high.args[0] is not x or x not in plain.args:
            continue
        half = x.meta["val"].shape[-1] // 2
        if low.args[1:4] != (3, 0, half) or tuple(high.args[1:3]) != (3, half):
            return f"rotate_half slices {low.args[1:]} / {high.args[1:]} do not split head_dim in half"
        return x
    return f"{node} is not x*cos + rotate_half(x)*sin"


def _rope_tables(q_rope: fx.Node, ctx: PassContext, head_dim: int) -> tuple[fx.Node, float] | str:
    """The inv_freq buffer and the cos/sin scaling behind ``q_rope``'s RoPE; else why not found.

    transformers: ``cos = cat(f, f).cos() * attention_scaling`` with ``f = positions * inv_freq``
    (sin alike), cast to the activations' dtype.
    """
    nodes = ancestors(q_rope)
    trig = {op: [n for n in nodes if is_op(n, op)] for op in (aten.cos.default, aten.sin.default)}
    if any(len(found) != 1 for found in trig.values()):
        return "RoPE's cos/sin tables are not one cos and one sin of the rotary angles"
    scales = []
    for (found,) in trig.values():
        users = list(found.users)
        if len(users) != 1 or not is_op(users[0], aten.mul.Tensor) or not isinstance(users[0].args[1], (int, float)):
            return f"{found} is not scaled by a constant (transformers multiplies cos and sin by attention_scaling)"
        scales.append(float(users[0].args[1]))
    if scales[0] != scales[1]:
        return f"cos and sin are scaled differently ({scales[0]} vs {scales[1]})"
    buffers = [n for n in ancestors(trig[aten.cos.default][0]) if n.name.endswith("inv_freq")
               and ctx.placeholder_tensor(n) is not None]
    if len(buffers) != 1:
        return f"expected one rotary inv_freq buffer behind RoPE's angles, found {[n.name for n in buffers]}"
    if tuple(buffers[0].meta["val"].shape) != (head_dim // 2,):
        return f"inv_freq has shape {list(buffers[0].meta['val'].shape)}, not [{head_dim // 2}] (partial rotary?)"
    return buffers[0], scales[0]


def _unrepeat(node: fx.Node, group: int) -> fx.Node | str:
    """Undo transformers' repeat_kv: reshape(expand(unsqueeze(x, 2))) -> x."""
    if group == 1:
        return node
    if not is_op(node, *_RESHAPE):
        return f"expected repeat_kv's reshape, found {node}"
    expand = node.args[0]
    if not is_op(expand, aten.expand.default) or not is_op(expand.args[0], aten.unsqueeze.default):
        return f"expected repeat_kv's expand(unsqueeze(...)), found {expand}"
    if expand.args[0].args[1] != 2 or expand.args[1][2] != group:
        return f"repeat_kv repeats {expand.args[1][2]} times, the head ratio is {group}"
    return expand.args[0].args[0]


def _bshd(graph: fx.Graph, x: fx.Node, like: fx.Node) -> fx.Node:
    """[b, h, s, d] -> [b, s, h, d], reusing the projection's view when x is its transpose."""
    if is_op(x, *_TRANSPOSE) and tuple(x.args[1:]) in ((1, 2), (2, 1)):
        return x.args[0]
    return call(graph, aten.transpose.int, x, 1, 2, like=like)


class FuseAttention(GraphPass):
    name = "fuse_attention"
    anchor = aten.scaled_dot_product_attention.default

    def match(self, node: fx.Node, ctx: PassContext) -> AttentionMatch | Miss:
        q, k, v = node.args[:3]
        miss = lambda reason: Miss(node.name, reason)  # noqa: E731
        if arg(node, 4, "dropout_p", 0.0) != 0.0:
            return miss(f"dropout_p={arg(node, 4, 'dropout_p')} (inference graphs have none)")
        mask, is_causal = arg(node, 3, "attn_mask"), arg(node, 5, "is_causal", False)
        if mask is None and not is_causal:
            return miss("neither a causal mask nor is_causal=True: not causal self-attention")
        if mask is not None:
            # Causal mask plumbing depends on the sequence length only, never on a user tensor.
            inputs = {mask} | ancestors(mask, stop=lambda n: is_op(n, aten.sym_size.int))
            tainted = [n.name for n in inputs if n.op == "placeholder" and ctx.is_user_input(n)
                       and not any(is_op(u, aten.sym_size.int) for u in n.users if u in inputs)]
            if tainted:
                return miss(f"the attention mask depends on user input {tainted}: not a causal mask")

        q_heads, head_dim = q.meta["val"].shape[1], q.meta["val"].shape[3]
        repeated = k.meta["val"].shape[1] == q_heads and not arg(node, 7, "enable_gqa", False)
        group = q_heads // ctx.config.num_key_value_heads if repeated else 1
        k_roped = _unrepeat(k, group)
        v_plain = _unrepeat(v, group)
        q_plain = _rope_input(q)
        k_plain = _rope_input(k_roped) if isinstance(k_roped, fx.Node) else k_roped
        for found in (k_roped, v_plain, q_plain, k_plain):
            if isinstance(found, str):
                return miss(found)
        kv_heads = k_plain.meta["val"].shape[1]
        if q_heads % kv_heads:
            return miss(f"{q_heads} query heads do not divide into {kv_heads} kv heads")

        rope = _rope_tables(q, ctx, head_dim)
        if isinstance(rope, str):
            return miss(rope)
        scale = arg(node, 6, "scale")
        return AttentionMatch(q_plain, k_plain, v_plain, *rope, 1.0 / math.sqrt(head_dim) if scale is None else scale)

    def rewrite(self, graph: fx.Graph, node: fx.Node, m: AttentionMatch, ctx: PassContext) -> None:
        with graph.inserting_before(node):
            q, k, v = (_bshd(graph, x, node) for x in (m.q, m.k, m.v))
            layer = sum(1 for n in graph.nodes if is_op(n, torch.ops.qwen2c.fused_attention.default))
            fused = call(graph, torch.ops.qwen2c.fused_attention.default, q, k, v, m.inv_freq, layer,
                         m.attention_scaling, float(m.scale), sliding_window(ctx.config, layer), like=node)
            out = call(graph, aten.transpose.int, fused, 1, 2, like=node)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
