"""qwen2c's CPU prefill attention kernels against NumPy: output and log2-sum-exp, causal with a
history (more keys than queries), several pages with a partly used last page, grouped heads,
and a sequence with no keys."""

import math

import numpy as np
import pytest
import tvm

from qwen2c.schedules.cpu_attention import (
    CACHE_PAGE_SIZE,
    paged_prefill_kernel,
    paged_prefill_sliding_kernel,
    ragged_prefill_kernel,
)
from qwen2c.targets.registry import TARGETS

TARGET = TARGETS.resolve("llvm")
LANES = TARGET.vector_bits // 32


def _compile(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET.tvm_target())["main"]


def _reference(q, k, v, causal, scale):
    """q [n, hq, d], k/v [m, hkv, d] -> output [n, hq, d], lse [n, hq] (log2 units)."""
    n, hq, _ = q.shape
    m, hkv, _ = k.shape
    group = hq // hkv
    out, lse = np.zeros_like(q), np.zeros((n, hq), np.float32)
    for i in range(n):
        visible = m - n + i + 1 if causal else m
        for h in range(hq):
            if visible <= 0:
                lse[i, h] = -5e4
                continue
            s = (k[:visible, h // group] @ q[i, h]) * scale * math.log2(math.e)
            p = np.exp2(s - s.max())
            out[i, h] = (p / p.sum()) @ v[:visible, h // group]
            lse[i, h] = s.max() + math.log2(p.sum())
    return out, lse


@pytest.mark.parametrize("n, m, causal", [(7, 7, 1), (5, 12, 1), (4, 9, 0), (1, 40, 1)])
@pytest.mark.parametrize("hkv, hq, d", [(2, 4, 16), (1, 6, 24)])
def test_ragged_prefill_matches_numpy(n, m, causal, hkv, hq, d):
    rng = np.random.default_rng(n * m)
    q = rng.standard_normal((n, hq, d), dtype=np.float32)
    k = rng.standard_normal((m, hkv, d), dtype=np.float32)
    v = rng.standard_normal((m, hkv, d), dtype=np.float32)
    out, lse = tvm.runtime.tensor(np.zeros((n, hq, d), np.float32)), tvm.runtime.tensor(np.zeros((n, hq), np.float32))
    i32 = lambda a: tvm.runtime.tensor(np.array(a, np.int32))  # noqa: E731
    _compile(ragged_prefill_kernel(hkv, hq, d, LANES))(
        tvm.runtime.tensor(q), i32([0, n]), tvm.runtime.tensor(k), tvm.runtime.tensor(v), i32([0, m]),
        i32(np.arange(n)), i32([0]), out, lse, causal, 0, 1.0, 1e6, 0.3)
    want, want_lse = _reference(q, k, v, causal, 0.3)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n, m", [(3, 3), (4, 37), (1, 16), (20, 33)])
def test_paged_prefill_matches_numpy(n, m):
    hkv, hq, d, page = 2, 4, 16, CACHE_PAGE_SIZE
    rng = np.random.default_rng(m)
    q = rng.standard_normal((n, hq, d), dtype=np.float32)
    k = rng.standard_normal((m, hkv, d), dtype=np.float32)
    v = rng.standard_normal((m, hkv, d), dtype=np.float32)
    used = -(-m // page)
    order = rng.permutation(used + 3)[:used]  # the sequence's pages, scattered in the pool
    pages = rng.standard_normal((used + 3, 2, hkv, page, d), dtype=np.float32)
    for j in range(m):
        pages[order[j // page], 0, :, j % page] = k[j]
        pages[order[j // page], 1, :, j % page] = v[j]
    out, lse = tvm.runtime.tensor(np.zeros((n, hq, d), np.float32)), tvm.runtime.tensor(np.zeros((n, hq), np.float32))
    i32 = lambda a: tvm.runtime.tensor(np.array(a, np.int32))  # noqa: E731
    _compile(paged_prefill_kernel(hkv, hq, d, LANES, page))(
        tvm.runtime.tensor(q), i32([0, n]), tvm.runtime.tensor(pages), i32([0, used]), i32(order),
        i32([m - (used - 1) * page]), i32([0]), i32(np.arange(n)), out, lse, 1, 0, 1.0, 1e6, 0.25)
    want, want_lse = _reference(q, k, v, 1, 0.25)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=1e-5, atol=1e-4)


def test_paged_prefill_of_a_sequence_without_pages_is_empty():
    out = tvm.runtime.tensor(np.full((2, 4, 16), 7, np.float32))
    lse = tvm.runtime.tensor(np.zeros((2, 4), np.float32))
    i32 = lambda a: tvm.runtime.tensor(np.array(a, np.int32))  # noqa: E731
    _compile(paged_prefill_kernel(2, 4, 16, LANES, CACHE_PAGE_SIZE))(
        tvm.runtime.tensor(np.ones((2, 4, 16), np.float32)), i32([0, 2]),
        tvm.runtime.tensor(np.ones((1, 2, 2, CACHE_PAGE_SIZE, 16), np.float32)), i32([0, 0]), i32([0]), i32([0]),
        i32([0]), i32([0, 1]), out, lse, 1, 0, 1.0, 1e6, 0.25)
    assert (out.numpy() == 0).all() and (lse.numpy() == -5e4).all()


@pytest.mark.parametrize("n, cached, window, causal", [(4, 37, 8, 1), (8, 5, 8, 1), (3, 20, 20, 1), (1, 40, 6, 0)])
def test_sliding_window_paged_prefill_matches_numpy(n, cached, window, causal):
    """A sliding layer's pages as the cache lists them: the window's pages only, its first key at an
    offset in the first page; query i of the chunk sees the last window - 1 - i cached keys."""
    hkv, hq, d, page = 2, 4, 16, CACHE_PAGE_SIZE
    rng = np.random.default_rng(cached + window)
    q = rng.standard_normal((n, hq, d), dtype=np.float32)
    k = rng.standard_normal((cached, hkv, d), dtype=np.float32)
    v = rng.standard_normal((cached, hkv, d), dtype=np.float32)
    length = min(cached, window)  # the keys in the window's pages
    offset = (cached - window) % page if cached > window else 0
    used = -(-(offset + length) // page)
    order = rng.permutation(used + 3)[:used]
    pages = rng.standard_normal((used + 3, 2, hkv, page, d), dtype=np.float32)
    for j in range(length):
        slot = offset + j
        pages[order[slot // page], 0, :, slot % page] = k[cached - length + j]
        pages[order[slot // page], 1, :, slot % page] = v[cached - length + j]
    info = np.array([[(offset + length - 1) % page + 1], [offset], [0]], np.int32)
    out, lse = tvm.runtime.tensor(np.zeros((n, hq, d), np.float32)), tvm.runtime.tensor(np.zeros((n, hq), np.float32))
    i32 = lambda a: tvm.runtime.tensor(np.array(a, np.int32))  # noqa: E731
    _compile(paged_prefill_sliding_kernel(hkv, hq, d, LANES, page, window))(
        tvm.runtime.tensor(q), i32([0, n]), tvm.runtime.tensor(pages), i32([0, used]), i32(order),
        tvm.runtime.tensor(info), i32([0]), i32(np.arange(n)), out, lse, causal, 0, 1.0, 1e6, 0.25)
    want, want_lse = np.zeros_like(q), np.full((n, hq), -5e4, np.float32)
    for i in range(n):
        first = max(cached - (window - 1 - i), 0) if causal else cached - length
        if first >= cached:
            continue
        w, wl = _reference(q[i:i + 1], k[first:], v[first:], 0, 0.25)
        want[i], want_lse[i] = w[0], wl[0]
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=1e-5, atol=1e-4)
