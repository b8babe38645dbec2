"""CPU kernel for the prompt's linear layers: ``y[1, m, N] = x[1, m, K] @ W[N, K]^T`` for m > 1.

``nt_matmul`` (``cpu_matmul.py``) keeps the weights' [out, in] layout all the way into its inner
loop: each accumulator runs along K and is summed across its lanes at the end, and every step loads
one vector of x and one of W per row and column of the tile, so it is bound by loads and not by
multiply-adds. This kernel does what a BLAS does: each task packs a panel of ``cols`` output columns
once, transposed to [K, cols] (widened to float32 on the way: bfloat16 and float16 weights cost
nothing more), then sweeps every row tile of the prompt over it as outer products: per input k,
``cols / lanes`` panel vectors and ``rows`` broadcast inputs feed ``rows * cols / lanes`` multiply-adds
into accumulators that never leave registers and never need a lane sum.

The panel is packed once per call and reused by all ``ceil(m / rows)`` row tiles, so packing costs
``K * cols`` copies against ``m * K * cols`` multiply-adds: it is for prompts, not the decode step
(m = 1), which keeps ``nt_matmul``'s single pass over the weights. Rows past ``m`` are clamped (they
recompute the last row) and not stored.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .cpu_matmul import task_split
from .dequantize import element, qdtype, stored_shapes

ROWS = 6  # rows per tile (tunable): ROWS * COL_VECTORS accumulators plus the panel's vectors fit 32 zmm
COL_VECTORS = 4  # panel columns, in vectors (tunable)


def fits(k: int, n: int, vector: int, col_vectors: int = COL_VECTORS) -> bool:
    return n % (col_vectors * vector) == 0


def packed_matmul_kernel(k: int, n: int, vector: int, rows: int = ROWS, col_vectors: int = COL_VECTORS,
                         dtype: str = "float32", quant: tuple[int, int] | None = None):
    """A PrimFunc ``(x[1, m, k], w[n, k]) -> y[1, m, n]`` in ``dtype``, accumulated in float32; with
    ``quant`` (bits, group), ``(x, q, scales) -> y`` over the layouts of ``qwen2c/quantization.py``,
    dequantized as the panel is packed (the panel is float32 either way: no dequantized copy of the
    weights outlives the call, and each task's is one panel)."""
    cols = col_vectors * vector
    if n % cols:
        raise ValueError(f"packed_matmul: {cols} columns per panel do not divide n={n}")
    K, N, TI, CV, V, COLS = (T.int64(v) for v in (k, n, rows, col_vectors, vector, cols))
    tasks, per = task_split(n // cols)
    NP, TASKS, PER = T.int64(n // cols), T.int64(tasks), T.int64(per)

    @T.macro
    def sweep(A, C, panel, acc, jp, m):
        """Every row tile of the prompt over the packed panel ``jp``: outer products along K."""
        for io in range((m + TI - T.int64(1)) // TI):
            for ii in T.unroll(TI):
                for jv in T.unroll(CV):
                    for v in T.vectorized(V):
                        acc[ii, jv, v] = T.float32(0)
            for kk in range(K):
                for ii in T.unroll(TI):
                    for jv in T.unroll(CV):
                        for v in T.vectorized(V):
                            acc[ii, jv, v] = acc[ii, jv, v] + T.Cast("float32", A[
                                T.int64(0), T.min(io * TI + ii, m - T.int64(1)), kk]) * panel[kk, jv * V + v]
            for ii in range(TI):
                if io * TI + ii < m:
                    for jv in range(CV):
                        for v in T.vectorized(V):
                            C[T.int64(0), io * TI + ii, jp * COLS + jv * V + v] = T.Cast(dtype, acc[ii, jv, v])

    if quant is None:
        @T.prim_func(private=True)
        def packed_matmul(a: T.handle, w: T.Buffer((N, K), dtype), c: T.handle):
            T.func_attr({"tirx.noalias": True})
            m = T.int64()
            A = T.match_buffer(a, (T.int64(1), m, K), dtype)
            C = T.match_buffer(c, (T.int64(1), m, N), dtype)
            for task in T.parallel(TASKS):  # a run of panels each (cpu_matmul.task_split)
                panel = T.alloc_buffer((K, COLS), "float32")
                acc = T.alloc_buffer((TI, CV, V), "float32", scope="local")
                for t in range(T.min(PER, NP - task * PER)):
                    # Each weight row is read contiguously and written down a column of the panel.
                    for j, kk in T.grid(COLS, K):
                        panel[kk, j] = T.Cast("float32", w[(task * PER + t) * COLS + j, kk])
                    sweep(A, C, panel, acc, task * PER + t, m)

        return packed_matmul

    bits, group = quant
    (_, kq), (_, ng) = stored_shapes(n, k, bits, group)
    KQ, NG = T.int64(kq), T.int64(ng)

    @T.prim_func(private=True)
    def packed_q_matmul(a: T.handle, q: T.Buffer((N, KQ), qdtype(bits)), s: T.Buffer((N, NG), "float16"),
                        c: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        A = T.match_buffer(a, (T.int64(1), m, K), dtype)
        C = T.match_buffer(c, (T.int64(1), m, N), dtype)
        for task in T.parallel(TASKS):
            panel = T.alloc_buffer((K, COLS), "float32")
            acc = T.alloc_buffer((TI, CV, V), "float32", scope="local")
            for t in range(T.min(PER, NP - task * PER)):
                for j, kk in T.grid(COLS, K):
                    panel[kk, j] = element(q, s, bits, group, (task * PER + t) * COLS + j, kk)
                sweep(A, C, panel, acc, task * PER + t, m)

    return packed_q_matmul
