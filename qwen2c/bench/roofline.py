"""The arithmetic a prefill cannot avoid, from the model's config (the decode side, bytes read per
token, is each system's own: see ``runners.weight_bytes_per_token``)."""

from __future__ import annotations

from typing import Any

from ..checkpoint import hf_config
from ..model_config import active_param_count, head_dim


def prefill_flops(config: dict[str, Any], tokens: int) -> int:
    """Multiply-adds x 2 of a prefill of ``tokens`` tokens that computes the last position's logits:
    every linear layer on every token (MoE: the routed experts only), the output projection once,
    and causal attention (QKᵀ and PV over the positions before each token)."""
    hf = hf_config(config)
    embeddings = hf.vocab_size * hf.hidden_size * (1 if hf.tie_word_embeddings else 2)
    linear = active_param_count(hf) - embeddings
    attention = 2 * 2 * hf.num_hidden_layers * hf.num_attention_heads * head_dim(hf) * tokens * (tokens + 1) // 2
    return 2 * tokens * linear + 2 * hf.hidden_size * hf.vocab_size + attention
