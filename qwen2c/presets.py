"""Presets: the published Qwen2 shapes with weights drawn from a fixed seed.

No hub is reachable here, and the shapes, not the weight values, decide the speed and the
correctness of compiled code. Presets carry the real Qwen2 tokenizer (see ``tokenizer.py``).
"""

from __future__ import annotations

from typing import Any

from .errors import Qwen2cError

_COMMON: dict[str, Any] = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 131072,
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}


def _qwen2(hidden, layers, heads, kv_heads, inter, vocab, tied, **extra) -> dict[str, Any]:
    return {
        **_COMMON,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        **extra,
    }


def _qwen2_moe(hidden, layers, heads, kv_heads, inter, vocab, experts, top_k, moe_inter, shared_inter, **extra):
    return _qwen2(
        hidden, layers, heads, kv_heads, inter, vocab, False,
        model_type="qwen2_moe",
        architectures=["Qwen2MoeForCausalLM"],
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=shared_inter,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        **extra,
    )


PRESETS: dict[str, dict[str, Any]] = {
    # Published Qwen2 shapes (Qwen/Qwen2-*/config.json).
    "qwen2-0.5b": _qwen2(896, 24, 14, 2, 4864, 151936, True),
    "qwen2-1.5b": _qwen2(1536, 28, 12, 2, 8960, 151936, True),
    "qwen2-7b": _qwen2(3584, 28, 28, 4, 18944, 152064, False),
    "qwen2-72b": _qwen2(8192, 80, 64, 8, 29568, 152064, False),
    # Small, for quick work: the real vocabulary, so the real tokenizer applies.
    "qwen2-tiny": _qwen2(128, 2, 4, 2, 256, 151936, True, max_position_embeddings=4096),
    # Qwen/Qwen2-57B-A14B: 64 routed experts, 8 per token, and a shared expert with a sigmoid gate.
    "qwen2-57b-a14b": _qwen2_moe(3584, 28, 28, 4, 18944, 151936, 64, 8, 2560, 20480),
    # The 57B-A14B routing (64 experts, 8 per token) at a small width, with the real vocabulary.
    "qwen2-moe-tiny": _qwen2_moe(128, 2, 4, 2, 256, 151936, 64, 8, 64, 256, max_position_embeddings=4096),
}

SEED = 0


def preset_config(name: str) -> dict[str, Any]:
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise Qwen2cError(
            f"--model {name!r} is neither a checkpoint directory nor a preset. "
            f"Presets: {', '.join(sorted(PRESETS))}."
        ) from None
