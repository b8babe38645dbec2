"""Validate a Qwen2 config before anything is allocated, and derive what the compiler needs from it.

Errors name the field at fault and the file it came from. Only what qwen2c compiles correctly is
accepted: a config that would build into a silently wrong engine is refused here.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen2",)

_REQUIRED_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


def validate_config_dict(cfg: dict[str, Any], source: str) -> None:
    """Raise ConfigError naming the first field of ``cfg`` (read from ``source``) qwen2c can't build."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; qwen2c compiles "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} models. Point --model at a Qwen2 checkpoint or use a preset."
        )
    for field in _REQUIRED_INT_FIELDS:
        value = cfg.get(field)
        if value is None:
            raise ConfigError(f"{source}: required field {field!r} is missing.")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{source}: field {field!r} must be a positive integer, got {value!r}.")
    hidden, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if cfg.get("head_dim") is not None and cfg["head_dim"] * heads != hidden:
        raise ConfigError(
            f"{source}: head_dim {cfg['head_dim']} x num_attention_heads {heads} != hidden_size {hidden}; "
            "Qwen2 projects to hidden_size."
        )
    if hidden % heads:
        raise ConfigError(
            f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}."
        )
    if heads % kv_heads:
        raise ConfigError(
            f"{source}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads} "
            "(grouped-query attention needs whole groups)."
        )
    if (hidden // heads) % 2:
        raise ConfigError(f"{source}: head dimension {hidden // heads} is odd; RoPE needs an even one.")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (Qwen2 uses 'silu').")
    if cfg.get("use_sliding_window"):
        raise ConfigError(
            f"{source}: use_sliding_window=true is not supported yet; the fused attention is full causal "
            "attention. Set it to false (Qwen2's published checkpoints do)."
        )
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"{source}: rope_parameters.rope_type {rope_type!r} is not supported; qwen2c fuses default RoPE only."
        )
    eps = cfg.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ConfigError(f"{source}: rms_norm_eps must be a positive number, got {eps!r}.")


def rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def head_dim(config: Any) -> int:
    return config.hidden_size // config.num_attention_heads


def param_count(config: Any) -> int:
    """Parameters of a dense Qwen2 model with this config (tied embeddings counted once)."""
    h, i, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    kv = config.num_key_value_heads * head_dim(config)
    attn = h * h + h + 2 * (h * kv + kv) + h * h
    mlp = 3 * h * i
    per_layer = attn + mlp + 2 * h
    embed = v * h * (1 if config.tie_word_embeddings else 2)
    return embed + layers * per_layer + h
