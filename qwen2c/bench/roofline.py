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
    h, layers = hf.hidden_size, hf.num_hidden_layers
    embeddings = hf.vocab_size * h * (1 if hf.tie_word_embeddings else 2)
    norms = (2 * layers + 1) * h
    biases = layers * (h + 2 * hf.num_key_value_heads * head_dim(hf))  # q, k, v: adds, not multiply-adds
    linear = active_param_count(hf) - embeddings - norms - biases
    attention = 2 * 2 * layers * hf.num_attention_heads * head_dim(hf) * tokens * (tokens + 1) // 2
    return 2 * tokens * linear + 2 * h * hf.vocab_size + attention
