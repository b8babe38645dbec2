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


PRESETS: dict[str, dict[str, Any]] = {
    # Published Qwen2 shapes (Qwen/Qwen2-*/config.json).
    "qwen2-0.5b": _qwen2(896, 24, 14, 2, 4864, 151936, True),
    "qwen2-1.5b": _qwen2(1536, 28, 12, 2, 8960, 151936, True),
    "qwen2-7b": _qwen2(3584, 28, 28, 4, 18944, 152064, False),
    "qwen2-72b": _qwen2(8192, 80, 64, 8, 29568, 152064, False),
    # Small, for quick work: the real vocabulary, so the real tokenizer applies.
    "qwen2-tiny": _qwen2(128, 2, 4, 2, 256, 151936, True, max_position_embeddings=4096),
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
