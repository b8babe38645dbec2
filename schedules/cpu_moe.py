"""CPU kernels for a Qwen2-MoE block: routing, grouping tokens by expert, grouped expert matmuls.

One step of a sparse block on ``tokens`` tokens, ``k`` experts each (``slots = tokens * k``):

    route    logits[t, E]          -> weights[t, k], experts[t, k]   softmax, top-k, optional renorm
    group    experts[slots]        -> rows[slots], slot_of[slots], offsets[E + 1]
             a stable counting sort: the slots of expert e are rows[offsets[e]:offsets[e + 1]]
    swiglu   x[t, H], gate_up[E, 2I, H]  -> h[slots, I]    h = silu(x W_gate^T) * (x W_up^T), per expert
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

TILE_COLS = 4

# _ROOT_BLOCK: kernels with a single tensor input are written inside a root block, because Relax's
# RewriteDataflowReshape inspects every one-input call_tir for a reshape pattern and that analysis
# requires one. Their scratch buffers are therefore root allocations (hoisted), indexed by task.


def _lanes(extent: int, vector: int) -> int:
    """The widest vector (a power of two, at most ``vector``) that divides ``extent``."""
    lanes = 1
    while lanes * 2 <= vector and extent % (lanes * 2) == 0:
        lanes *= 2
    return lanes


def _cols(extent: int) -> int:
    return math.gcd(extent, TILE_COLS)


def route_kernel(experts: int, top_k: int, norm_topk_prob: bool):
    """``(logits[t, E]) -> (weights[t, k] f32, experts[t, k] i32)``: softmax in float32, top-k.

    Experts come highest weight first; ties go to the lower expert index.
    """
    E, K = T.int64(experts), T.int64(top_k)

    @T.prim_func(private=True, s_tir=True)
    def moe_route(a: T.handle, w: T.handle, i: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        t = T.int64()
        logits = T.match_buffer(a, (t, E), "float32")
        weights = T.match_buffer(w, (t, K), "float32")
        chosen = T.match_buffer(i, (t, K), "int32")
        with T.sblock("root"):
            # Per-token scratch rows (a root block: see _ROOT_BLOCK); each task owns row n.
            probs = T.alloc_buffer((t, E), "float32")
            stat = T.alloc_buffer((t, 2), "float32")
            best = T.alloc_buffer((t,), "int32")
            for n in T.parallel(t):
                stat[n, 0] = logits[n, 0]
                for e in range(E):
                    stat[n, 0] = T.max(stat[n, 0], logits[n, e])
                stat[n, 1] = T.float32(0)
                for e in range(E):
                    probs[n, e] = T.exp(logits[n, e] - stat[n, 0])
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


def grouped_swiglu_kernel(experts: int, hidden: int, inter: int, top_k: int, vector: int, tile_rows: int):
    """``(x[t, H], gate_up[E, 2I, H], rows[slots], offsets[E + 1]) -> h[slots, I]``.

    Row p of h is expert e's SwiGLU of token rows[p] // k, for offsets[e] <= p < offsets[e + 1].
    Gate and up rows of a column tile are accumulated together, so h is written once.
    """
    E, H, I, K = (T.int64(v) for v in (experts, hidden, inter, top_k))
    V = T.int64(_lanes(hidden, vector))
    TJ = T.int64(_cols(inter))
    TI = T.int64(tile_rows)
    HO = T.int64(hidden // int(V))

    @T.prim_func(private=True, s_tir=True)
    def moe_grouped_swiglu(a: T.handle, w: T.Buffer((E, I * T.int64(2), H), "float32"), r: T.handle,
                           off: T.Buffer((E + T.int64(1),), "int32"), c: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        t, s = T.int64(), T.int64()
        x = T.match_buffer(a, (t, H), "float32")
        rows = T.match_buffer(r, (s,), "int32")
        h = T.match_buffer(c, (s, I), "float32")
        for jo in T.parallel(I // TJ):
            for e in range(E):
                start = T.Cast("int64", off[e])
                count = T.Cast("int64", off[e + T.int64(1)]) - start
                # Full tiles of TI rows, then the remaining rows one at a time (decode: one row).
                for io in range(count // TI):
                    gate = T.alloc_buffer((TI, TJ, V), "float32", scope="local")
                    up = T.alloc_buffer((TI, TJ, V), "float32", scope="local")
                    for ii in T.unroll(TI):
                        for jj in T.unroll(TJ):
                            for v in T.vectorized(V):
                                gate[ii, jj, v] = T.float32(0)
                                up[ii, jj, v] = T.float32(0)
                    for ko in range(HO):
                        for ii in T.unroll(TI):
                            for jj in T.unroll(TJ):
                                for v in T.vectorized(V):
                                    gate[ii, jj, v] = gate[ii, jj, v] + x[
                                        T.Cast("int64", rows[start + io * TI + ii]) // K, ko * V + v
                                    ] * w[e, jo * TJ + jj, ko * V + v]
                                    up[ii, jj, v] = up[ii, jj, v] + x[
                                        T.Cast("int64", rows[start + io * TI + ii]) // K, ko * V + v
                                    ] * w[e, I + jo * TJ + jj, ko * V + v]
                    for ii in range(TI):
                        for jj in range(TJ):
                            sums = T.alloc_buffer((2,), "float32", scope="local")
                            sums[0] = T.float32(0)
                            sums[1] = T.float32(0)
                            for v in range(V):
                                sums[0] = sums[0] + gate[ii, jj, v]
                                sums[1] = sums[1] + up[ii, jj, v]
                            h[start + io * TI + ii, jo * TJ + jj] = sums[0] / (
                                T.float32(1) + T.exp(T.float32(0) - sums[0])
                            ) * sums[1]
                for rest in range(count % TI):
                    gate1 = T.alloc_buffer((TJ, V), "float32", scope="local")
                    up1 = T.alloc_buffer((TJ, V), "float32", scope="local")
                    for jj in T.unroll(TJ):
                        for v in T.vectorized(V):
                            gate1[jj, v] = T.float32(0)
                            up1[jj, v] = T.float32(0)
                    for ko in range(HO):
                        for jj in T.unroll(TJ):
                            for v in T.vectorized(V):
                                gate1[jj, v] = gate1[jj, v] + x[
                                    T.Cast("int64", rows[start + count // TI * TI + rest]) // K, ko * V + v
                                ] * w[e, jo * TJ + jj, ko * V + v]
                                up1[jj, v] = up1[jj, v] + x[
                                    T.Cast("int64", rows[start + count // TI * TI + rest]) // K, ko * V + v
                                ] * w[e, I + jo * TJ + jj, ko * V + v]
                    for jj in range(TJ):
                        sums1 = T.alloc_buffer((2,), "float32", scope="local")
                        sums1[0] = T.float32(0)
                        sums1[1] = T.float32(0)
                        for v in range(V):
                            sums1[0] = sums1[0] + gate1[jj, v]
                            sums1[1] = sums1[1] + up1[jj, v]
                        h[start + count // TI * TI + rest, jo * TJ + jj] = sums1[0] / (
                            T.float32(1) + T.exp(T.float32(0) - sums1[0])
                        ) * sums1[1]

    return moe_grouped_swiglu


def grouped_down_kernel(experts: int, hidden: int, inter: int, vector: int, tile_rows: int):
    """``(h[slots, I], down[E, H, I], offsets[E + 1]) -> y[slots, H]``: each row by its expert's down_proj."""
    E, H, I = (T.int64(v) for v in (experts, hidden, inter))
    V = T.int64(_lanes(inter, vector))
    TJ = T.int64(_cols(hidden))
    TI = T.int64(tile_rows)
    IO = T.int64(inter // int(V))

    @T.prim_func(private=True, s_tir=True)
    def moe_grouped_down(a: T.handle, w: T.Buffer((E, H, I), "float32"),
                         off: T.Buffer((E + T.int64(1),), "int32"), c: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        s = T.int64()
        h = T.match_buffer(a, (s, I), "float32")
        y = T.match_buffer(c, (s, H), "float32")
        for jo in T.parallel(H // TJ):
            for e in range(E):
                start = T.Cast("int64", off[e])
                count = T.Cast("int64", off[e + T.int64(1)]) - start
                for io in range(count // TI):
                    acc = T.alloc_buffer((TI, TJ, V), "float32", scope="local")
                    for ii in T.unroll(TI):
                        for jj in T.unroll(TJ):
                            for v in T.vectorized(V):
                                acc[ii, jj, v] = T.float32(0)
                    for ko in range(IO):
                        for ii in T.unroll(TI):
                            for jj in T.unroll(TJ):
                                for v in T.vectorized(V):
                                    acc[ii, jj, v] = acc[ii, jj, v] + h[start + io * TI + ii, ko * V + v] * w[
                                        e, jo * TJ + jj, ko * V + v
                                    ]
                    for ii in range(TI):
                        for jj in range(TJ):
                            y[start + io * TI + ii, jo * TJ + jj] = T.float32(0)
                            for v in range(V):
                                y[start + io * TI + ii, jo * TJ + jj] = y[start + io * TI + ii, jo * TJ + jj] + acc[ii, jj, v]
                for rest in range(count % TI):
                    acc1 = T.alloc_buffer((TJ, V), "float32", scope="local")
                    for jj in T.unroll(TJ):
                        for v in T.vectorized(V):
                            acc1[jj, v] = T.float32(0)
                    for ko in range(IO):
                        for jj in T.unroll(TJ):
                            for v in T.vectorized(V):
                                acc1[jj, v] = acc1[jj, v] + h[start + count // TI * TI + rest, ko * V + v] * w[
                                    e, jo * TJ + jj, ko * V + v
                                ]
                    for jj in range(TJ):
                        y[start + count // TI * TI + rest, jo * TJ + jj] = T.float32(0)
                        for v in range(V):
                            y[start + count // TI * TI + rest, jo * TJ + jj] = (
                                y[start + count // TI * TI + rest, jo * TJ + jj] + acc1[jj, v]
                            )

    return moe_grouped_down


def combine_kernel(hidden: int, top_k: int, vector: int):
    """``(y[slots, H], slot_of[slots], weights[t, k]) -> out[t, H]``: each token's weighted expert sum,
    in the router's order (as transformers sums them)."""
    H, K = T.int64(hidden), T.int64(top_k)
    V = T.int64(_lanes(hidden, vector))

    @T.prim_func(private=True)
    def moe_combine(a: T.handle, so: T.handle, w: T.handle, c: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        t, s = T.int64(), T.int64()
        y = T.match_buffer(a, (s, H), "float32")
        slot_of = T.match_buffer(so, (s,), "int32")
        weights = T.match_buffer(w, (t, K), "float32")
        out = T.match_buffer(c, (t, H), "float32")
        for n in T.parallel(t):
            for ho in range(H // V):
                for v in T.vectorized(V):
                    out[n, ho * V + v] = T.float32(0)
                for j in range(K):
                    for v in T.vectorized(V):
                        out[n, ho * V + v] = out[n, ho * V + v] + weights[n, j] * y[
                            T.Cast("int64", slot_of[n * K + j]), ho * V + v
                        ]

    return moe_combine


def swiglu_tile_rows(vector: int) -> int:
    """Rows per tile of the SwiGLU kernel: 2 * TI * TJ vector accumulators must fit the registers."""
    return 2 if vector >= 16 else 1


def down_tile_rows(vector: int) -> int:
    return 4 if vector >= 16 else 2
