"""Fuse RMSNorm (``w * (x * rsqrt(mean(x^2) + eps)).to(dtype)``) into ``qwen2c::fused_rms_norm``.

Anchored on ``rsqrt``. Matches the shape transformers' Qwen2RMSNorm traces to: an optional cast to
float32, pow 2, mean over the last dim (keepdim), add eps, rsqrt, multiply, optional cast back,
multiply by a 1-D weight of the last dim's size. Independent of the other passes.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from .pass_base import GraphPass, Miss, PassContext, aten, call, is_op

_CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout)


@dataclasses.dataclass
class RmsNormMatch:
    x: fx.Node
    weight: fx.Node
    eps: float
    out: fx.Node


def _only_user(node: fx.Node) -> fx.Node | None:
    users = [u for u in node.users if not is_op(u, aten._assert_tensor_metadata.default)]
    return users[0] if len(users) == 1 else None


class FuseRmsNorm(GraphPass):
    name = "fuse_rms_norm"
    anchor = aten.rsqrt.default

    def match(self, node: fx.Node, ctx: PassContext) -> RmsNormMatch | Miss:
        miss = lambda reason: Miss(node.name, reason)  # noqa: E731
        add = node.args[0]
        if not is_op(add, aten.add.Tensor, aten.add.Scalar) or not isinstance(add.args[1], float):
            return miss(f"rsqrt input {add} is not mean + eps")
        mean = add.args[0]
        if not is_op(mean, aten.mean.dim) or list(mean.args[1]) not in ([-1], [mean.meta["val"].dim() - 1]):
            return miss(f"{mean} is not a mean over the last dim")
        if not (len(mean.args) > 2 and mean.args[2]) and not mean.kwargs.get("keepdim"):
            return miss(f"{mean} drops the reduced dim")
        square = mean.args[0]
        if not is_op(square, aten.pow.Tensor_Scalar) or square.args[1] != 2:
            return miss(f"{square} is not x ** 2")
        h = square.args[0]
        scaled = _only_user(node)
        if not is_op(scaled, aten.mul.Tensor) or h not in scaled.args:
            return miss("rsqrt does not scale the squared input")
        normed = scaled
        out = _only_user(scaled)
        if is_op(out, *_CASTS):
            normed, out = out, _only_user(out)
        if not is_op(out, aten.mul.Tensor) or normed not in out.args:
            return miss(f"normalised value is not multiplied by a weight ({out})")
        weight = out.args[1] if out.args[0] is normed else out.args[0]
        hidden = h.meta["val"].shape[-1]
        if not isinstance(weight, fx.Node) or tuple(weight.meta["val"].shape) != (hidden,):
            return miss(f"weight {weight} is not a 1-D tensor of size {hidden}")
        x = h.args[0] if is_op(h, *_CASTS) else h
        return RmsNormMatch(x, weight, float(add.args[1]), out)

    def rewrite(self, graph: fx.Graph, node: fx.Node, m: RmsNormMatch, ctx: PassContext) -> None:
        with graph.inserting_before(m.out):
            fused = call(graph, torch.ops.qwen2c.fused_rms_norm.default, m.x, m.weight, m.eps, like=m.out)
        m.out.replace_all_uses_with(fused)

