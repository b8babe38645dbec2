"""Configurations users bring, end to end against transformers step by step: scaled RoPE (YaRN,
linear, llama3) past the original context, sliding windows shorter than the prompt on some layers
only, activations other than silu, and a Qwen2-MoE checkpoint with all of them."""

import numpy as np
import pytest

import qwen2c
from conftest import read_manifest, write_checkpoint, write_moe_checkpoint
from qwen2c.parity import check_parity, reference_steps

ORIGINAL = 32  # original_max_position_embeddings of the scaled-RoPE checkpoints
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}


def _reference(ckpt):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt).eval()


def _steps_match(engine, reference, prompt, steps, atol=1e-4):
    """Prefill, then ``steps`` decode steps on the reference's greedy tokens: every step's logits."""
    expected, fed, _ = reference_steps(reference, prompt, steps)
    session = engine.session()
    got = [session.prefill(prompt)] + [session.decode(t) for t in fed]
    for step, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(g, e, atol=atol, rtol=1e-3, err_msg=f"step {step}")
        assert np.argmax(g) == np.argmax(e), f"step {step}"


def _prompt(n, vocab=512, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@pytest.mark.parametrize("rope", [
    YARN,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": ORIGINAL},
], ids=["yarn", "linear", "llama3"])
def test_scaled_rope_matches_transformers_past_the_original_context(tmp_path, rope):
    ckpt = write_checkpoint(tmp_path / "ckpt", seed=5, rope_scaling=rope, max_position_embeddings=64)
    manifest = qwen2c.build(str(ckpt), "llvm", tmp_path / "engine", max_context=128)
    assert manifest["passes"][0] == {"name": "fuse_attention", "fired": 2, "misses": []}
    engine = qwen2c.load(tmp_path / "engine")
    # A prompt past the original context, then decode steps further still.
    _steps_match(engine, _reference(ckpt), _prompt(45), steps=24)


def test_bfloat16_yarn_engine_matches_transformers_within_its_own_bfloat16_error(tmp_path):
    """Half precision: cos/sin rounded to bfloat16 and each RoPE product rounded, as transformers
    does; judged as every half-precision engine is (qwen2c/parity.py), past the original context."""
    ckpt = write_checkpoint(tmp_path / "ckpt", seed=5, dtype="bfloat16", rope_scaling=YARN, max_position_embeddings=64)
    manifest = qwen2c.build(str(ckpt), "llvm", tmp_path / "engine", dtype="bfloat16", max_context=96)
    assert manifest["parity"]["passed"]
    from qwen2c.checkpoint import load_reference, resolve_model

    _, reference = load_reference(resolve_model(str(ckpt)), "bfloat16")
    report = check_parity(qwen2c.load(tmp_path / "engine"), reference, "bfloat16", prompt_tokens=45, decode_steps=10)
    assert report["passed"], report


def test_yarn_context_extends_past_max_position_embeddings(tmp_path):
    """Qwen2's instructions add YaRN with max_position_embeddings left at the original context."""
    ckpt = write_checkpoint(tmp_path / "ckpt", seed=6, rope_scaling=YARN, max_position_embeddings=ORIGINAL)
    qwen2c.build(str(ckpt), "llvm", tmp_path / "engine", max_context=4 * ORIGINAL)
    engine = qwen2c.load(tmp_path / "engine")
    assert engine.max_context == 4 * ORIGINAL
    _steps_match(engine, _reference(ckpt), _prompt(70), steps=10)


def test_sliding_window_on_some_layers_matches_transformers(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", seed=7, num_hidden_layers=3, use_sliding_window=True,
                            sliding_window=8, max_window_layers=1)
    manifest = qwen2c.build(str(ckpt), "llvm", tmp_path / "engine", max_context=96)
    assert manifest["prefill_chunk"] == 8
    engine = qwen2c.load(tmp_path / "engine")
    reference = _reference(ckpt)
    assert reference.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    # A prompt of several windows (prefilled in window-long chunks), then decode past it.
    _steps_match(engine, reference, _prompt(29), steps=16)
    # A prompt fed in two calls: the second call's queries see cached keys within their window.
    import torch

    ids = _prompt(27, seed=1)
    session = engine.session()
    session.prefill(ids[:11])
    got = session.prefill(ids[11:])
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def test_the_window_matters_at_these_lengths(tmp_path):
    """Guard for the test above: the same weights without sliding give different logits there."""
    import torch

    ckpt = write_checkpoint(tmp_path / "ckpt", seed=7, num_hidden_layers=3, use_sliding_window=True,
                            sliding_window=8, max_window_layers=1)
    reference = _reference(ckpt)
    ids = torch.tensor([_prompt(29)])
    with torch.no_grad():
        sliding = reference(ids).logits[0, -1]
        reference.config.layer_types = ["full_attention"] * 3
        full = reference(ids, use_cache=False).logits[0, -1]
    assert (sliding - full).abs().max() > 1e-2


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_activations_other_than_silu_match_transformers(tmp_path, act):
    ckpt = write_checkpoint(tmp_path / "ckpt", seed=8, hidden_act=act)
    qwen2c.build(str(ckpt), "llvm", tmp_path / "engine", max_context=48)
    _steps_match(qwen2c.load(tmp_path / "engine"), _reference(ckpt), _prompt(13), steps=8)


def test_moe_with_yarn_sliding_window_and_gelu_matches_transformers(tmp_path):
    ckpt = write_moe_checkpoint(tmp_path / "ckpt", seed=9, hidden_act="gelu_pytorch_tanh", rope_scaling=YARN,
                                max_position_embeddings=64, use_sliding_window=True, sliding_window=8,
                                max_window_layers=3)
    manifest = qwen2c.build(str(ckpt), "llvm", tmp_path / "engine", max_context=96)
    assert {p["name"]: p["fired"] for p in manifest["passes"]} == {"fuse_attention": 3, "fuse_rms_norm": 7,
                                                                   "fuse_moe": 3}
    reference = _reference(ckpt)
    # Qwen2-MoE's rule: even layers below max_window_layers slide.
    assert reference.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    report = check_parity(qwen2c.load(tmp_path / "engine"), reference, "float32", prompt_tokens=40,
                          decode_steps=12)
    assert report["passed"], report
    assert report["routing"]["agree"] + report["routing"]["near_ties"] == report["routing"]["choices"]


def test_an_activation_the_backend_cannot_lower_is_refused_naming_the_op(tmp_path):
    from qwen2c.errors import UnsupportedModelError

    ckpt = write_checkpoint(tmp_path / "ckpt", seed=8, hidden_act="mish")  # aten.mish: no TVM converter
    with pytest.raises(UnsupportedModelError, match="aten.mish"):
        qwen2c.build(str(ckpt), "llvm", tmp_path / "engine", max_context=48)
    assert not (tmp_path / "engine").exists()


def test_manifest_of_a_model_without_windows_has_no_prefill_chunk(tiny_engine):
    assert read_manifest(tiny_engine)["prefill_chunk"] is None
