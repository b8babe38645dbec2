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
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    cfg = small_config(**overrides)
    if overrides.get("hidden_size") is None and "hidden_size" in overrides:
        del cfg["hidden_size"]
    with pytest.raises(ConfigError, match=field):
        validate_config_dict(cfg, "config.json")


def test_valid_config_passes():
    validate_config_dict(small_config(), "config.json")


@pytest.mark.parametrize("name, billions", [("qwen2-0.5b", 0.494), ("qwen2-1.5b", 1.544), ("qwen2-7b", 7.616), ("qwen2-72b", 72.71)])
def test_preset_parameter_counts_match_published_sizes(name, billions):
    assert param_count(hf_config(PRESETS[name])) / 1e9 == pytest.approx(billions, rel=0.01)


def test_param_count_matches_transformers():
    from transformers import Qwen2ForCausalLM

    for tied in (True, False):
        config = hf_config(small_config(tie_word_embeddings=tied))
        model = Qwen2ForCausalLM(config)
        assert param_count(config) == sum(p.numel() for p in model.parameters())
