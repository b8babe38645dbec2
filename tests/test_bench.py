"""Benchmarks (pytest-benchmark): run with `pytest tests/test_bench.py --benchmark-enable`.

They compare the engine with transformers eager on the same weights in the same process; by
default (--benchmark-disable in pyproject) each runs once as a smoke test. No wall-clock asserts.
"""

import numpy as np
import pytest
import torch

import qwen2c
from conftest import write_moe_checkpoint
from qwen2c.bench import bench, bench_moe_dispatch, format_bench, format_moe_bench


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return qwen2c.load(tiny_engine)


def test_bench_engine_decode_step(benchmark, engine):
    s = engine.session()
    logits = s.prefill([1, 2, 3, 4])

    def step():
        if s.length >= engine.max_context - 1:  # stay inside the context across many rounds
            s.__init__(engine)
            s.prefill([1, 2, 3, 4])
        return s.decode(int(np.argmax(logits)))

    assert benchmark(step).shape == (engine.vocab_size,)


def test_bench_eager_decode_step(benchmark, tiny_checkpoint):
    from transformers import DynamicCache, Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(tiny_checkpoint).eval()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), cache=cache, use_cache=True)

    def step():
        with torch.no_grad():
            if cache.get_seq_length() >= 60:
                cache.crop(4)
            return model(input_ids=torch.tensor([[5]]), cache=cache, use_cache=True, logits_to_keep=1).logits

    assert benchmark(step).shape[-1] == model.config.vocab_size


def test_qwen2c_bench_reports_ratios(tiny_engine):
    result = bench(tiny_engine, prompt_tokens=16, decode_tokens=4, repeats=1)
    assert result["prefill_speedup"] > 0 and result["decode_speedup"] > 0
    assert "ratio" in format_bench(result)


@pytest.fixture(scope="module")
def moe_64x8(tmp_path_factory):
    """The 57B-A14B routing (64 experts, 8 per token) at a small width, built sparse and dense."""
    root = tmp_path_factory.mktemp("moe64")
    ckpt = write_moe_checkpoint(root / "ckpt", hidden_size=128, num_experts=64, num_experts_per_tok=8,
                                moe_intermediate_size=128, shared_expert_intermediate_size=256, num_hidden_layers=2)
    qwen2c.build(str(ckpt), "llvm", root / "sparse", max_context=64)
    qwen2c.build(str(ckpt), "llvm", root / "dense", max_context=64, moe_dispatch="dense")
    return root


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_bench_moe_decode_step(benchmark, moe_64x8, dispatch):
    """Compare the two in one run: `pytest tests/test_bench.py -k moe_decode --benchmark-enable`."""
    benchmark.group = "moe decode step, 64 experts / 8 per token"
    engine = qwen2c.load(moe_64x8 / dispatch)
    s = engine.session()
    s.prefill([1, 2, 3, 4])

    def step():
        if s.length >= engine.max_context - 1:
            s.__init__(engine)
            s.prefill([1, 2, 3, 4])
        return s.decode(7)

    assert benchmark(step).shape == (engine.vocab_size,)


def test_qwen2c_bench_dense_experts_reports_ratios(moe_64x8):
    result = bench_moe_dispatch(moe_64x8 / "sparse", prompt_tokens=16, decode_tokens=4, repeats=1)
    assert result["experts"] == 64 and result["experts_per_token"] == 8
    assert result["decode_speedup"] > 0 and result["prefill_speedup"] > 0
    assert "all experts (dense)" in format_moe_bench(result)


def test_bench_dense_experts_refuses_dense_engines(moe_64x8):
    with pytest.raises(qwen2c.errors.ConfigError, match="sparse engine"):
        bench_moe_dispatch(moe_64x8 / "dense")
