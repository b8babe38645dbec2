"""CPU kernels for a Qwen2-MoE block: routing, grouping tokens by expert, grouped expert matmuls.

One step of a sparse block on ``tokens`` tokens, ``k`` experts each (``slots = tokens * k``):

    route    logits[t, E]          -> weights[t, k], experts[t, k]   softmax, top-k, optional renorm
    group    experts[slots]        -> rows[slots], slot_of[slots], offsets[E + 1]
             a stable counting sort: the slots of expert e are rows[offsets[e]:offsets[e + 1]]
    swiglu   x[t, H], gate_up[E, 2I, H]  -> h[slots, I]    h = act(x W_gate^T) * (x W_up^T), per expert
             (act: silu for Qwen2's SwiGLU, or the model's gelu / gelu_tanh / relu)
    down     h[slots, I], down[E, H, I]  -> y[slots, H]
    combine  y, slot_of, weights   -> out[t, H]             out[t] = sum_j weights[t, j] * y[slot_of[t, j]]

The grouped matmuls loop over output-column tiles (in parallel), then experts, then that expert's
rows: an expert with no tokens costs one comparison and its weights are never read; an expert with
tokens has each weight row streamed once per step, however many tokens it serves. So a decode step
reads exactly its k experts' weights, and a prefill reads each routed expert's weights once.

The "dense" dispatch (a baseline for benchmarks) runs the same kernels with every expert routed
every token, at weight 0 where the router did not pick it: k becomes E, nothing else changes.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

from .activations import gated
from .cpu_matmul import TILE_COLS
from .cpu_qmatmul import lanes as qmatmul_lanes
from .dequantize import element, qdtype, stored_shapes

# _ROOT_BLOCK: kernels with a single tensor input are written inside a root block, because Relax's
# RewriteDataflowReshape inspects every one-input call_tir for a reshape pattern and that analysis
# requires one. Their scratch buffers are therefore root allocations (hoisted), indexed by task.


def lanes_for(extent: int, vector: int) -> int:
    """The widest vector (a power of two, at most ``vector``) that divides ``extent``."""
    lanes = 1
    while lanes * 2 <= vector and extent % (lanes * 2) == 0:
        lanes *= 2
    return lanes


def _cols(extent: int) -> int:
    return math.gcd(extent, TILE_COLS)


def route_kernel(experts: int, top_k: int, norm_topk_prob: bool, dtype: str = "float32"):
    """``(logits[t, E]) -> (weights[t, k] f32, experts[t, k] i32)``: softmax in float32, top-k.

    Experts come highest weight first; ties go to the lower expert index.
    """
    E, K = T.int64(experts), T.int64(top_k)

    @T.prim_func(private=True, s_tir=True)
    def moe_route(a: T.handle, w: T.handle, i: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        t = T.int64()
        logits = T.match_buffer(a, (t, E), dtype)
        weights = T.match_buffer(w, (t, K), "float32")
        chosen = T.match_buffer(i, (t, K), "int32")
        with T.sblock("root"):
            # Per-token scratch rows (a root block: see _ROOT_BLOCK); each task owns row n.
            probs = T.alloc_buffer((t, E), "float32")
            stat = T.alloc_buffer((t, 2), "float32")
            best = T.alloc_buffer((t,), "int32")
            for n in T.parallel(t):
                stat[n, 0] = T.Cast("float32", logits[n, 0])
                for e in range(E):
                    stat[n, 0] = T.max(stat[n, 0], T.Cast("float32", logits[n, e]))
                stat[n, 1] = T.float32(0)
                for e in range(E):
                    probs[n, e] = T.exp(T.Cast("float32", logits[n, e]) - stat[n, 0])
                    stat[n, 1] = stat[n, 1] + probs[n, e]
                for e in range(E):
                    probs[n, e] = probs[n, e] / stat[n, 1]
                stat[n, 1] = T.float32(0)
                for j in range(K):
                    best[n] = 0
                    for e in range(E):
                        if probs[n, e] > probs[n, best[n]]:
                            best[n] = T.int32(e)
                    chosen[n, j] = best[n]
                    weights[n, j] = probs[n, best[n]]
                    stat[n, 1] = stat[n, 1] + probs[n, best[n]]
                    probs[n, best[n]] = T.float32(-1)  # taken: below every probability
                if norm_topk_prob:
                    for j in range(K):
                        weights[n, j] = weights[n, j] / stat[n, 1]

    return moe_route


def dense_route_kernel(experts: int, top_k: int):
    """``(weights[t, k], experts[t, k]) -> (weights[t, E], experts[t, E])``: every expert, every token,
    at the router's weight where it chose the expert and 0 elsewhere (the dense baseline)."""
    E, K = T.int64(experts), T.int64(top_k)

    @T.prim_func(private=True)
    def moe_dense_route(w: T.handle, i: T.handle, dw: T.handle, di: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        t = T.int64()
        weights = T.match_buffer(w, (t, K), "float32")
        chosen = T.match_buffer(i, (t, K), "int32")
        dense_weights = T.match_buffer(dw, (t, E), "float32")
        dense_experts = T.match_buffer(di, (t, E), "int32")
        for n in T.parallel(t):
            for e in range(E):
                dense_weights[n, e] = T.float32(0)
                dense_experts[n, e] = T.int32(e)
            for j in range(K):
                dense_weights[n, chosen[n, j]] = weights[n, j]

    return moe_dense_route


def group_kernel(experts: int):
    """``(experts[slots]) -> (rows[slots], slot_of[slots], offsets[E + 1])``, a stable counting sort.

    rows[p] is the token of the p-th slot in expert order (slot s = token * k + j, so the caller
    divides by k); slot_of[s] is where slot s landed.
    """
    E = T.int64(experts)

    @T.prim_func(private=True, s_tir=True)
    def moe_group(i: T.handle, r: T.handle, so: T.handle, off: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        s = T.int64()
        chosen = T.match_buffer(i, (s,), "int32")
        rows = T.match_buffer(r, (s,), "int32")
        slot_of = T.match_buffer(so, (s,), "int32")
        offsets = T.match_buffer(off, (E + T.int64(1),), "int32")
        with T.sblock("root"):  # see _ROOT_BLOCK
            cursor = T.alloc_buffer((E,), "int32")
            for e in range(E + T.int64(1)):
                offsets[e] = 0
            for p in range(s):
                offsets[chosen[p] + 1] = offsets[chosen[p] + 1] + 1
            for e in range(E):
                offsets[e + T.int64(1)] = offsets[e + T.int64(1)] + offsets[e]
                cursor[e] = offsets[e]
            for p in range(s):
                rows[cursor[chosen[p]]] = T.int32(p)
                slot_of[p] = cursor[chosen[p]]
                cursor[chosen[p]] = cursor[chosen[p]] + 1

    return moe_group


COL_BLOCK = 16  # column tiles per task (the default: autotune/params.py may choose another)


def grouped_swiglu_kernel(experts: int, hidden: int, inter: int, top_k: int, vector: int, tile_rows: int,
                          col_block: int = COL_BLOCK, dtype: str = "float32", act: int = 0,
                          quant: tuple[int, int] | None = None):
    """``(x[t, H], gate_up[E, 2I, H], rows[slots], offsets[E + 1]) -> h[slots, I]``.

    Row p of h is expert e's gated MLP ``act(gate) * up`` (``act`` indexes
    ``activations.GATED_ACTIVATIONS``; 0, silu, is SwiGLU) of token rows[p] // k, for
    offsets[e] <= p < offsets[e + 1].
    Gate and up rows of a column tile are accumulated together, so h is written once. x and the
    weights are in ``dtype``; h is float32. ``quant`` = (bits, group): the weights are quantized
    (``(x, q, scales, rows, offsets)``), dequantized in registers as they are read.
    """
    return _grouped_kernel(experts, hidden, inter, vector, tile_rows, col_block, gather_top_k=top_k, swiglu=True,
                           x_dtype=dtype, w_dtype=dtype, act=act, quant=quant)


def grouped_down_kernel(experts: int, hidden: int, inter: int, vector: int, tile_rows: int, col_block: int = COL_BLOCK,
                        dtype: str = "float32", quant: tuple[int, int] | None = None):
    """``(h[slots, I], down[E, H, I], rows[slots], offsets[E + 1]) -> y[slots, H]``: each row of h by its
    expert's down_proj (h is already in expert order; ``rows`` is unused, kept for one signature)."""
    return _grouped_kernel(experts, inter, hidden, vector, tile_rows, col_block, gather_top_k=None, swiglu=False,
                           x_dtype="float32", w_dtype=dtype, quant=quant)


def _grouped_kernel(experts: int, k_dim: int, n_out: int, vector: int, tile_rows: int, col_block: int,
                    gather_top_k: int | None, swiglu: bool, x_dtype: str, w_dtype: str, act: int = 0,
                    quant: tuple[int, int] | None = None):
    """One grouped NT matmul: out[p, j] = x[row(p)] . W[e(p), j] for the rows p of each expert e.

    Tiles are TI rows x TJ columns of vector accumulators along the reduction (TI * TJ, twice that
    for SwiGLU's gate and up, must fit the vector registers); a task owns ``col_block`` column
    tiles of every expert, so it streams each expert's weight rows contiguously. Row tiles of TI,
    then single rows for the remainder: no work on padding rows, and a decode step (one row per
    routed expert) runs the single-row path, which is a pure weight stream.
    """
    gather = gather_top_k is not None
    E, KD, N = (T.int64(v) for v in (experts, k_dim, n_out))
    TOPK = T.int64(gather_top_k or 1)
    V = T.int64(lanes_for(k_dim, vector))
    TJ = T.int64(_cols(n_out))
    TI = T.int64(tile_rows)
    KO = T.int64(k_dim // int(V))
    tiles = n_out // int(TJ)
    JB = T.int64(_block(tiles, col_block))
    W_ROWS = N * T.int64(2) if swiglu else N
    if quant is not None:
        bits, group = quant
        # One vector of inputs must sit in one int4 nibble half and one scale group (cpu_qmatmul.lanes).
        V = T.int64(min(int(V), qmatmul_lanes(k_dim, bits, group, int(V))))
        KO = T.int64(k_dim // int(V))
        (_, q_cols), (_, s_cols) = stored_shapes(int(W_ROWS), k_dim, bits, group)

    def wload(w, s, e, j, k):
        """The float32 weight [e, j, k]: a load, or (quantized) a load of q and scales dequantized."""
        if quant is None:
            return T.Cast("float32", w[e, j, k])
        return element(w, s, quant[0], quant[1], e, j, k)

    @T.macro
    def tile(nrows, first, jo, e, x, w, s, rows, out):
        acc = T.alloc_buffer((nrows, TJ, V), "float32")
        acc_up = T.alloc_buffer((nrows, TJ, V), "float32")
        for ii in T.unroll(nrows):
            for jj in T.unroll(TJ):
                for v in T.vectorized(V):
                    acc[ii, jj, v] = T.float32(0)
                    if swiglu:
                        acc_up[ii, jj, v] = T.float32(0)
        for ko in range(KO):
            for ii in T.unroll(nrows):
                for jj in T.unroll(TJ):
                    for v in T.vectorized(V):
                        if gather:
                            acc[ii, jj, v] = acc[ii, jj, v] + T.Cast("float32", x[
                                T.Cast("int64", rows[first + ii]) // TOPK, ko * V + v]) * wload(
                                    w, s, e, jo * TJ + jj, ko * V + v)
                        else:
                            acc[ii, jj, v] = acc[ii, jj, v] + T.Cast("float32", x[first + ii, ko * V + v]) * wload(
                                w, s, e, jo * TJ + jj, ko * V + v)
                        if swiglu:
                            acc_up[ii, jj, v] = acc_up[ii, jj, v] + T.Cast("float32", x[
                                T.Cast("int64", rows[first + ii]) // TOPK, ko * V + v]) * wload(
                                    w, s, e, N + jo * TJ + jj, ko * V + v)
        for ii in range(nrows):
            for jj in range(TJ):
                sums = T.alloc_buffer((2,), "float32")
                sums[0] = T.float32(0)
                sums[1] = T.float32(0)
                for v in range(V):
                    sums[0] = sums[0] + acc[ii, jj, v]
                    if swiglu:
                        sums[1] = sums[1] + acc_up[ii, jj, v]
                if swiglu:
                    out[first + ii, jo * TJ + jj] = gated(act, sums[0], sums[1])
                else:
                    out[first + ii, jo * TJ + jj] = sums[0]

    @T.macro
    def grouped(x, w, s, rows, off, out):
        for jb in T.parallel(T.int64(tiles) // JB):
            for e in range(E):
                start = T.Cast("int64", off[e])
                count = T.Cast("int64", off[e + T.int64(1)]) - start
                for jt in range(JB):
                    for io in range(count // TI):
                        tile(TI, start + io * TI, jb * JB + jt, e, x, w, s, rows, out)
                    for rest in range(count % TI):
                        tile(T.int64(1), start + count // TI * TI + rest, jb * JB + jt, e, x, w, s, rows, out)

    if quant is None:
        @T.prim_func(private=True)
        def moe_grouped_matmul(a: T.handle, w: T.Buffer((E, W_ROWS, KD), w_dtype), r: T.handle,
                               off: T.Buffer((E + T.int64(1),), "int32"), c: T.handle):
            T.func_attr({"tirx.noalias": True, "op_pattern": 8})
            t, s = T.int64(), T.int64()
            x = T.match_buffer(a, (t, KD), x_dtype)
            rows = T.match_buffer(r, (s,), "int32")
            out = T.match_buffer(c, (s, N), "float32")
            grouped(x, w, w, rows, off, out)
    else:
        @T.prim_func(private=True)
        def moe_grouped_matmul(a: T.handle, q: T.Buffer((E, W_ROWS, T.int64(q_cols)), qdtype(quant[0])),
                               sc: T.Buffer((E, W_ROWS, T.int64(s_cols)), "float16"), r: T.handle,
                               off: T.Buffer((E + T.int64(1),), "int32"), c: T.handle):
            T.func_attr({"tirx.noalias": True, "op_pattern": 8})
            t, s = T.int64(), T.int64()
            x = T.match_buffer(a, (t, KD), x_dtype)
            rows = T.match_buffer(r, (s,), "int32")
            out = T.match_buffer(c, (s, N), "float32")
            grouped(x, q, sc, rows, off, out)

    return moe_grouped_matmul


def _block(tiles: int, col_block: int) -> int:
    """Column tiles per task: the largest divisor of ``tiles`` up to ``col_block``."""
    return max(d for d in range(1, min(tiles, col_block) + 1) if tiles % d == 0)


def combine_kernel(hidden: int, top_k: int, vector: int, dtype: str = "float32"):
    """``(y[slots, H], slot_of[slots], weights[t, k]) -> out[t, H]``: each token's weighted expert sum,
    in the router's order (as transformers sums them), accumulated in float32, written in ``dtype``."""
    H, K = T.int64(hidden), T.int64(top_k)
    V = T.int64(lanes_for(hidden, vector))

    @T.prim_func(private=True)
    def moe_combine(a: T.handle, so: T.handle, w: T.handle, c: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        t, s = T.int64(), T.int64()
        y = T.match_buffer(a, (s, H), "float32")
        slot_of = T.match_buffer(so, (s,), "int32")
        weights = T.match_buffer(w, (t, K), "float32")
        out = T.match_buffer(c, (t, H), dtype)
        for n in T.parallel(t):
            for ho in range(H // V):
                acc = T.alloc_buffer((V,), "float32")
                for v in T.vectorized(V):
                    acc[v] = T.float32(0)
                for j in range(K):
                    for v in T.vectorized(V):
                        acc[v] = acc[v] + weights[n, j] * y[T.Cast("int64", slot_of[n * K + j]), ho * V + v]
                for v in T.vectorized(V):
                    out[n, ho * V + v] = T.Cast(dtype, acc[v])

    return moe_combine


def swiglu_tile_rows(vector: int) -> int:
    """Rows per tile of the SwiGLU kernel: 2 * TI * TJ vector accumulators must fit the registers.

    (The down projection has TI * TJ, like a linear layer: it uses ``cpu_matmul.tile_rows``.)
    """
    return 2 if vector >= 16 else 1
