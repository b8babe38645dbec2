"""onnxscript translations of qwen2c's fused ops: each becomes one ONNX node where an op exists for it.

Two op sets, because the two consumers of the export run different kernels:

- ``"onnxruntime"`` (the ONNX Runtime backend, and ``qwen2c export-onnx``'s default):
  * ``cached_attention`` -> ``com.microsoft::GroupQueryAttention`` with ``do_rotary=1`` and
    past/present key-values: one node does RoPE at each token's position, appends to the cache and
    runs causal grouped-query attention. It is the kernel ONNX Runtime's own LLM exports use, on CPU
    and CUDA. The standard opset-23 ``Attention`` has no rotary and aligns its causal mask to the
    upper left, so with a past it needs an explicit mask and two ``RotaryEmbedding`` nodes beside it.
  * ``fused_rms_norm`` -> opset-23 ``RMSNormalization`` (``stash_type=1``: float32 sums, as
    transformers); the ONNX Runtime backend then turns residual-add + norm pairs into
    ``SkipSimplifiedLayerNormalization`` with onnxscript's own fusion (``ort_graph.py``).
  * ``fused_moe`` -> ``com.microsoft::MoE`` (softmax routing, top-k, optional renormalisation and the
    SwiGLU experts in one node; no standard op exists), plus the shared expert as ordinary ops and a
    ``TopK`` over the router logits for the routing output the engines return.
- ``"standard"`` (what TensorRT's parser reads: no ONNX Runtime contrib ops for attention):
  ``cached_attention`` -> two opset-23 ``RotaryEmbedding`` (q and k), a ``Concat`` each onto the past
  key/value (the present outputs), and one opset-23 ``Attention`` over them with a 4-D boolean
  causal mask offset by the past length. Not one node: TensorRT 10.15's parser takes ``Attention``
  only without ``past_key``/``past_value`` inputs and ``present_*`` outputs, 4-D, and no ONNX op
  does rotary inside attention. RMSNorm as above. ``fused_moe`` has no standard op, so it stays
  ``com.microsoft::MoE`` (the TensorRT backend's operator check names it).

Translations are "trace-only" Python functions: they run once per node at export time, with the
node's static shapes and Python arguments (heads, top-k, scale) at hand.
"""

from __future__ import annotations

import torch
from onnxscript import opset23 as op

from .contrib_ops import contrib_op

OP_SETS = ("onnxruntime", "standard")


def _i64(*values: int):
    return op.Constant(value_ints=list(values))


def _heads(q, k) -> tuple[int, int, int]:
    q_heads, head_dim, kv_heads = q.shape[2], q.shape[3], k.shape[2]
    for what, n in (("query heads", q_heads), ("head_dim", head_dim), ("kv heads", kv_heads)):
        if not isinstance(n, int):
            raise ValueError(f"the attention's {what} must be static for the ONNX export, found {n}")
    return q_heads, kv_heads, head_dim


def gqa_attention(q, k, v, past_key, past_value, cos, sin, scale: float):
    """``qwen2c::cached_attention`` as one ``com.microsoft::GroupQueryAttention``."""
    q_heads, kv_heads, _ = _heads(q, k)
    flat = _i64(0, 0, -1)  # [b, s, h, d] -> [b, s, h * d]: the layout the op takes
    # seqlens_k is total length - 1 per sequence; total_sequence_length a scalar: both int32.
    total = op.Add(op.Shape(past_key, start=2, end=3), op.Shape(q, start=1, end=2))
    seqlens_k = op.Cast(op.Sub(total, _i64(1)), to=6)
    total_scalar = op.Cast(op.Squeeze(total, _i64(0)), to=6)
    out, present_key, present_value = contrib_op("GroupQueryAttention")(
        op.Reshape(q, flat), op.Reshape(k, flat), op.Reshape(v, flat), past_key, past_value, seqlens_k,
        total_scalar, cos, sin, num_heads=q_heads, kv_num_heads=kv_heads, scale=float(scale), do_rotary=1,
        rotary_interleaved=0)
    return op.Reshape(out, op.Shape(q)), present_key, present_value


