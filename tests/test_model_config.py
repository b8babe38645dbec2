import pytest

from conftest import small_config
from qwen2c.errors import ConfigError
from qwen2c.model_config import param_count, validate_config_dict
from qwen2c.checkpoint import hf_config
from qwen2c.presets import PRESETS


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"model_type": None}, "model_type"),
        ({"hidden_size": None}, "hidden_size"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"vocab_size": "512"}, "vocab_size"),
        ({"hidden_size": 66}, "num_attention_heads"),  # 66 % 4
        ({"num_key_value_heads": 3}, "num_key_value_heads"),  # 4 % 3
        ({"hidden_act": "swishy"}, "hidden_act"),
        ({"hidden_act": 3}, "hidden_act"),
        ({"use_sliding_window": "yes"}, "use_sliding_window"),
        ({"use_sliding_window": True, "sliding_window": 0}, "sliding_window"),
        ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": -1}, "max_window_layers"),
        ({"use_sliding_window": True, "sliding_window": 8, "layer_types": ["full_attention"]}, "layer_types"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types.*use_sliding_window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": "32K"}},
         "original_max_position_embeddings"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic' is refused: dynamic NTK"),
        ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                           "original_max_position_embeddings": 32}}, "rope_type 'longrope' is refused"),
        ({"rope_scaling": {"rope_type": "ntk-by-parts", "factor": 2.0}}, "rope_type 'ntk-by-parts'"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}},
         "partial_rotary_factor"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    cfg = small_config(**overrides)
    if overrides.get("hidden_size") is None and "hidden_size" in overrides:
        del cfg["hidden_size"]
    with pytest.raises(ConfigError, match=field):
        validate_config_dict(cfg, "config.json")


@pytest.mark.parametrize("overrides", [
    {},
    {"hidden_act": "gelu"}, {"hidden_act": "gelu_pytorch_tanh"}, {"hidden_act": "relu"},
    {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
    {"rope_scaling": {"type": "yarn", "factor": 4.0}},  # transformers takes max_position_embeddings
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}},
])
def test_valid_configs_pass(overrides):
    validate_config_dict(small_config(**overrides), "config.json")


def test_context_limit_follows_rope_scaling():
    from qwen2c.model_config import context_limit

    # What Qwen2's instructions add for contexts past 32K: max_position_embeddings stays 32768.
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert context_limit(small_config(max_position_embeddings=32768, rope_scaling=yarn)) == 131072
    assert context_limit(small_config(max_position_embeddings=256)) == 256


@pytest.mark.parametrize("name, billions", [("qwen2-0.5b", 0.494), ("qwen2-1.5b", 1.544), ("qwen2-7b", 7.616), ("qwen2-72b", 72.71)])
def test_preset_parameter_counts_match_published_sizes(name, billions):
    assert param_count(hf_config(PRESETS[name])) / 1e9 == pytest.approx(billions, rel=0.01)


def test_param_count_matches_transformers():
    from transformers import Qwen2ForCausalLM

    for tied in (True, False):
        config = hf_config(small_config(tie_word_embeddings=tied))
        model = Qwen2ForCausalLM(config)
        assert param_count(config) == sum(p.numel() for p in model.parameters())
