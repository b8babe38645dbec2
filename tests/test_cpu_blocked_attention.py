"""qwen2c's blocked ragged prefill kernel against NumPy: causal with and without history, blocks
of queries and tiles of keys that do not divide the lengths, grouped heads, several sequences."""

import numpy as np
import pytest
import tvm

from qwen2c.schedules.cpu_blocked_attention import blocked_ragged_prefill_kernel
from test_cpu_attention import LANES, _compile, _reference


def _i32(a):
    return tvm.runtime.tensor(np.array(a, np.int32))


@pytest.mark.parametrize("n, m, causal", [(7, 7, 1), (5, 12, 1), (4, 9, 0), (1, 40, 1), (100, 100, 1),
                                          (130, 300, 1), (64, 64, 1), (33, 70, 0)])
@pytest.mark.parametrize("hkv, hq, d", [(2, 4, 16), (1, 6, 24), (2, 14, 64)])
def test_blocked_ragged_prefill_matches_numpy(n, m, causal, hkv, hq, d):
    rng = np.random.default_rng(n * m + d)
    q = rng.standard_normal((n, hq, d), dtype=np.float32)
    k = rng.standard_normal((m, hkv, d), dtype=np.float32)
    v = rng.standard_normal((m, hkv, d), dtype=np.float32)
    out, lse = tvm.runtime.tensor(np.zeros((n, hq, d), np.float32)), tvm.runtime.tensor(np.zeros((n, hq), np.float32))
    _compile(blocked_ragged_prefill_kernel(hkv, hq, d, LANES))(
        tvm.runtime.tensor(q), _i32([0, n]), tvm.runtime.tensor(k), tvm.runtime.tensor(v), _i32([0, m]),
        _i32(np.arange(n)), _i32([0]), out, lse, causal, 0, 1.0, 1e6, 0.3)
    want, want_lse = _reference(q, k, v, causal, 0.3)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=1e-5, atol=1e-4)


def test_blocked_ragged_prefill_of_several_sequences():
    hkv, hq, d = 2, 4, 32
    rng = np.random.default_rng(7)
    lens = [(20, 20), (3, 50), (70, 90)]
    qs = [rng.standard_normal((a, hq, d), dtype=np.float32) for a, _ in lens]
    ks = [rng.standard_normal((b, hkv, d), dtype=np.float32) for _, b in lens]
    vs = [rng.standard_normal((b, hkv, d), dtype=np.float32) for _, b in lens]
    total_q, total_k = sum(a for a, _ in lens), sum(b for _, b in lens)
    out = tvm.runtime.tensor(np.zeros((total_q, hq, d), np.float32))
    lse = tvm.runtime.tensor(np.zeros((total_q, hq), np.float32))
    _compile(blocked_ragged_prefill_kernel(hkv, hq, d, LANES))(
        tvm.runtime.tensor(np.concatenate(qs)), _i32(np.cumsum([0] + [a for a, _ in lens])),
        tvm.runtime.tensor(np.concatenate(ks)), tvm.runtime.tensor(np.concatenate(vs)),
        _i32(np.cumsum([0] + [b for _, b in lens])), _i32(np.zeros(total_q)), _i32([0, 0, 0]), out, lse,
        1, 0, 1.0, 1e6, 0.3)
    at = 0
    for q, k, v in zip(qs, ks, vs):
        want, want_lse = _reference(q, k, v, 1, 0.3)
        np.testing.assert_allclose(out.numpy()[at:at + len(q)], want, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(lse.numpy()[at:at + len(q)], want_lse, rtol=1e-5, atol=1e-4)
        at += len(q)
