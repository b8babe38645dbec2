"""Lower qwen2c's fused ops to Relax while importing the rewritten ExportedProgram.

``fused_attention`` becomes a call into the KV cache that the engine owns: the cache applies RoPE
at each token's position, appends k/v to its pages, and attends over everything the sequence has
seen. One traced graph therefore serves prefill (seq = prompt length) and decode (seq = 1).

``fused_moe`` becomes qwen2c's grouped-expert kernels (see ``lower_moe.py``).
"""

from __future__ import annotations

from typing import Callable

from tvm import relax
from torch import fx

from .lower_moe import MOE_DISPATCHES, lower_moe

KV_ATTENTION = "vm.builtin.attention_kv_cache_attention_with_fused_qkv"

ConvertMap = dict[str, Callable[[fx.Node, object], relax.Var]]


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
        return lower_moe(node, importer, lambda make, *key: kernel(importer.block_builder, make, *key),
                         vector_lanes, moe_dispatch)

    return {"fused_attention.default": attention, "fused_rms_norm.default": rms_norm, "fused_moe.default": moe}
