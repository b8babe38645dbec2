"""Graph passes: structure before/after, numbers against the reference, and cases where they must not fire."""

import pytest
import torch

from conftest import small_config
from qwen2c.checkpoint import hf_config
from qwen2c.graphs.export import export_model
from qwen2c.graphs.fuse_attention import FuseAttention
from qwen2c.graphs.fuse_rms_norm import FuseRmsNorm
from qwen2c.graphs.pass_base import PassContext
from qwen2c.graphs.pipeline import run_passes

aten = torch.ops.aten


def _model(**overrides):
    from transformers import Qwen2ForCausalLM

    config = hf_config(small_config(**overrides))
    torch.manual_seed(0)
    return config, Qwen2ForCausalLM(config).eval()


def _count(program, target):
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target == target)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_fuse_attention_replaces_sdpa_rope_and_mask(heads, kv_heads):
    config, model = _model(num_attention_heads=heads, num_key_value_heads=kv_heads)
    program = export_model(model, 64)
    assert _count(program, aten.scaled_dot_product_attention.default) == 2
    report = FuseAttention()(PassContext(config, program))
    assert report.fired == 2 and not report.misses
    assert _count(program, aten.scaled_dot_product_attention.default) == 0
    assert _count(program, torch.ops.qwen2c.fused_attention.default) == 2
    # RoPE tables and the causal-mask plumbing are gone with it.
    for dead in (aten.cos.default, aten.sin.default, aten.cumsum.default, aten.neg.default):
        assert _count(program, dead) == 0
    layers = [n.args[4] for n in program.graph.nodes if n.target == torch.ops.qwen2c.fused_attention.default]
    assert layers == [0, 1]


@pytest.mark.parametrize("length", [1, 5, 17])
def test_rewritten_program_matches_transformers(length):
    config, model = _model()
    program = export_model(model, 64)
    reports = run_passes(program, config, "float32")
    assert {r.name: r.fired for r in reports} == {"fuse_attention": 2, "fuse_rms_norm": 5, "fuse_moe": 0}
    ids = torch.randint(0, config.vocab_size, (1, length))
    with torch.no_grad():
        expected = model(ids).logits[:, -1:]
        got = program.module()(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_fuse_rms_norm_structure():
    config, model = _model()
    program = export_model(model, 64)
    report = FuseRmsNorm()(PassContext(config, program))
    # 2 per layer + the final norm.
    assert report.fired == 5
    assert _count(program, aten.rsqrt.default) == 0
    assert _count(program, torch.ops.qwen2c.fused_rms_norm.default) == 5


class _NonCausal(torch.nn.Module):
    """Bidirectional attention with RoPE-free q/k: the attention pass must not claim it."""

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class _UserMask(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("module, extra", [(_NonCausal(), ()), (_UserMask(), (torch.ones(1, 1, 4, 4, dtype=torch.bool),))])
def test_fuse_attention_refuses_non_causal_attention(module, extra):
    config, _ = _model()
    q = torch.randn(1, 4, 4, 16)
    program = torch.export.export(module, (q, q, q, *extra))
    before = str(program.graph)
    report = FuseAttention()(PassContext(config, program))
    assert report.fired == 0
    assert len(report.misses) == 1 and ("causal" in report.misses[0].reason)
    assert str(program.graph) == before


class _LayerNormLike(torch.nn.Module):
    """Mean-subtracting norm: not RMSNorm, so the pass must leave it."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(8))

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) + 1.0)


def test_fuse_rms_norm_leaves_other_norms_alone():
    config, _ = _model()
    program = torch.export.export(_LayerNormLike(), (torch.randn(2, 8),))
    report = FuseRmsNorm()(PassContext(config, program))
    assert report.fired == 0 and report.misses
    assert _count(program, aten.rsqrt.default) == 1


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("rope", [
    YARN,
    {"rope_type": "linear", "factor": 3.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
], ids=["yarn", "linear", "llama3"])
def test_scaled_rope_fuses_with_transformers_frequencies_and_scaling(rope):
    config, model = _model(rope_scaling=rope)
    program = export_model(model, 64)
    reports = run_passes(program, config, "float32")
    assert reports[0].fired == 2 and not reports[0].misses
    rotary = model.model.rotary_emb
    for n in program.graph.nodes:
        if n.target == torch.ops.qwen2c.fused_attention.default:
            inv_freq = PassContext(config, program).placeholder_tensor(n.args[3])
            assert torch.equal(inv_freq, rotary.inv_freq)
            assert n.args[5] == rotary.attention_scaling
    if rope["rope_type"] == "yarn":
        assert rotary.attention_scaling > 1  # YaRN's mscale: cos and sin are scaled
    # Past the original context, where the scaling matters.
    ids = torch.randint(0, config.vocab_size, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids), model(ids).logits[:, -1:], atol=1e-5, rtol=1e-4)


def test_sliding_layers_get_their_window():
    config, model = _model(use_sliding_window=True, sliding_window=5, max_window_layers=1, num_hidden_layers=3)
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    program = export_model(model, 64)
    run_passes(program, config, "float32")
    windows = [n.args[7] for n in program.graph.nodes if n.target == torch.ops.qwen2c.fused_attention.default]
    assert windows == [0, 5, 5]
    ids = torch.randint(0, config.vocab_size, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids), model(ids).logits[:, -1:], atol=1e-5, rtol=1e-4)
        # The window matters at this length: without it the logits differ.
        config.layer_types = ["full_attention"] * 3
        full = model(ids, use_cache=False).logits[:, -1:]
    assert not torch.allclose(program.module()(ids), full, atol=1e-4)


def test_rope_scaled_by_something_else_than_a_constant_is_refused():
    """cos/sin multiplied by a tensor (not transformers' attention_scaling constant): not fused."""
    config, model = _model()
    model.model.rotary_emb.attention_scaling = torch.tensor(1.5)
    program = export_model(model, 64)
    report = FuseAttention()(PassContext(config, program))
    assert report.fired == 0
    assert all("not scaled by a constant" in m.reason for m in report.misses)
