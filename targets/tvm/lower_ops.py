"""Lower qwen2c's fused ops, and linear layers, to Relax while importing the rewritten program.

Nothing here depends on the target: kernels are chosen later, by the pipeline of the target's
device kind (``pipelines/``).

``fused_attention`` becomes a call into the KV cache that the engine owns: the cache applies RoPE
at each token's position, appends k/v to its pages, and attends over everything the sequence has
seen (a sliding layer: over its window). One traced graph therefore serves prefill (seq = prompt
length) and decode (seq = 1). The op's RoPE tables and windows are the cache's, made when it is
created (``relax_module.py`` records them, ``pipelines/add_kv_cache_creation.py`` builds it).

``fused_rms_norm`` becomes the abstract kernel "rms_norm" (float32 sums whatever the dtype, as
transformers' Qwen2RMSNorm does; one kernel, so half-precision inputs need no cast kernels).

``linear`` is ``matmul(x, permute_dims(W))`` in the input's dtype (TVM's own converter asks for a
float32 result whatever the inputs, which breaks half-precision graphs).

``fused_moe`` becomes a sequence of abstract kernel calls (see ``lower_moe.py``).
"""

from __future__ import annotations

from typing import Callable

from tvm import relax
from torch import fx

from .lower_moe import MOE_DISPATCHES, lower_moe
from .pipelines.dispatch_kernels import kernel_call

KV_ATTENTION = "vm.builtin.attention_kv_cache_attention_with_fused_qkv"

ConvertMap = dict[str, Callable[[fx.Node, object], relax.Var]]


def emit_linear(bb: relax.BlockBuilder, x: relax.Expr, weight: relax.Expr, bias: relax.Expr | None = None):
    out = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(weight)), out_dtype=str(x.ty.dtype)))
    return out if bias is None else bb.emit(relax.op.add(out, bias))


def convert_map(kv_cache: relax.Var, moe_dispatch: str = "sparse", kv_cache_dtype: str | None = None) -> ConvertMap:
    """Converters for the qwen2c ops, keyed as TVM's importer names call targets. ``kv_cache_dtype``:
    the cache's element type, when it is not the activations' (None: theirs)."""
    if moe_dispatch not in MOE_DISPATCHES:
        raise ValueError(f"moe_dispatch must be one of {MOE_DISPATCHES}, got {moe_dispatch!r}")

    def attention(node: fx.Node, importer) -> relax.Var:
        bb = importer.block_builder
        q, k, v = (importer.env[a] for a in node.args[:3])
        # RoPE (args 3, 5) and the window (arg 7) are the cache's, set at its creation.
        layer, scale = node.args[4], node.args[6]
        batch, seq, q_heads, head_dim = q.ty.shape
        kv_heads = k.ty.shape[2]
        qkv = bb.emit(relax.op.concat([q, k, v], axis=2))
        qkv = bb.emit(relax.op.reshape(qkv, (batch * seq, q_heads + 2 * kv_heads, head_dim)))
        # The cache's kernels (RoPE, append, attention) work in its element type: q, k and v enter it
        # rounded to it, the output leaves it (the kernels accumulate in float32 either way).
        cache_dtype = kv_cache_dtype or str(q.ty.dtype)
        if cache_dtype != str(q.ty.dtype):
            qkv = bb.emit(relax.op.astype(qkv, cache_dtype))
        out = bb.emit(
            relax.call_dps_packed(
                KV_ATTENTION,
                [kv_cache, relax.prim_value(int(layer)), relax.prim_value(float(scale)), qkv],
                out_ty=relax.TensorType((batch * seq, q_heads, head_dim), cache_dtype),
            )
        )
        if cache_dtype != str(q.ty.dtype):
            out = bb.emit(relax.op.astype(out, q.ty.dtype))
        return bb.emit(relax.op.reshape(out, (batch, seq, q_heads, head_dim)))

    def rms_norm(node: fx.Node, importer) -> relax.Var:
        bb = importer.block_builder
        x, weight = importer.env[node.args[0]], importer.env[node.args[1]]
        *lead, hidden = x.ty.shape
        rows = 1
        for d in lead:
            rows = rows * d
        flat = bb.emit(relax.op.reshape(x, (rows, hidden)))
        out = kernel_call(bb, "rms_norm", [flat, weight], [float(node.args[2])], [((rows, hidden), x.ty.dtype)])
        return bb.emit(relax.op.reshape(out, x.ty.shape))

    def linear(node: fx.Node, importer) -> relax.Var:
        x, weight = importer.env[node.args[0]], importer.env[node.args[1]]
        bias = importer.env[node.args[2]] if len(node.args) > 2 and node.args[2] is not None else None
        return emit_linear(importer.block_builder, x, weight, bias)

    def moe(node: fx.Node, importer):
        bb = importer.block_builder
        return lower_moe(node, importer, lambda x, w: emit_linear(bb, x, w), moe_dispatch)

    return {"fused_attention.default": attention, "fused_rms_norm.default": rms_norm,
            "fused_moe.default": moe, "linear.default": linear}
