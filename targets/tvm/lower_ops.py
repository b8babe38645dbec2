"""Lower qwen2c's fused ops to Relax while importing the rewritten ExportedProgram.

``fused_attention`` becomes a call into the KV cache that the engine owns: the cache applies RoPE
at each token's position, appends k/v to its pages, and attends over everything the sequence has
seen. One traced graph therefore serves prefill (seq = prompt length) and decode (seq = 1).
"""

from __future__ import annotations

from typing import Callable

from tvm import relax
from torch import fx

KV_ATTENTION = "vm.builtin.attention_kv_cache_attention_with_fused_qkv"

ConvertMap = dict[str, Callable[[fx.Node, object], relax.Var]]


def convert_map(kv_cache: relax.Var) -> ConvertMap:
    """Converters for the qwen2c ops, keyed as TVM's importer names call targets."""

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

    return {"fused_attention.default": attention, "fused_rms_norm.default": rms_norm}
