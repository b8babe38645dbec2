"""GPU kernels for a Qwen2-MoE block, with the same names and signatures as ``cpu_moe.py``.

    route    one thread per token: float32 softmax over the experts, top-k (ties to the lower index)
    group    one block: a thread per expert counts its slots into shared memory, then sums the
             counts below its expert (its offset) and writes its slots in order (a stable counting sort)
    swiglu   grid (column tiles, experts); a warp per output column of the block's expert, lanes
             split the reduction, ROWS rows at a time so each weight element is loaded once per
             ROWS rows; an expert with no rows returns at once, so a decode step reads only its
             routed experts' weights
    down     the same, without the gather and the SwiGLU
    combine  one thread per (token, hidden) element, the router's order, float32 accumulation

Written directly with thread bindings and shared-memory reductions (no warp intrinsics), so the
same TIR builds for CUDA, ROCm, Metal and OpenCL.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .activations import gated
from .dequantize import element, qdtype, stored_shapes

WARP = 32
# Defaults (autotune/params.py may choose others per shape):
COLS = 4  # output columns (warps) per block of the grouped matmuls
ROWS = 4  # rows per pass over a weight row (at most a warp: lane r writes row r)
TOKENS_PER_BLOCK = 64


def route_kernel(experts: int, top_k: int, norm_topk_prob: bool, dtype: str = "float32"):
    """``(logits[t, E]) -> (weights[t, k] f32, experts[t, k] i32)``."""
    E, K, TB = T.int64(experts), T.int64(top_k), T.int64(TOKENS_PER_BLOCK)

    @T.prim_func(private=True, s_tir=True)
    def moe_route(a: T.handle, w: T.handle, i: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
        t = T.int64()
        logits = T.match_buffer(a, (t, E), dtype)
        weights = T.match_buffer(w, (t, K), "float32")
        chosen = T.match_buffer(i, (t, K), "int32")
        with T.sblock("root"):  # one-input kernels need a root block (see cpu_moe._ROOT_BLOCK)
            for bx in T.thread_binding((t + TB - T.int64(1)) // TB, thread="blockIdx.x"):
                for tx in T.thread_binding(TB, thread="threadIdx.x"):
                    with T.sblock("token"):  # scratch here is per thread; at the root it would be one global buffer
                        T.reads(logits[0:t, 0:E])
                        T.writes(weights[0:t, 0:K], chosen[0:t, 0:K])
                        probs = T.alloc_buffer((E,), "float32", scope="local")
                        stat = T.alloc_buffer((2,), "float32", scope="local")
                        best = T.alloc_buffer((1,), "int32", scope="local")
                        if bx * TB + tx < t:
                            stat[0] = T.Cast("float32", logits[bx * TB + tx, 0])
                            for e in range(E):
                                stat[0] = T.max(stat[0], T.Cast("float32", logits[bx * TB + tx, e]))
                            stat[1] = T.float32(0)
                            for e in range(E):
                                probs[e] = T.exp(T.Cast("float32", logits[bx * TB + tx, e]) - stat[0])
                                stat[1] = stat[1] + probs[e]
                            for e in range(E):
                                probs[e] = probs[e] / stat[1]
                            stat[1] = T.float32(0)
                            for j in range(K):
                                best[0] = 0
                                for e in range(E):
                                    if probs[e] > probs[best[0]]:
                                        best[0] = T.int32(e)
                                chosen[bx * TB + tx, j] = best[0]
                                weights[bx * TB + tx, j] = probs[best[0]]
                                stat[1] = stat[1] + probs[best[0]]
                                probs[best[0]] = T.float32(-1)
                            if norm_topk_prob:
                                for j in range(K):
                                    weights[bx * TB + tx, j] = weights[bx * TB + tx, j] / stat[1]

    return moe_route


def dense_route_kernel(experts: int, top_k: int):
    """``(weights[t, k], experts[t, k]) -> (weights[t, E], experts[t, E])``: the all-experts baseline."""
    E, K, TB = T.int64(experts), T.int64(top_k), T.int64(TOKENS_PER_BLOCK)

    @T.prim_func(private=True)
    def moe_dense_route(w: T.handle, i: T.handle, dw: T.handle, di: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
        t = T.int64()
        weights = T.match_buffer(w, (t, K), "float32")
        chosen = T.match_buffer(i, (t, K), "int32")
        dense_weights = T.match_buffer(dw, (t, E), "float32")
        dense_experts = T.match_buffer(di, (t, E), "int32")
        for bx in T.thread_binding((t + TB - T.int64(1)) // TB, thread="blockIdx.x"):
            for tx in T.thread_binding(TB, thread="threadIdx.x"):
                n = bx * TB + tx
                if n < t:
                    for e in range(E):
                        dense_weights[n, e] = T.float32(0)
                        dense_experts[n, e] = T.int32(e)
                    for j in range(K):
                        dense_weights[n, chosen[n, j]] = weights[n, j]

    return moe_dense_route


def group_kernel(experts: int, max_threads: int = 1024):
    """``(experts[slots]) -> (rows[slots], slot_of[slots], offsets[E + 1])``, a stable counting sort."""
    E = T.int64(experts)
    TH = T.int64(min(experts, max_threads))
    PER = T.int64(-(-experts // min(experts, max_threads)))

    @T.prim_func(private=True, s_tir=True)
    def moe_group(i: T.handle, r: T.handle, so: T.handle, off: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
        s = T.int64()
        chosen = T.match_buffer(i, (s,), "int32")
        rows = T.match_buffer(r, (s,), "int32")
        slot_of = T.match_buffer(so, (s,), "int32")
        offsets = T.match_buffer(off, (E + T.int64(1),), "int32")
        with T.sblock("root"):  # one-input kernels need a root block (see cpu_moe._ROOT_BLOCK)
            for bx in T.thread_binding(1, thread="blockIdx.x"):
                for tx in T.thread_binding(TH, thread="threadIdx.x"):
                    # Scratch is allocated in this inner block: at the root it would become one
                    # global buffer shared by every thread. Counts go through shared memory, since
                    # the barrier orders shared memory only (Metal's and OpenCL's fence threadgroup/
                    # local memory, not device memory); after it, each thread sums the counts below
                    # its expert itself, so nothing shared is written again.
                    with T.sblock("expert"):
                        T.reads(chosen[0:s])
                        T.writes(rows[0:s], slot_of[0:s], offsets[0:E + T.int64(1)])
                        counts = T.alloc_buffer((E,), "int32", scope="shared")
                        cursor = T.alloc_buffer((1,), "int32", scope="local")
                        for q in range(PER):
                            if q * TH + tx < E:
                                cursor[0] = 0
                                for p in range(s):
                                    if chosen[p] == T.Cast("int32", q * TH + tx):
                                        cursor[0] = cursor[0] + 1
                                counts[q * TH + tx] = cursor[0]
                        T.tvm_storage_sync("shared")
                        for q in range(PER):
                            if q * TH + tx < E:
                                cursor[0] = 0
                                for e in range(q * TH + tx):
                                    cursor[0] = cursor[0] + counts[e]
                                offsets[q * TH + tx] = cursor[0]
                                if q * TH + tx == E - T.int64(1):
                                    offsets[E] = cursor[0] + counts[E - T.int64(1)]
                                for p in range(s):
                                    if chosen[p] == T.Cast("int32", q * TH + tx):
                                        rows[cursor[0]] = T.Cast("int32", p)
                                        slot_of[p] = cursor[0]
                                        cursor[0] = cursor[0] + 1

    return moe_group


def grouped_swiglu_kernel(experts: int, hidden: int, inter: int, top_k: int, dtype: str = "float32", act: int = 0,
                          quant: tuple[int, int] | None = None, cols: int = COLS, rows: int = ROWS):
    """``(x[t, H], gate_up[E, 2I, H], rows[slots], offsets[E + 1]) -> h[slots, I]`` (h in float32):
    ``act(gate) * up``, ``act`` indexing ``activations.GATED_ACTIVATIONS`` (0, silu: SwiGLU).

    ``quant`` = (bits, group): the weights come as ``(q, scales)`` and are dequantized as they are read.
    """
    return _grouped_kernel(experts, hidden, inter, gather_top_k=top_k, swiglu=True, x_dtype=dtype, w_dtype=dtype,
                           act=act, quant=quant, cols=cols, rows=rows)


def grouped_down_kernel(experts: int, hidden: int, inter: int, dtype: str = "float32",
                        quant: tuple[int, int] | None = None, cols: int = COLS, rows: int = ROWS):
    """``(h[slots, I], down[E, H, I], rows[slots], offsets[E + 1]) -> y[slots, H]`` (float32)."""
    return _grouped_kernel(experts, inter, hidden, gather_top_k=None, swiglu=False, x_dtype="float32", w_dtype=dtype,
                           quant=quant, cols=cols, rows=rows)


def _grouped_kernel(experts: int, k_dim: int, n_out: int, gather_top_k: int | None, swiglu: bool,
                    x_dtype: str, w_dtype: str, act: int = 0,
                    quant: tuple[int, int] | None = None, cols: int = COLS, rows: int = ROWS):
    """out[p, j] = x[row(p)] . W[e(p), j] for the rows p of each expert e (SwiGLU of gate and up rows)."""
    gather = gather_top_k is not None
    E, KD, N = (T.int64(v) for v in (experts, k_dim, n_out))
    TOPK = T.int64(gather_top_k or 1)
    W_ROWS = N * T.int64(2) if swiglu else N
    KO = T.int64(-(-k_dim // WARP))
    assert rows <= WARP
    NB = T.int64(-(-n_out // cols))
    C, R, L = T.int64(cols), T.int64(rows), T.int64(WARP)

    def wload(w, sc, e, j, k):
        """The float32 weight [e, j, k]: a load, or (quantized) q and scales read and dequantized."""
        if quant is None:
            return T.Cast("float32", w[e, j, k])
        return element(w, sc, quant[0], quant[1], e, j, k)

    @T.macro
    def grouped(x, w, sc, rows, off, out):
        for e in T.thread_binding(E, thread="blockIdx.y"):
            for jb in T.thread_binding(NB, thread="blockIdx.x"):
                for ty in T.thread_binding(C, thread="threadIdx.y"):
                    for lane in T.thread_binding(L, thread="threadIdx.x"):
                        acc = T.alloc_buffer((R, 2), "float32", scope="local")
                        red = T.alloc_buffer((C, R, 2, L), "float32", scope="shared")
                        start = T.Cast("int64", off[e])
                        count = T.Cast("int64", off[e + T.int64(1)]) - start
                        j = jb * C + ty
                        for ro in range((count + R - T.int64(1)) // R):
                            for ri in range(R):
                                acc[ri, 0] = T.float32(0)
                                acc[ri, 1] = T.float32(0)
                            if j < N:
                                for ko in range(KO):
                                    if ko * L + lane < KD:
                                        for ri in range(R):
                                            if ro * R + ri < count:
                                                if gather:
                                                    acc[ri, 0] = acc[ri, 0] + T.Cast("float32", x[
                                                        T.Cast("int64", rows[start + ro * R + ri]) // TOPK,
                                                        ko * L + lane]) * wload(w, sc, e, j, ko * L + lane)
                                                    if swiglu:
                                                        acc[ri, 1] = acc[ri, 1] + T.Cast("float32", x[
                                                            T.Cast("int64", rows[start + ro * R + ri]) // TOPK,
                                                            ko * L + lane]) * wload(w, sc, e, N + j, ko * L + lane)
                                                else:
                                                    acc[ri, 0] = acc[ri, 0] + T.Cast(
                                                        "float32", x[start + ro * R + ri, ko * L + lane]) * wload(
                                                        w, sc, e, j, ko * L + lane)
                            for ri in range(R):
                                red[ty, ri, 0, lane] = acc[ri, 0]
                                red[ty, ri, 1, lane] = acc[ri, 1]
                            T.tvm_storage_sync("shared")
                            if lane < R:
                                if j < N and ro * R + lane < count:
                                    acc[0, 0] = T.float32(0)
                                    acc[0, 1] = T.float32(0)
                                    for q in range(L):
                                        acc[0, 0] = acc[0, 0] + red[ty, lane, 0, q]
                                        acc[0, 1] = acc[0, 1] + red[ty, lane, 1, q]
                                    if swiglu:
                                        out[start + ro * R + lane, j] = gated(act, acc[0, 0], acc[0, 1])
                                    else:
                                        out[start + ro * R + lane, j] = acc[0, 0]
                            T.tvm_storage_sync("shared")

    if quant is None:
        @T.prim_func(private=True)
        def moe_grouped_matmul(a: T.handle, w: T.Buffer((E, W_ROWS, KD), w_dtype), r: T.handle,
                               off: T.Buffer((E + T.int64(1),), "int32"), c: T.handle):
            T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
            t, s = T.int64(), T.int64()
            x = T.match_buffer(a, (t, KD), x_dtype)
            rows = T.match_buffer(r, (s,), "int32")
            out = T.match_buffer(c, (s, N), "float32")
            grouped(x, w, w, rows, off, out)
    else:
        (_, q_cols), (_, s_cols) = stored_shapes(int(W_ROWS), k_dim, quant[0], quant[1])

        @T.prim_func(private=True)
        def moe_grouped_matmul(a: T.handle, q: T.Buffer((E, W_ROWS, T.int64(q_cols)), qdtype(quant[0])),
                               sc: T.Buffer((E, W_ROWS, T.int64(s_cols)), "float16"), r: T.handle,
                               off: T.Buffer((E + T.int64(1),), "int32"), c: T.handle):
            T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
            t, s = T.int64(), T.int64()
            x = T.match_buffer(a, (t, KD), x_dtype)
            rows = T.match_buffer(r, (s,), "int32")
            out = T.match_buffer(c, (s, N), "float32")
            grouped(x, q, sc, rows, off, out)

    return moe_grouped_matmul


def combine_kernel(hidden: int, top_k: int, dtype: str = "float32"):
    """``(y[slots, H], slot_of[slots], weights[t, k]) -> out[t, H]``, accumulated in float32."""
    H, K, TB = T.int64(hidden), T.int64(top_k), T.int64(256)

    @T.prim_func(private=True)
    def moe_combine(a: T.handle, so: T.handle, w: T.handle, c: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
        t, s = T.int64(), T.int64()
        y = T.match_buffer(a, (s, H), "float32")
        slot_of = T.match_buffer(so, (s,), "int32")
        weights = T.match_buffer(w, (t, K), "float32")
        out = T.match_buffer(c, (t, H), dtype)
        for bx in T.thread_binding((t * H + TB - T.int64(1)) // TB, thread="blockIdx.x"):
            for tx in T.thread_binding(TB, thread="threadIdx.x"):
                acc = T.alloc_buffer((1,), "float32", scope="local")
                if bx * TB + tx < t * H:
                    acc[0] = T.float32(0)
                    for j in range(K):
                        acc[0] = acc[0] + weights[(bx * TB + tx) // H, j] * y[
                            T.Cast("int64", slot_of[(bx * TB + tx) // H * K + j]), (bx * TB + tx) % H]
                    out[(bx * TB + tx) // H, (bx * TB + tx) % H] = T.Cast(dtype, acc[0])

    return moe_combine
