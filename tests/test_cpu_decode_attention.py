"""qwen2c's CPU decode attention kernel against NumPy: output and log2-sum-exp for one query per
sequence over its pages (scattered in the pool, last page partly used), grouped heads, odd lengths,
contexts long enough to be split into many key ranges (split-K), several sequences at once, a
sequence without keys, a sliding window with attention sinks, and half-precision caches."""

import math

import numpy as np
import pytest
import tvm

from qwen2c.schedules.cpu_decode_attention import SPLITS, TILE, decode_kernel, fast_exp2
from qwen2c.targets.registry import TARGETS

TARGET = TARGETS.resolve("llvm")
LANES = TARGET.vector_bits // 32
PAGE = 16


def _compile(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET.tvm_target())["main"]


def _reference(q, k, v, scale):
    """q [hq, d], k/v [m, hkv, d] -> output [hq, d], lse [hq] (log2 units); no keys: 0 and -5e4."""
    hq, _ = q.shape
    group = hq // k.shape[1]
    out, lse = np.zeros_like(q), np.full((hq,), -5e4, np.float32)
    for h in range(hq):
        if len(k) == 0:
            continue
        s = (k[:, h // group].astype(np.float64) @ q[h]) * scale * math.log2(math.e)
        p = np.exp2(s - s.max())
        out[h] = (p / p.sum()) @ v[:, h // group]
        lse[h] = s.max() + math.log2(p.sum())
    return out, lse


def _paged(rng, seqs, hkv, d, dtype=np.float32, free=None):
    """A page pool holding each sequence's k/v rows in scattered pages; returns pool, indptr, values, last_len.
    Slots no sequence uses hold random numbers, or ``free`` where given."""
    used = [-(-len(k) // PAGE) for k, _ in seqs]
    total = sum(used) + 3
    order = rng.permutation(total)
    pool = rng.standard_normal((total, 2, hkv, PAGE, d)).astype(dtype)
    if free is not None:
        pool[:] = free
    indptr, values, last, at = [0], [], [], 0
    for (k, v), n in zip(seqs, used):
        mine = order[at:at + n]
        at += n
        for j in range(len(k)):
            pool[mine[j // PAGE], 0, :, j % PAGE] = k[j]
            pool[mine[j // PAGE], 1, :, j % PAGE] = v[j]
        values.extend(mine)
        indptr.append(len(values))
        last.append(len(k) - (n - 1) * PAGE if n else 0)
    return pool, indptr, values or [0], last


def _run(q, pool, indptr, values, length_info, hkv, sliding=False, dtype="float32", lanes=LANES):
    b, hq, d = q.shape
    i32 = lambda a: tvm.runtime.tensor(np.array(a, np.int32))  # noqa: E731
    out = tvm.runtime.tensor(np.full((b, hq, d), 7, q.dtype))
    lse = tvm.runtime.tensor(np.zeros((b, hq), np.float32))
    _compile(decode_kernel(hkv, hq, d, lanes, PAGE, dtype=dtype, sliding_window=sliding))(
        tvm.runtime.tensor(q), tvm.runtime.tensor(pool), i32(indptr), i32(values), i32(length_info),
        i32([0] * b), i32([0] * b), out, lse, 0, 1.0, 1e6, 0.3)
    return out.numpy(), lse.numpy()


@pytest.mark.parametrize("m", [1, 5, 16, 17, 100, 16 * TILE * SPLITS + 3, 4001])
@pytest.mark.parametrize("hkv, hq, d", [(2, 4, 16), (1, 7, 24), (2, 14, 64)])
def test_decode_matches_numpy(m, hkv, hq, d):
    rng = np.random.default_rng(m + hq)
    q = rng.standard_normal((1, hq, d), dtype=np.float32)
    k = rng.standard_normal((m, hkv, d), dtype=np.float32)
    v = rng.standard_normal((m, hkv, d), dtype=np.float32)
    pool, indptr, values, last = _paged(rng, [(k, v)], hkv, d)
    out, lse = _run(q, pool, indptr, values, last, hkv)
    want, want_lse = _reference(q[0], k, v, 0.3)
    np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(lse[0], want_lse, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("lanes", sorted({4, 8, LANES}))
@pytest.mark.parametrize("m, hkv, hq, d", [(100, 2, 14, 64), (301, 1, 18, 128), (40, 4, 4, 32)])
def test_groups_head_dims_and_vector_widths(m, hkv, hq, d, lanes):
    """Groups wider than a chunk of score registers (18 query heads per kv head: 8 + 8 + 2), one query
    head per kv head, head_dim 128, and 4- (NEON) and 8-lane (AVX2) vectors as well as the target's."""
    rng = np.random.default_rng(m + hq + lanes)
    q = rng.standard_normal((1, hq, d), dtype=np.float32)
    k = rng.standard_normal((m, hkv, d), dtype=np.float32)
    v = rng.standard_normal((m, hkv, d), dtype=np.float32)
    pool, indptr, values, last = _paged(rng, [(k, v)], hkv, d)
    out, lse = _run(q, pool, indptr, values, last, hkv, lanes=lanes)
    want, want_lse = _reference(q[0], k, v, 0.3)
    np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(lse[0], want_lse, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [3, 16, 21, 250])
@pytest.mark.parametrize("free", [np.nan, np.inf])
def test_free_slots_of_the_last_page_never_reach_the_output(m, free):
    """A page's slots past the sequence's end hold whatever an earlier sequence left, NaN included:
    the tile kernel reads whole pages, so those keys must get no weight and those values no product."""
    hkv, hq, d = 2, 14, 64
    rng = np.random.default_rng(m)
    q = rng.standard_normal((1, hq, d), dtype=np.float32)
    k = rng.standard_normal((m, hkv, d), dtype=np.float32)
    v = rng.standard_normal((m, hkv, d), dtype=np.float32)
    pool, indptr, values, last = _paged(rng, [(k, v)], hkv, d, free=free)
    out, lse = _run(q, pool, indptr, values, last, hkv)
    want, want_lse = _reference(q[0], k, v, 0.3)
    np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(lse[0], want_lse, rtol=1e-5, atol=1e-4)


def test_decode_of_several_sequences_one_without_keys():
    hkv, hq, d = 2, 4, 32
    rng = np.random.default_rng(0)
    lengths = [37, 0, 600, 16]
    seqs = [(rng.standard_normal((n, hkv, d), dtype=np.float32), rng.standard_normal((n, hkv, d), dtype=np.float32))
            for n in lengths]
    q = rng.standard_normal((len(lengths), hq, d), dtype=np.float32)
    pool, indptr, values, last = _paged(rng, seqs, hkv, d)
    out, lse = _run(q, pool, indptr, values, last, hkv)
    for i, (k, v) in enumerate(seqs):
        want, want_lse = _reference(q[i], k, v, 0.3)
        np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(lse[i], want_lse, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m, start, sink", [(300, 100, 0), (300, 100, 4), (1000, 37, 3)])
def test_sliding_window_decode_sees_the_sink_and_the_window(m, start, sink):
    """length_info [3, b]: last page's length, the window's first row, the sink length (TVM's layout)."""
    hkv, hq, d = 2, 4, 16
    rng = np.random.default_rng(m + start)
    q = rng.standard_normal((1, hq, d), dtype=np.float32)
    k = rng.standard_normal((m, hkv, d), dtype=np.float32)
    v = rng.standard_normal((m, hkv, d), dtype=np.float32)
    pool, indptr, values, last = _paged(rng, [(k, v)], hkv, d)
    out, lse = _run(q, pool, indptr, values, [[last[0]], [start], [sink]], hkv, sliding=True)
    seen = np.r_[0:sink, start:m]
    want, want_lse = _reference(q[0], k[seen], v[seen], 0.3)
    np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(lse[0], want_lse, rtol=1e-5, atol=1e-4)


def test_half_precision_cache():
    import ml_dtypes

    hkv, hq, d, m = 2, 14, 64, 333
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, hq, d)).astype(ml_dtypes.bfloat16)
    k = rng.standard_normal((m, hkv, d)).astype(ml_dtypes.bfloat16)
    v = rng.standard_normal((m, hkv, d)).astype(ml_dtypes.bfloat16)
    pool, indptr, values, last = _paged(rng, [(k, v)], hkv, d, dtype=ml_dtypes.bfloat16)
    out, lse = _run(q, pool, indptr, values, last, hkv, dtype="bfloat16")
    want, want_lse = _reference(q[0].astype(np.float32), k.astype(np.float32), v.astype(np.float32), 0.3)
    np.testing.assert_allclose(out[0].astype(np.float32), want, rtol=1e-2, atol=1e-2)  # bfloat16 output rounding
    np.testing.assert_allclose(lse[0], want_lse, rtol=1e-5, atol=1e-4)


def test_fast_exp2_matches_numpy():
    from tvm.script import tirx as T

    @T.prim_func
    def main(a: T.Buffer((4096,), "float32"), out: T.Buffer((4096,), "float32")):
        for i in T.vectorized(4096):
            out[i] = fast_exp2(a[i])

    x = np.concatenate([-np.geomspace(1e-8, 130, 4000), [0.0, -0.5, -1.0, -126.0, -200.0, -5e4],
                        np.zeros(90)]).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros(4096, np.float32))
    _compile(main)(tvm.runtime.tensor(x), out)
    want = np.exp2(np.maximum(x.astype(np.float64), -126))
    np.testing.assert_allclose(out.numpy(), want, rtol=3e-7, atol=0)
