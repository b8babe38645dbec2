"""The MoE CPU kernels, each against NumPy: routing, grouping, grouped SwiGLU/down, combine, dense route.

Shapes include experts that receive no token, one expert that receives every token, widths that
are not a multiple of the vector length, and a single token (decode).
"""

import numpy as np
import pytest
import tvm

from qwen2c.schedules import cpu_moe
from qwen2c.targets.registry import TARGETS

TARGET = TARGETS.resolve("llvm")
LANES = TARGET.vector_bits // 32


def _compile(func):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=TARGET.tvm_target())["main"]


def _empty(shape, dtype):
    return tvm.runtime.tensor(np.zeros(shape, dtype))


def _softmax(x):
    p = np.exp(x - x.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


@pytest.mark.parametrize("experts, k", [(8, 2), (64, 8), (5, 5), (3, 1)])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("tokens", [1, 6])
def test_route_is_softmax_top_k(experts, k, norm, tokens):
    logits = np.random.default_rng(experts + k).standard_normal((tokens, experts)).astype(np.float32)
    weights, chosen = _empty((tokens, k), "float32"), _empty((tokens, k), "int32")
    _compile(cpu_moe.route_kernel(experts, k, norm))(tvm.runtime.tensor(logits), weights, chosen)
    probs = _softmax(logits)
    want = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    want_w = np.take_along_axis(probs, want, 1)
    if norm:
        want_w /= want_w.sum(1, keepdims=True)
    np.testing.assert_array_equal(chosen.numpy(), want)
    np.testing.assert_allclose(weights.numpy(), want_w, rtol=1e-5, atol=1e-7)


def test_route_breaks_ties_to_the_lower_expert():
    logits = np.zeros((1, 6), np.float32)
    weights, chosen = _empty((1, 3), "float32"), _empty((1, 3), "int32")
    _compile(cpu_moe.route_kernel(6, 3, False))(tvm.runtime.tensor(logits), weights, chosen)
    assert chosen.numpy().tolist() == [[0, 1, 2]]


def _routing(tokens, experts, k, seed=0):
    """Each token's k distinct experts: expert 1 serves every token, expert 0 none (if there is room)."""
    rng = np.random.default_rng(seed)
    others = [e for e in range(experts) if e > 1] if experts - 2 >= k - 1 else [e for e in range(experts) if e != 1]
    return np.array([[1, *rng.choice(others, k - 1, replace=False)] for _ in range(tokens)], np.int32)


@pytest.mark.parametrize("tokens, experts, k", [(1, 8, 2), (7, 8, 3), (16, 64, 8)])
def test_group_is_a_stable_counting_sort(tokens, experts, k):
    flat = _routing(tokens, experts, k).reshape(-1)
    rows, slot_of, offsets = _empty(flat.shape, "int32"), _empty(flat.shape, "int32"), _empty((experts + 1,), "int32")
    _compile(cpu_moe.group_kernel(experts))(tvm.runtime.tensor(flat), rows, slot_of, offsets)
    order = np.argsort(flat, kind="stable")
    np.testing.assert_array_equal(rows.numpy(), order)
    np.testing.assert_array_equal(order[slot_of.numpy()], np.arange(flat.size))
    np.testing.assert_array_equal(offsets.numpy(), np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=experts))]))


@pytest.mark.parametrize("hidden, inter", [(64, 32), (48, 40), (LANES * 2 + 4, 6)])
@pytest.mark.parametrize("tokens, k", [(1, 2), (5, 3)])
@pytest.mark.parametrize("tile_rows", [1, 2, 3])
def test_grouped_experts_and_combine(hidden, inter, tokens, k, tile_rows):
    experts = 6
    rng = np.random.default_rng(1)
    x = rng.standard_normal((tokens, hidden), dtype=np.float32)
    gate_up = rng.standard_normal((experts, 2 * inter, hidden), dtype=np.float32) * 0.3
    down = rng.standard_normal((experts, hidden, inter), dtype=np.float32) * 0.3
    weights = rng.random((tokens, k), dtype=np.float32)
    flat = _routing(tokens, experts, k).reshape(-1)
    slots = flat.size
    order = np.argsort(flat, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=experts))]).astype(np.int32)
    slot_of = np.empty_like(order)
    slot_of[order] = np.arange(slots)

    h = _empty((slots, inter), "float32")
    swiglu = _compile(cpu_moe.grouped_swiglu_kernel(experts, hidden, inter, k, LANES, tile_rows))
    swiglu(tvm.runtime.tensor(x), tvm.runtime.tensor(gate_up), tvm.runtime.tensor(order.astype(np.int32)),
           tvm.runtime.tensor(offsets), h)
    expert_of = flat[order]
    xs = x[order // k]
    gate = np.einsum("sh,sih->si", xs, gate_up[expert_of, :inter])
    up = np.einsum("sh,sih->si", xs, gate_up[expert_of, inter:])
    want_h = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(h.numpy(), want_h, rtol=1e-4, atol=1e-4)

    y = _empty((slots, hidden), "float32")
    _compile(cpu_moe.grouped_down_kernel(experts, hidden, inter, LANES, tile_rows))(
        h, tvm.runtime.tensor(down), tvm.runtime.tensor(order.astype(np.int32)), tvm.runtime.tensor(offsets), y)
    want_y = np.einsum("si,shi->sh", want_h, down[expert_of])
    np.testing.assert_allclose(y.numpy(), want_y, rtol=1e-4, atol=1e-4)

    out = _empty((tokens, hidden), "float32")
    _compile(cpu_moe.combine_kernel(hidden, k, LANES))(y, tvm.runtime.tensor(slot_of.astype(np.int32)),
                                                       tvm.runtime.tensor(weights), out)
    want = np.einsum("tj,tjh->th", weights, want_y[slot_of].reshape(tokens, k, hidden))
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)


def test_dense_route_spreads_the_routers_weights_over_all_experts():
    chosen = np.array([[3, 0], [1, 2]], np.int32)
    weights = np.array([[0.7, 0.2], [0.5, 0.4]], np.float32)
    dense_w, dense_e = _empty((2, 4), "float32"), _empty((2, 4), "int32")
    _compile(cpu_moe.dense_route_kernel(4, 2))(tvm.runtime.tensor(weights), tvm.runtime.tensor(chosen), dense_w, dense_e)
    np.testing.assert_array_equal(dense_w.numpy(), np.array([[0.2, 0, 0, 0.7], [0, 0.5, 0.4, 0]], np.float32))
    np.testing.assert_array_equal(dense_e.numpy(), [[0, 1, 2, 3]] * 2)
