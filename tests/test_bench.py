"""Benchmarks (pytest-benchmark): run with `pytest tests/test_bench.py --benchmark-enable`.

They compare the engine with transformers eager on the same weights in the same process; by
default (--benchmark-disable in pyproject) each runs once as a smoke test. No wall-clock asserts.
"""

import numpy as np
import pytest
import torch

import qwen2c
from qwen2c.bench import bench, format_bench


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
