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
(m = 1), which keeps ``nt_matmul``'s single pass over the weights, and prompts under ``SMALL_ROWS``
run the unpacked loop nest inside the same function. Rows past ``m`` are clamped (they recompute
the last row) and not stored. int8/int4 weights are dequantized into the panel as it is packed.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .cpu_matmul import TILE_COLS, nt_matmul_body, task_split, tile_rows
from .cpu_qmatmul import q_matmul_kernel
from .dequantize import INT4_BLOCK, qdtype, stored_shapes
from .lanes import LANES as TRANSPOSE_LANES
from .lanes import block_transpose

# Prompts shorter than this take the unpacked kernel (cpu_matmul / cpu_qmatmul) inside the same
# function: packing K x cols weights for a handful of rows costs more than it saves (measured on
# two Zen 5 cores: 0.5-1.0x at 2 rows, 0.9-1.3x at 8, 1.3-1.8x at 64).
SMALL_ROWS = 8


def defaults(vector: int) -> dict[str, int]:
    """Rows per tile and panel columns in vectors (both tunable, ``autotune/params.py``): 8 x 2
    accumulators, two panel vectors and a broadcast in 32 zmm; 6 x 2 in 16 ymm. Measured on two Zen 5
    cores (m = 128 / 1,024): 8x2 within 3% of the best of {4x4, 6x2, 8x2, 12x2} on every qwen2-0.5b
    shape; 4x4 was 1.4x slower at k = 4864 (its 64-column panel, 1.2 MB, leaves L2)."""
    return {"rows": 8 if vector >= 16 else 6, "col_vectors": 2}


def fits(k: int, n: int, vector: int, col_vectors: int) -> bool:
    # Whole panels of columns; K in whole vectors (the panel is packed a square block at a time).
    return vector in TRANSPOSE_LANES and n % (col_vectors * vector) == 0 and k % vector == 0


def packed_matmul_kernel(k: int, n: int, vector: int, rows: int | None = None, col_vectors: int | None = None,
                         dtype: str = "float32", quant: tuple[int, int] | None = None):
    """A PrimFunc ``(x[1, m, k], w[n, k]) -> y[1, m, n]`` in ``dtype``, accumulated in float32; with
    ``quant`` (bits, group), ``(x, q, scales) -> y`` over the layouts of ``qwen2c/quantization.py``,
    dequantized as the panel is packed (the panel is float32 either way: no dequantized copy of the
    weights outlives the call, and each task's is one panel)."""
    transpose, in_tmp = block_transpose(vector)  # raises for lane counts it is not written out for
    rows = rows or defaults(vector)["rows"]
    col_vectors = col_vectors or defaults(vector)["col_vectors"]
    cols = col_vectors * vector
    if n % cols:
        raise ValueError(f"packed_matmul: {cols} columns per panel do not divide n={n}")
    K, N, TI, CV, V, COLS = (T.int64(v) for v in (k, n, rows, col_vectors, vector, cols))
    tasks, per = task_split(n // cols)
    NP, TASKS, PER = T.int64(n // cols), T.int64(tasks), T.int64(per)

    def lanes(start):
        return tirx.Ramp(start, T.int64(1), vector)

    def weight_vector(w, q, s, row, k0):
        """float32 weights ``row``, inputs ``k0 .. k0 + V`` (k0 a multiple of V): one vector load."""
        if quant is None:
            return T.Cast(f"float32x{vector}", w[row, lanes(k0)])
        bits, group = quant
        scale = tirx.Broadcast(T.Cast("float32", s[row, k0 // T.int64(group)]), vector)
        if bits == 8:
            return T.Cast(f"float32x{vector}", q[row, lanes(k0)]) * scale
        # int4: V <= 16 inputs of one nibble half of a 32-input block, contiguous bytes, one shift.
        byte = k0 // T.int64(INT4_BLOCK) * T.int64(INT4_BLOCK // 2) + k0 % T.int64(INT4_BLOCK // 2)
        shift = tirx.Broadcast(T.Cast("int32", k0 // T.int64(INT4_BLOCK // 2) % T.int64(2) * T.int64(4)), vector)
        nibble = T.bitwise_and(T.shift_right(T.Cast(f"int32x{vector}", q[row, lanes(byte)]), shift),
                               tirx.Broadcast(T.int32(15), vector))
        return (T.Cast(f"float32x{vector}", nibble) - tirx.Broadcast(T.float32(8), vector)) * scale

    @T.macro
    def pack(w, q, s, panel, blk, tmp, jp):
        """Panel ``jp`` (weight rows jp*COLS ..) transposed into ``panel`` [K, COLS], a V x V block at
        a time: V row loads, log2(V) stages of two-row shuffles, V stores (a scalar copy costs a load
        and a store per weight, which dominated prompts of a few hundred rows)."""
        for jb, kb in T.grid(CV, K // V):
            for r in T.unroll(V):
                blk[r, lanes(T.int64(0))] = weight_vector(w, q, s, jp * COLS + jb * V + r, kb * V)
            transpose(blk, tmp)
            for r in T.unroll(V):
                if in_tmp:
                    panel[kb * V + r, lanes(jb * V)] = tmp[r, lanes(T.int64(0))]
                else:
                    panel[kb * V + r, lanes(jb * V)] = blk[r, lanes(T.int64(0))]

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

    @T.macro
    def packed(A, w, q, s, C, m):
        for task in T.parallel(TASKS):  # a run of panels each (cpu_matmul.task_split)
            panel = T.alloc_buffer((K, COLS), "float32")
            acc = T.alloc_buffer((TI, CV, V), "float32")
            blk = T.alloc_buffer((V, V), "float32")
            tmp = T.alloc_buffer((V, V), "float32")
            for t in range(T.min(PER, NP - task * PER)):
                pack(w, q, s, panel, blk, tmp, task * PER + t)
                sweep(A, C, panel, acc, task * PER + t, m)

    if quant is None:
        small = nt_matmul_body(k, n, vector, tile_rows(vector), next(c for c in (TILE_COLS, 2, 1) if n % c == 0), dtype)

        @T.prim_func(private=True)
        def packed_matmul(a: T.handle, w: T.Buffer((N, K), dtype), c: T.handle):
            T.func_attr({"tirx.noalias": True})
            m = T.int64()
            A = T.match_buffer(a, (T.int64(1), m, K), dtype)
            C = T.match_buffer(c, (T.int64(1), m, N), dtype)
            if m < T.int64(SMALL_ROWS):
                small(A, w, C, m)
            else:
                packed(A, w, None, None, C, m)

        return packed_matmul

    bits, group = quant
    (_, kq), (_, ng) = stored_shapes(n, k, bits, group)
    small = q_matmul_kernel(k, n, bits, group, vector, tile_rows(vector), dtype, as_macro=True)
    KQ, NG = T.int64(kq), T.int64(ng)

    @T.prim_func(private=True)
    def packed_q_matmul(a: T.handle, q: T.Buffer((N, KQ), qdtype(bits)), s: T.Buffer((N, NG), "float16"),
                        c: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        A = T.match_buffer(a, (T.int64(1), m, K), dtype)
        C = T.match_buffer(c, (T.int64(1), m, N), dtype)
        if m < T.int64(SMALL_ROWS):
            small(A, q, s, C, m)
        else:
            packed(A, None, q, s, C, m)

    return packed_q_matmul
