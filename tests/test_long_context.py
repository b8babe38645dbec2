"""Engines against transformers past many KV-cache pages: prompts longer than a page (prefilled whole
and in chunks over an existing history) and decodes that cross several pages, so the paged prefill,
the ragged prefill and the split decode kernels all see long, partly filled, multi-page sequences."""

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import qwen2c
from conftest import write_checkpoint
from qwen2c.parity import reference_steps


@pytest.fixture(scope="module")
def long_engine(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "long", seed=5, max_position_embeddings=1024,
                            num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    # Seeded q/k projections are small, so attention would be nearly uniform and a kernel that
    # weighs keys wrongly would still pass: sharpen it (scores of several units, as trained models have).
    weights = load_file(ckpt / "model.safetensors")
    for name in weights:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            weights[name] = weights[name] * 6
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path_factory.mktemp("engines") / "long"
    qwen2c.build(str(ckpt), "llvm", out, max_context=640)
    return ckpt, out


def _reference(ckpt):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(ckpt).eval()


def test_long_prompt_then_decodes_across_pages_match_transformers(long_engine):
    ckpt, out = long_engine
    engine = qwen2c.load(out)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 512, 301)]  # 18 full pages and 13 rows
    expected, fed, _ = reference_steps(_reference(ckpt), prompt, steps=40)   # ends 3 pages further
    session = engine.session()
    got = [session.prefill(prompt)] + [session.decode(t) for t in fed]
    for step, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(g, e, atol=2e-4, rtol=1e-3, err_msg=f"step {step}")


def test_a_prompt_prefilled_in_chunks_over_its_history_matches_transformers(long_engine):
    ckpt, out = long_engine
    engine = qwen2c.load(out)
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, 512, 533)]
    expected, _, _ = reference_steps(_reference(ckpt), prompt, steps=0)
    session = engine.session()
    for start, end in ((0, 17), (17, 250), (250, 251), (251, 533)):
        logits = session.prefill(prompt[start:end])
    np.testing.assert_allclose(logits, expected[0], atol=2e-4, rtol=1e-3)