def standard_attention(q, k, v, past_key, past_value, cos, sin, scale: float):
    """``qwen2c::cached_attention`` as opset-23 ``RotaryEmbedding`` x2, ``Concat`` x2, ``Attention``."""
    _heads(q, k)  # 4-D Attention reads the head counts from Q's and K's shapes
    past = op.Squeeze(op.Shape(past_key, start=2, end=3), _i64(0))
    seq = op.Squeeze(op.Shape(q, start=1, end=2), _i64(0))
    positions = op.Range(past, op.Add(past, seq), op.Constant(value_int=1))  # [s]: past .. past+s-1
    position_ids = op.Unsqueeze(positions, _i64(0))
    bhsd = [0, 2, 1, 3]  # 4-D RotaryEmbedding and Attention take [batch, heads, seq, head_dim]
    q = op.RotaryEmbedding(op.Transpose(q, perm=bhsd), cos, sin, position_ids, interleaved=0)
    k = op.RotaryEmbedding(op.Transpose(k, perm=bhsd), cos, sin, position_ids, interleaved=0)
    # Causal with a past: query at position past+i sees keys 0..past+i (Attention's is_causal aligns
    # to the upper left, which is right only without a past).
    keys = op.Range(op.Constant(value_int=0), op.Add(past, seq), op.Constant(value_int=1))
    mask = op.LessOrEqual(op.Unsqueeze(keys, _i64(0, 1, 2)), op.Unsqueeze(positions, _i64(0, 1, 3)))  # [1,1,s,past+s]
    present_key = op.Concat(past_key, k, axis=2)
    present_value = op.Concat(past_value, op.Transpose(v, perm=bhsd), axis=2)
    out, *_unused = op.Attention(q, present_key, present_value, mask, scale=float(scale), is_causal=0)
    return op.Transpose(out, perm=bhsd), present_key, present_value


def rms_norm(x, weight, eps: float):
    """``qwen2c::fused_rms_norm`` as opset-23 ``RMSNormalization`` over the last axis, float32 sums."""
    return op.RMSNormalization(x, weight, axis=-1, epsilon=float(eps), stash_type=1)


def _linear(x, weight):
    return op.Gemm(x, weight, transB=1)


def moe(x, router_weight, gate_up_proj, down_proj, shared_gate_proj, shared_up_proj, shared_down_proj,
        shared_expert_gate, top_k: int, norm_topk_prob: bool, act: str = "silu"):
    """``qwen2c::fused_moe`` as one ``com.microsoft::MoE`` for the routed experts, the shared expert
    in standard ops, and the routing (experts per token, highest first) as a second output. SwiGLU
    experts only (``act`` silu): ``kv_cache_graph.with_kv_cache`` refuses other activations first."""
    if act != "silu":
        raise ValueError(f"MoE experts with activation {act!r}: the ONNX MoE translation is SwiGLU (silu) only")
    logits = _linear(x, router_weight)
    # gate_up_proj is transformers' [experts, 2 * inter, hidden], gate rows first: swiglu_fusion=2
    # ("fused, not interleaved"); export.py then stores it interleaved for ONNX Runtime's kernels.
    # activation_alpha=1 and beta=0 make it silu(gate) * up exactly (ONNX Runtime's defaults are
    # GPT-OSS's 1.702 and 1).
    routed = contrib_op("MoE")(
        x, logits, gate_up_proj, None, down_proj, k=int(top_k), activation_type="swiglu", swiglu_fusion=2,
        activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=int(bool(norm_topk_prob)))
    gate = _linear(x, shared_gate_proj)
    hidden = op.Mul(op.Mul(gate, op.Sigmoid(gate)), _linear(x, shared_up_proj))
    shared = op.Mul(op.Sigmoid(_linear(x, shared_expert_gate)), _linear(hidden, shared_down_proj))
    # Softmax is monotonic: the top-k of the logits are the top-k of the probabilities.
    _, experts = op.TopK(logits, _i64(int(top_k)), axis=-1, largest=1, sorted=1)
    return op.Add(routed, shared), experts


def translation_table(op_set: str) -> dict:
    if op_set not in OP_SETS:
        raise ValueError(f"op set {op_set!r} must be one of {', '.join(OP_SETS)}")
    ops = torch.ops.qwen2c
    return {
        ops.cached_attention.default: gqa_attention if op_set == "onnxruntime" else standard_attention,
        ops.fused_rms_norm.default: rms_norm,
        ops.fused_moe.default: moe,
    }


