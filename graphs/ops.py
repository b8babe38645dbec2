"""The fused ops that graph passes introduce, as PyTorch custom ops.

Each op has an eager reference implementation, so a rewritten ExportedProgram still runs in
PyTorch and every pass can be checked numerically against the unrewritten program. Backends give
each op its own lowering (TVM: ``targets/tvm/lower_ops.py``).

The ops are registered when this module is imported; importing ``qwen2c.graphs`` does that.
"""

from __future__ import annotations

import torch

__all__ = ["ACTIVATIONS", "activation", "cached_attention", "fused_attention", "fused_moe", "fused_rms_norm", "moe_route",
           "rope_cos_sin"]


# Activations a fused MoE block's experts may use, by the name its traced op gives (see
# ``fuse_moe.traced_activation``): transformers' ACT2FN silu, gelu, gelu_pytorch_tanh, relu.
ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.relu,
}


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    return ACTIVATIONS[name](x)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype):
    """cos/sin tables as transformers' rotary embedding computes them: float32 angles (position x
    inv_freq), both halves alike, scaled by the RoPE type's attention factor (YaRN's mscale), then
    cast to the activations' dtype."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@torch.library.custom_op("qwen2c::fused_attention", mutates_args=())
def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor, layer: int,
    attention_scaling: float, scale: float, sliding_window: int,
) -> torch.Tensor:
    """Causal attention of new tokens over everything the sequence has seen, RoPE included.

    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim], before RoPE.
    ``inv_freq`` [head_dim / 2] and ``attention_scaling`` are the model's RoPE (any scaling type is
    already in them); ``sliding_window`` > 0 limits each query to that many latest keys (its own
    included), as transformers' sliding layers do. Returns [batch, seq, q_heads, head_dim].
    ``layer`` names the KV-cache slot a backend uses; the eager reference has no cache, so the
    sequence is the whole prompt (positions 0..seq-1).
    """
    _, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    cos, sin = rope_cos_sin(torch.arange(seq), inv_freq, attention_scaling, q.dtype)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    group = q_heads // kv_heads
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    pos = torch.arange(seq)
    visible = pos[None, :] <= pos[:, None]
    if sliding_window > 0:
        visible &= pos[None, :] > pos[:, None] - sliding_window
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=visible, scale=scale
    )
    return out.transpose(1, 2).contiguous()


@fused_attention.register_fake
def _(q, k, v, inv_freq, layer, attention_scaling, scale, sliding_window):
    return torch.empty_like(q)


@torch.library.custom_op("qwen2c::cached_attention", mutates_args=())
def cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fused_attention`` with its KV cache as explicit tensors (for backends whose graphs carry the
    cache as inputs and outputs, e.g. ONNX's past/present key-values).

    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim], before RoPE;
    past_key/past_value: [batch, kv_heads, past, head_dim] (keys already rotated); cos/sin:
    [max_positions, head_dim / 2], the RoPE tables in q's dtype. The new tokens sit at positions
    past..past+seq-1. Returns the attention output [batch, seq, q_heads, head_dim] and the
    present key/value [batch, kv_heads, past + seq, head_dim].
    """
    _, seq, q_heads, _ = q.shape
    kv_heads, past = k.shape[2], past_key.shape[2]
    c = torch.cat([cos[past:past + seq]] * 2, dim=-1)[None, :, None, :]
    s = torch.cat([sin[past:past + seq]] * 2, dim=-1)[None, :, None, :]
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    present_key = torch.cat([past_key, k.transpose(1, 2)], dim=2)
    present_value = torch.cat([past_value, v.transpose(1, 2)], dim=2)
    group = q_heads // kv_heads
    keys = present_key.repeat_interleave(group, dim=1)
    values = present_value.repeat_interleave(group, dim=1)
    # Query i (absolute position past+i) sees keys 0..past+i.
    mask = torch.ones(seq, past + seq, dtype=torch.bool).tril(diagonal=past)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).contiguous(), present_key, present_value


@cached_attention.register_fake
def _(q, k, v, past_key, past_value, cos, sin, scale):
    batch, seq, _, head_dim = q.shape
    present = (batch, k.shape[2], past_key.shape[2] + seq, head_dim)
    return torch.empty_like(q), q.new_empty(present), q.new_empty(present)


@torch.library.custom_op("qwen2c::fused_rms_norm", mutates_args=())
def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm: normalise in float32, cast back to x's dtype, scale by weight."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@fused_rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)


def moe_route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-MoE routing: softmax in float32, the top_k experts, optionally renormalised weights."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), experts


@torch.library.custom_op("qwen2c::fused_moe", mutates_args=())
def fused_moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    shared_gate_proj: torch.Tensor,
    shared_up_proj: torch.Tensor,
    shared_down_proj: torch.Tensor,
    shared_expert_gate: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Qwen2-MoE sparse block: routed gated-MLP experts plus a sigmoid-gated shared expert.

    x: [tokens, hidden]; router_weight: [experts, hidden]; gate_up_proj: [experts, 2 * inter, hidden]
    (gate rows first); down_proj: [experts, hidden, inter]; shared_*: a SwiGLU MLP in nn.Linear
    layout; shared_expert_gate: [1, hidden]; ``act``: the experts' activation (``ACTIVATIONS``),
    ``act(gate) * up`` (SwiGLU with silu). Returns the block output [tokens, hidden] and the
    experts each token was routed to, [tokens, top_k] int64, highest weight first.
    """
    linear = torch.nn.functional.linear
    weights, experts = moe_route(linear(x, router_weight), top_k, norm_topk_prob)
    out = torch.zeros_like(x)
    # Each expert runs once, on the tokens routed to it (as the compiled engines do).
    for e in experts.unique().tolist():
        token, slot = (experts == e).nonzero(as_tuple=True)
        gate, up = linear(x[token], gate_up_proj[e]).chunk(2, dim=-1)
        y = linear(activation(act, gate) * up, down_proj[e]) * weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    shared = linear(activation(act, linear(x, shared_gate_proj)) * linear(x, shared_up_proj), shared_down_proj)
    return out + torch.sigmoid(linear(x, shared_expert_gate)) * shared, experts


@fused_moe.register_fake
def _(x, router_weight, gate_up_proj, down_proj, shared_gate_proj, shared_up_proj, shared_down_proj,
      shared_expert_gate, top_k, norm_topk_prob, act):
    return torch.empty_like(x), x.new_empty((x.shape[0], top_k), dtype=torch.int64)
