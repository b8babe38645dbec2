"""pytest-benchmark suite: `pytest tests/test_benchmarks.py --benchmark-enable` compares, at tiny
shapes and in one run, qwen2c's engine with transformers eager on the same weights (groups: prefill,
decode step; MoE sparse vs dense dispatch). By default (--benchmark-disable in pyproject) each runs
once as a smoke test. No wall-clock asserts: what is checked is what each call returns.
"""

import numpy as np
import pytest
import torch

import qwen2c
from conftest import write_moe_checkpoint

PROMPT = list(range(1, 33))


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return qwen2c.load(tiny_engine)


@pytest.fixture(scope="module")
def eager(tiny_checkpoint):
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    return Qwen2ForCausalLM.from_pretrained(tiny_checkpoint).eval()


def _eager_forward(model, ids, cache):
    from qwen2c.parity import cache_kwargs

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits


def test_prefill_engine(benchmark, engine, eager):
    from transformers import DynamicCache

    benchmark.group = "prefill 32 tokens"
    logits = benchmark(lambda: engine.session().prefill(PROMPT))
    expected = _eager_forward(eager, PROMPT, DynamicCache(config=eager.config))[0, -1].numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_prefill_eager(benchmark, eager):
    from transformers import DynamicCache

    benchmark.group = "prefill 32 tokens"
    logits = benchmark(lambda: _eager_forward(eager, PROMPT, DynamicCache(config=eager.config)))
    assert logits.shape[-1] == eager.config.vocab_size


def test_decode_step_engine(benchmark, engine):
    benchmark.group = "decode step"
    s = engine.session()
    s.prefill([1, 2, 3, 4])

    def step():
        if s.length >= engine.max_context - 1:  # stay inside the context across many rounds
            s.__init__(engine)
            s.prefill([1, 2, 3, 4])
        return s.decode(5)

    assert benchmark(step).shape == (engine.vocab_size,)


def test_decode_step_eager(benchmark, eager):
    from transformers import DynamicCache

    benchmark.group = "decode step"
    cache = DynamicCache(config=eager.config)
    _eager_forward(eager, [1, 2, 3, 4], cache)

    def step():
        if cache.get_seq_length() >= 60:
            cache.crop(4)
        return _eager_forward(eager, [5], cache)

    assert benchmark(step).shape[-1] == eager.config.vocab_size


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
def test_moe_decode_step(benchmark, moe_64x8, dispatch):
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


def test_bench_dense_experts_reports_ratios(moe_64x8):
    from qwen2c.bench import bench_moe_dispatch, format_moe_bench

    result = bench_moe_dispatch(moe_64x8 / "sparse", prompt_tokens=16, decode_tokens=4, repeats=1)
    assert result["experts"] == 64 and result["experts_per_token"] == 8
    assert result["decode_speedup"] > 0 and result["prefill_speedup"] > 0
    assert "all experts (dense)" in format_moe_bench(result)


def test_bench_dense_experts_refuses_dense_engines(moe_64x8):
    from qwen2c.bench import bench_moe_dispatch

    with pytest.raises(qwen2c.errors.ConfigError, match="sparse engine"):
        bench_moe_dispatch(moe_64x8 / "dense")
