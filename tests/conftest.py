"""Shared fixtures: small Qwen2 checkpoints written with save_pretrained, and engines built from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
# All of TVM, compiler included: a process whose first TVM import is qwen2c.load's gets only TVM's
# runtime (targets/tvm/runtime.py), and tests build engines after loading others.
import tvm  # noqa: F401


def small_config(**overrides) -> dict:
    cfg = {
        "model_type": "qwen2",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "use_sliding_window": False,
    }
    cfg.update(overrides)
    return cfg


def write_checkpoint(directory: Path, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    """A real checkpoint (config.json + model.safetensors), seeded random weights stored in ``dtype``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = small_config(**overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in cfg.items() if k != "model_type"}))
    # Random biases too: transformers initialises q/k/v biases to zero, which would hide bias bugs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(getattr(torch, dtype)).save_pretrained(directory, safe_serialization=True)
    return directory


def moe_config(**overrides) -> dict:
    cfg = small_config(
        model_type="qwen2_moe",
        intermediate_size=96,
        num_hidden_layers=3,
        tie_word_embeddings=False,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    cfg.update(overrides)
    return cfg


def write_moe_checkpoint(directory: Path, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    """A Qwen2-MoE checkpoint with seeded random weights and a decisive router.

    transformers initialises the router near zero, which makes every expert about equally likely:
    routing would then be decided by rounding. Scaled-up router weights give clear choices.
    """
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = moe_config(**overrides)
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 3.0 / cfg["hidden_size"] ** 0.5)
            elif name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(getattr(torch, dtype)).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory, tiny_checkpoint) -> Path:
    import qwen2c

    out = tmp_path_factory.mktemp("engines") / "tiny"
    qwen2c.build(str(tiny_checkpoint), "llvm", out, max_context=64)
    return out


def read_manifest(engine: Path) -> dict:
    return json.loads((engine / "manifest.json").read_text())
