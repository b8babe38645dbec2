"""CPU kernel for quantized linear layers: ``y[1, m, N] = x[1, m, K] @ dequantize(q, scales)^T``.

The shape of ``cpu_matmul.nt_matmul`` (TI rows x TJ output features of vector accumulators along K,
rows past m clamped, m symbolic: one kernel for prompts and, with TI = 1, for the decode step's
pure weight stream), with the weights read from their packed form: for each group of K and each
vector of V inputs, the TJ weight vectors are loaded as integers, widened, scaled by their group's
scale and kept in registers, then used by all TI rows. No dequantized weight is ever stored.

Inputs of a vector are contiguous in memory in both layouts (int4: V <= 16 inputs of one nibble
half of a 32-input block, see ``qwen2c/quantization.py``), so every load is a plain vector load of
bytes and the nibble shift is the same for all lanes.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .cpu_matmul import TILE_COLS, task_split
from .dequantize import INT4_BLOCK, qdtype, stored_shapes
from .lanes import buffer_lane_sum

# Defaults (autotune/params.py may choose others per shape): vectors per group unrolled up to this
# many (a per-channel int8 "group" is a whole row: a loop).
UNROLL = 8


def lanes(k: int, bits: int, group: int, vector: int) -> int:
    """Vector lanes: the target's, at most one nibble half of an int4 block, dividing the group."""
    v = min(vector, INT4_BLOCK // 2) if bits == 4 else vector
    while group % v:
        v //= 2
    return v


def default_tile_cols(n: int) -> int:
    return next(c for c in (TILE_COLS, 2, 1) if n % c == 0)


def q_matmul_kernel(k: int, n: int, bits: int, group: int, vector: int, tile_rows: int, dtype: str = "float32",
                    tile_cols: int | None = None, unroll: int = UNROLL, as_macro: bool = False):
    """A PrimFunc ``(x[1, m, k], q, scales) -> y[1, m, n]`` in ``dtype``, summed in float32 (``as_macro``:
    its loop nest as a macro ``(A, q, s, C, m)``, for kernels that take this path for some ``m``).

    ``k`` must be a multiple of ``group`` (and, for int4, of 32: ``WeightFormat.refusal``).
    """
    v_lanes = lanes(k, bits, group, vector)
    tile_cols = tile_cols or default_tile_cols(n)
    (_, kq), (_, ng) = stored_shapes(n, k, bits, group)
    K, N, TI, TJ, V = (T.int64(x) for x in (k, n, tile_rows, tile_cols, v_lanes))
    G, NG, KQ = T.int64(group), T.int64(ng), T.int64(kq)
    subs = group // v_lanes
    SUB = T.int64(subs)
    unrolled = subs <= unroll
    tasks, per = task_split(n // tile_cols)
    NT, TASKS, PER = T.int64(n // tile_cols), T.int64(tasks), T.int64(per)

    def weight(q, s, j, g, sub, v):
        scale = T.Cast("float32", s[j, g])
        if bits == 8:
            return T.Cast("float32", q[j, g * G + sub * V + v]) * scale
        first = sub * V  # the vector's first input in its group; v only adds to the byte index
        byte = g * (G // T.int64(2)) + first // T.int64(INT4_BLOCK) * T.int64(INT4_BLOCK // 2) + first % T.int64(
            INT4_BLOCK // 2) + v
        shift = T.Cast("int32", first // T.int64(INT4_BLOCK // 2) % T.int64(2) * T.int64(4))
        # nibble * scale - 8 * scale: one fused multiply-add per vector (the second term is per group).
        nibble = T.Cast("float32", T.bitwise_and(T.shift_right(T.Cast("int32", q[j, byte]), shift), 15))
        return nibble * scale + scale * T.float32(-8)

    @T.macro
    def group_step(A, q, s, acc, w, io, jo, g, sub, m):
        for jj in T.unroll(TJ):
            for v in T.vectorized(V):
                w[jj, v] = weight(q, s, jo * TJ + jj, g, sub, v)
        for ii in T.unroll(TI):
            for jj in T.unroll(TJ):
                for v in T.vectorized(V):
                    acc[ii, jj, v] = acc[ii, jj, v] + T.Cast("float32", A[
                        T.int64(0), T.min(io * TI + ii, m - T.int64(1)), g * G + sub * V + v]) * w[jj, v]

    @T.macro
    def body(A, q, s, C, m):
        for task in T.parallel(TASKS):  # a run of column tiles each (cpu_matmul.task_split)
            acc = T.alloc_buffer((TI, TJ, V), "float32")
            w = T.alloc_buffer((TJ, V), "float32")
            # The tile index a loop variable (an assigned one would be drawn from TVM's workspace pool).
            for jo in range(task * PER, T.min(task * PER + PER, NT)):
                for io in range((m + TI - T.int64(1)) // TI):
                    for ii in T.unroll(TI):
                        for jj in T.unroll(TJ):
                            for v in T.vectorized(V):
                                acc[ii, jj, v] = T.float32(0)
                    for g in range(NG):
                        if unrolled:
                            for sub in T.unroll(SUB):
                                group_step(A, q, s, acc, w, io, jo, g, sub, m)
                        else:
                            for sub in range(SUB):
                                group_step(A, q, s, acc, w, io, jo, g, sub, m)
                    for ii in range(TI):
                        if io * TI + ii < m:
                            for jj in range(TJ):
                                C[T.int64(0), io * TI + ii, jo * TJ + jj] = T.Cast(
                                    dtype, buffer_lane_sum(acc, (ii, jj), v_lanes))

    if as_macro:
        return body

    @T.prim_func(private=True)
    def q_matmul(a: T.handle, q: T.Buffer((N, KQ), qdtype(bits)), s: T.Buffer((N, NG), "float16"), c: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        A = T.match_buffer(a, (T.int64(1), m, K), dtype)
        C = T.match_buffer(c, (T.int64(1), m, N), dtype)
        body(A, q, s, C, m)

    return q_matmul

