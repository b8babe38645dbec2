"""Validate a Qwen2 config before anything is allocated, and derive what the compiler needs from it.

Errors name the field at fault and the file it came from. Only what qwen2c compiles correctly is
accepted: a config that would build into a silently wrong engine is refused here.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_moe")

# transformers classes per model_type: (config class, causal-LM class).
MODEL_CLASSES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
}

_MOE_INT_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")

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
        _require_positive_int(cfg, field, source, "required field")
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
    _validate_activation(cfg, source)
    _validate_sliding_window(cfg, source)
    _validate_rope(cfg, source)
    eps = cfg.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ConfigError(f"{source}: rms_norm_eps must be a positive number, got {eps!r}.")
    if model_type == "qwen2_moe":
        _validate_moe(cfg, source)


# RoPE types whose inverse frequencies transformers computes once, at model creation: the traced
# ``inv_freq`` buffer is then exactly what every position uses, and the engine's cache applies it.
STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3", "proportional")
# RoPE types whose frequencies transformers picks per forward call from that call's length.
_PER_CALL_ROPE = {
    "dynamic": "dynamic NTK scaling recomputes the frequencies from the length of each forward call, and "
               "transformers' rotary module keeps the longest length it has seen across sequences "
               "(max_seq_len_cached), so its result depends on the history of calls; torch.export cannot trace it "
               "either (a data-dependent branch on the sequence length)",
    "longrope": "LongRoPE picks its short or long frequency factors per forward call, by that call's length "
                "(so its result also depends on how a sequence is split into calls); qwen2c's RoPE kernel applies "
                "one frequency table and does not implement that choice",
}


def _validate_activation(cfg: dict[str, Any], source: str) -> None:
    """Any activation transformers knows: the traced op is what gets compiled (an op the backend
    cannot lower is refused then, named)."""
    from transformers.activations import ACT2FN

    act = cfg.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in ACT2FN:
        raise ConfigError(
            f"{source}: hidden_act {act!r} is not an activation transformers knows "
            f"(e.g. silu, gelu, gelu_pytorch_tanh, relu)."
        )


def _validate_sliding_window(cfg: dict[str, Any], source: str) -> None:
    use = cfg.get("use_sliding_window", False)
    if not isinstance(use, bool):
        raise ConfigError(f"{source}: field 'use_sliding_window' must be true or false, got {use!r}.")
    layers = cfg["num_hidden_layers"]
    kinds = cfg.get("layer_types")
    if kinds is not None and (not isinstance(kinds, list) or len(kinds) != layers
                              or not all(k in ("full_attention", "sliding_attention") for k in kinds)):
        raise ConfigError(
            f"{source}: field 'layer_types' must list 'full_attention' or 'sliding_attention' for each of the "
            f"{layers} layers, got {kinds!r}."
        )
    if not use:
        if kinds and "sliding_attention" in kinds:
            raise ConfigError(f"{source}: field 'layer_types' has sliding_attention layers but use_sliding_window is "
                              "false (transformers then has no window to slide).")
        return
    _require_positive_int(cfg, "sliding_window", source, "with use_sliding_window, field")
    step = cfg.get("max_window_layers", 28)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"{source}: field 'max_window_layers' must be a non-negative integer, got {step!r}.")


def _validate_rope(cfg: dict[str, Any], source: str) -> None:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    field = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: field {field!r} must be an object, got {rope!r}.")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in _PER_CALL_ROPE:
        raise ConfigError(
            f"{source}: {field}.rope_type {rope_type!r} is refused: {_PER_CALL_ROPE[rope_type]}. "
            "Supported: " + ", ".join(STATIC_ROPE_TYPES) + "."
        )
    if rope_type not in STATIC_ROPE_TYPES:
        raise ConfigError(
            f"{source}: {field}.rope_type {rope_type!r} is not a RoPE type transformers implements for Qwen2 "
            "(supported here: " + ", ".join(STATIC_ROPE_TYPES) + ")."
        )
    partial = rope.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ConfigError(
            f"{source}: {field}.partial_rotary_factor {partial!r} is refused: Qwen2 rotates the whole head "
            "(transformers' Qwen2 attention cannot apply a partial rotary table either)."
        )
    if rope_type != "default":
        factor = rope.get("factor")
        if rope_type != "proportional" and (not isinstance(factor, (int, float)) or isinstance(factor, bool)
                                            or factor <= 0):
            raise ConfigError(f"{source}: {field}.factor must be a positive number for rope_type "
                              f"{rope_type!r}, got {factor!r}.")
        # Absent, transformers takes max_position_embeddings (or the config's own field) instead.
        original = rope.get("original_max_position_embeddings")
        if original is not None and (not isinstance(original, int) or isinstance(original, bool) or original <= 0):
            raise ConfigError(f"{source}: {field}.original_max_position_embeddings must be a positive integer, "
                              f"got {original!r}.")


def context_limit(cfg: dict[str, Any]) -> int:
    """The longest context a config allows: max_position_embeddings, or what its RoPE scaling extends
    the original context to (Qwen2's instructions add YaRN with factor 4 over 32768 positions while
    max_position_embeddings stays 32768)."""
    limit = cfg.get("max_position_embeddings", 4096)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    factor, original = rope.get("factor"), rope.get("original_max_position_embeddings")
    if isinstance(factor, (int, float)) and factor > 1:
        limit = max(limit, int(factor * (original or limit)))
    return limit


def _require_positive_int(cfg: dict[str, Any], field: str, source: str, kind: str) -> None:
    value = cfg.get(field)
    if value is None:
        raise ConfigError(f"{source}: {kind} {field!r} is missing.")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{source}: field {field!r} must be a positive integer, got {value!r}.")


def _validate_moe(cfg: dict[str, Any], source: str) -> None:
    for field in _MOE_INT_FIELDS:
        _require_positive_int(cfg, field, source, "qwen2_moe field")
    if cfg["num_experts_per_tok"] > cfg["num_experts"]:
        raise ConfigError(
            f"{source}: num_experts_per_tok {cfg['num_experts_per_tok']} exceeds num_experts {cfg['num_experts']}."
        )
    step = cfg.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
        raise ConfigError(f"{source}: field 'decoder_sparse_step' must be a positive integer, got {step!r}.")
    layers = cfg["num_hidden_layers"]
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in only):
        raise ConfigError(
            f"{source}: field 'mlp_only_layers' must be a list of layer indices in [0, {layers}), got {only!r}."
        )
    if not isinstance(cfg.get("norm_topk_prob", False), bool):
        raise ConfigError(f"{source}: field 'norm_topk_prob' must be true or false, got {cfg['norm_topk_prob']!r}.")


def is_moe(config: Any) -> bool:
    return getattr(config, "model_type", None) == "qwen2_moe"


def moe_layers(config: Any) -> list[int]:
    """Indices of the decoder layers whose MLP is a sparse MoE block (as transformers decides)."""
    if not is_moe(config) or config.num_experts <= 0:
        return []
    only = set(config.mlp_only_layers or [])
    step = config.decoder_sparse_step
    return [i for i in range(config.num_hidden_layers) if i not in only and (i + 1) % step == 0]


def sliding_window(config: Any, layer: int) -> int:
    """The window of ``layer``'s attention (keys within this many positions, its own included), or 0
    for full attention; as transformers decides (``layer_types``, from max_window_layers)."""
    kinds = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if layer < len(kinds) and kinds[layer] == "sliding_attention" and window:
        return int(window)
    return 0


def head_dim(config: Any) -> int:
    return config.hidden_size // config.num_attention_heads


def param_count(config: Any) -> int:
    """Parameters of a Qwen2 (dense or MoE) model with this config (tied embeddings counted once)."""
    h, i, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    kv = config.num_key_value_heads * head_dim(config)
    attn = h * h + h + 2 * (h * kv + kv) + h * h
    dense_mlp = 3 * h * i
    sparse = moe_layers(config)
    total = (attn + 2 * h) * layers + dense_mlp * (layers - len(sparse))
    if sparse:
        e, mi, si = config.num_experts, config.moe_intermediate_size, config.shared_expert_intermediate_size
        moe = e * h + e * 3 * h * mi + 3 * h * si + h  # router, experts, shared expert, its gate
        total += moe * len(sparse)
    embed = v * h * (1 if config.tie_word_embeddings else 2)
    return embed + total + h


def active_param_count(config: Any) -> int:
    """Parameters one token reads: its num_experts_per_tok routed experts, not all of them."""
    sparse = moe_layers(config)
    if not sparse:
        return param_count(config)
    idle = config.num_experts - config.num_experts_per_tok
    return param_count(config) - len(sparse) * idle * 3 * config.hidden_size * config.moe_intermediate_size
