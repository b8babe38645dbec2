"""The fused ops that graph passes introduce, as PyTorch custom ops.

Each op has an eager reference implementation, so a rewritten ExportedProgram still runs in
PyTorch and every pass can be checked numerically against the unrewritten program. Backends give
each op its own lowering (TVM: ``targets/tvm/lower_ops.py``).

The ops are registered when this module is imported; importing ``qwen2c.graphs`` does that.
"""

from __future__ import annotations

import torch

__all__ = ["fused_attention", "fused_rms_norm", "rope_cos_sin", "rope_inv_freq"]


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Default (unscaled) RoPE inverse frequencies, computed exactly as transformers does."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (theta**exponent)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.to(torch.float32)[:, None] * rope_inv_freq(head_dim, theta)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@torch.library.custom_op("qwen2c::fused_attention", mutates_args=())
def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, rope_theta: float, scale: float
) -> torch.Tensor:
    """Causal attention of new tokens over everything the sequence has seen, RoPE included.

    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim], before RoPE.
    Returns [batch, seq, q_heads, head_dim]. ``layer`` names the KV-cache slot a backend uses;
    the eager reference has no cache, so the sequence is the whole prompt (positions 0..seq-1).
    """
    _, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    cos, sin = rope_cos_sin(torch.arange(seq), head_dim, rope_theta)
    cos, sin = cos.to(q.dtype)[None, :, None, :], sin.to(q.dtype)[None, :, None, :]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    group = q_heads // kv_heads
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale
    )
    return out.transpose(1, 2).contiguous()


@fused_attention.register_fake
def _(q, k, v, layer, rope_theta, scale):
    return torch.empty_like(q)


@torch.library.custom_op("qwen2c::fused_rms_norm", mutates_args=())
def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm: normalise in float32, cast back to x's dtype, scale by weight."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@fused_rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
