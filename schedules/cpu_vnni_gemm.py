"""CPU kernel for the prompt's quantized linear layers with VNNI: ``y[1, m, N] = x[1, m, K] @ W^T``.

``W = dequantize(q, scales)`` in the layouts of ``qwen2c/quantization.py`` (int8, or int4 nibbles).
The float prompt kernel (``cpu_packed_matmul.py``) widens the weights into a float32 panel and does
16 multiply-adds per instruction. This one keeps them as bytes and does 64 per ``vpdpbusd``, as
llama.cpp's Q8_0/Q4_0 prompt path and oneDNN's int8 GEMMs do:

- **Activations** are rounded to int8 as the decode step's kernel rounds them (``cpu_vnni_gemv``:
  one float scale ``max|x| / 127`` per 32 inputs, llama.cpp's Q8_0), each row once per call, in
  parallel over rows. With them: per row and 32-input span, minus the weights' offset times the
  span's sum (the offset correction below).
- **Weights** are packed per task, a panel of ``16 * col_vectors`` output columns at a time, into
  VNNI order: for every 4 consecutive inputs, the 4 bytes of each column side by side, so one
  64-byte load holds 4 inputs of 16 columns. ``vpdpbusd`` multiplies unsigned bytes by signed
  ones: the weights take the unsigned side (int8 + 128 with one XOR; int4 nibbles are stored as
  w + 8 already) and a broadcast dword of 4 activations the signed side. The panel is packed with
  the block transpose (``lanes.block_transpose``) on dwords: a column's 64 bytes are 16 dwords.
- **The sweep**: every ``rows``-row tile of the prompt over the panel. Per 32-input span, integer
  accumulators start at the row's offset correction, take 8 ``vpdpbusd`` per column vector, then
  are converted and added to float accumulators with ``x_scale[row, span] * w_scale[col, span]``
  (both scales are constant over a span: the weight group is 32, 64 or the whole row).

Needs AVX-512 VNNI. ``fits`` says which layers it serves; the others keep the float kernels.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from . import cpu_vnni_gemv
from .cpu_matmul import task_split
from .cpu_vnni_gemv import ACT_GROUP, dpbusd
from .dequantize import qdtype, stored_shapes
from .lanes import block_transpose, lane_reduce, lane_sum

LANES = 16  # int32 lanes of one vpdpbusd (and float32 lanes of the accumulators)
SPAN = ACT_GROUP  # inputs per integer accumulation: one activation scale
PAIR = 2 * SPAN  # inputs per packed block: 64 bytes of a column, 16 dwords


def defaults(n: int) -> dict[str, int]:
    """Rows per tile and panel columns in vectors (``autotune/params.py``): 4 x 2 keeps 8 integer and
    8 float accumulators, 2 weight vectors and a broadcast in 32 zmm (one vector where ``n`` is not
    a whole number of 32-column panels)."""
    return {"rows": 4, "col_vectors": 2 if n % (2 * LANES) == 0 else 1}


def fits(k: int, n: int, bits: int, group: int, col_vectors: int = 1) -> bool:
    """Whether this kernel serves a ``k``-input, ``n``-output layer (with ``col_vectors``-vector panels)."""
    return k % PAIR == 0 and n % (LANES * col_vectors) == 0 and group % SPAN == 0 and k % group == 0


def serves(k: int, n: int, bits: int, group: int) -> bool:
    """Whether a VNNI engine rounds this layer's activations to int8: where both VNNI kernels fit, the
    decode step's (``cpu_vnni_gemv``) and the prompt's (this one). One predicate for both, so prompts
    and decode steps round the same layers and the parity check models them with one set."""
    return cpu_vnni_gemv.fits(k, n, bits, group) and fits(k, n, bits, group)


def vnni_gemm_kernel(k: int, n: int, bits: int, group: int, dtype: str = "float32", rows: int | None = None,
                     col_vectors: int | None = None):
    """A PrimFunc ``(x[1, m, k], q, scales) -> y[1, m, n]`` in ``dtype``; requires ``fits``."""
    rows = rows or defaults(n)["rows"]
    col_vectors = col_vectors or defaults(n)["col_vectors"]
    if not fits(k, n, bits, group, col_vectors):
        raise ValueError(f"vnni_gemm: k={k}, n={n}, group={group} do not fit {PAIR}-input blocks and "
                         f"{LANES * col_vectors}-column panels")
    transpose, in_tmp = block_transpose(LANES)
    (_, kq), (_, ng) = stored_shapes(n, k, bits, group)
    cols = LANES * col_vectors
    offset = 128 if bits == 8 else 8  # what makes the weights unsigned
    K, N, KQ, NG, TI, CV, L = (T.int64(v) for v in (k, n, kq, ng, rows, col_vectors, LANES))
    NSP, NQ, COLS = T.int64(k // SPAN), T.int64(k // 4), T.int64(cols)
    tasks, per = task_split(n // cols)
    NP, TASKS, PER = T.int64(n // cols), T.int64(tasks), T.int64(per)

    def lanes(start, width=LANES):
        return tirx.Ramp(start, T.int64(1), width)

    def clamped_row(io, ii, m):
        """Row ``ii`` of row tile ``io``, clamped to the last (rows past it are computed, not stored)."""
        return T.min(io * TI + ii, m - T.int64(1))

    def column_dwords(q, col, kb):
        """Inputs ``kb*PAIR ..`` of weight row ``col`` as 16 dwords of unsigned bytes, dword i holding
        inputs 4i .. 4i + 3 (the order vpdpbusd's lanes sum)."""
        if bits == 8:
            raw = T.reinterpret("int32x16", q[col, lanes(kb * T.int64(PAIR), 64)])
            return T.bitwise_xor(raw, T.broadcast(T.int32(-2139062144), LANES))  # 0x80808080: w + 128
        # int4: a 32-input block is 16 bytes, inputs 0..15 in the low nibbles, 16..31 in the high.
        raw = T.reinterpret("int32x8", q[col, lanes(kb * T.int64(PAIR // 2), 32)])
        low = T.bitwise_and(raw, T.broadcast(T.int32(0x0F0F0F0F), 8))
        high = T.bitwise_and(T.shift_right(raw, T.broadcast(T.int32(4), 8)), T.broadcast(T.int32(0x0F0F0F0F), 8))
        # dwords: block 0's low (inputs 0..15), block 0's high (16..31), block 1's low, block 1's high.
        return tirx.Shuffle([low, high], [tirx.IntImm("int32", i) for i in (0, 1, 2, 3, 8, 9, 10, 11,
                                                                               4, 5, 6, 7, 12, 13, 14, 15)])

    @T.macro
    def pack(q, s, panel, wscale, blk, tmp, jp):
        """Panel ``jp``: panel[k / 4, cols] dwords in VNNI order; wscale[span, cols] float32."""
        for jb, kb in T.grid(CV, K // T.int64(PAIR)):
            for r in T.unroll(LANES):
                blk[r, lanes(T.int64(0))] = column_dwords(q, jp * COLS + jb * L + r, kb)
            transpose(blk, tmp)
            for r in T.unroll(LANES):
                if in_tmp:
                    panel[kb * T.int64(PAIR // 4) + r, lanes(jb * L)] = tmp[r, lanes(T.int64(0))]
                else:
                    panel[kb * T.int64(PAIR // 4) + r, lanes(jb * L)] = blk[r, lanes(T.int64(0))]
        for sp, c in T.grid(NSP, COLS):
            wscale[sp, c] = T.Cast("float32", s[jp * COLS + c, sp * T.int64(SPAN) // T.int64(group)])

    @T.macro
    def sweep(xq, xd, negc, C, panel, wscale, iacc, facc, jp, m):
        """Every row tile of the prompt over panel ``jp``."""
        for io in range((m + TI - T.int64(1)) // TI):
            for ii, jv in T.grid(TI, CV):
                for v in T.vectorized(L):
                    facc[ii, jv, v] = T.float32(0)
            for sp in range(NSP):
                for ii in T.unroll(TI):
                    for jv in T.unroll(CV):
                        iacc[ii, jv, lanes(T.int64(0))] = T.broadcast(negc[clamped_row(io, ii, m), sp], LANES)
                for qd in T.unroll(T.int64(SPAN // 4)):
                    for ii in T.unroll(TI):
                        for jv in T.unroll(CV):
                            iacc[ii, jv, lanes(T.int64(0))] = dpbusd(
                                iacc[ii, jv, lanes(T.int64(0))],
                                T.reinterpret("uint8x64", panel[sp * T.int64(SPAN // 4) + qd, lanes(jv * L)]),
                                T.reinterpret("int8x64", T.broadcast(T.reinterpret("int32", xq[clamped_row(io, ii, m), lanes(
                                    sp * T.int64(SPAN) + qd * T.int64(4), 4)]), LANES)))
                for ii in T.unroll(TI):
                    for jv in T.unroll(CV):
                        facc[ii, jv, lanes(T.int64(0))] = facc[ii, jv, lanes(T.int64(0))] + T.Cast(
                            "float32x16", iacc[ii, jv, lanes(T.int64(0))]) * (wscale[sp, lanes(jv * L)] * T.broadcast(
                                xd[clamped_row(io, ii, m), sp], LANES))
            for ii in range(TI):
                if io * TI + ii < m:
                    for jv in range(CV):
                        for v in T.vectorized(L):
                            C[T.int64(0), io * TI + ii, jp * COLS + jv * L + v] = T.Cast(dtype, facc[ii, jv, v])

    @T.prim_func(private=True)
    def vnni_gemm(a: T.handle, q: T.Buffer((N, KQ), qdtype(bits)), s: T.Buffer((N, NG), "float16"), c: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        A = T.match_buffer(a, (T.int64(1), m, K), dtype)
        C = T.match_buffer(c, (T.int64(1), m, N), dtype)
        xq = T.alloc_buffer((m, K), "int8")
        xd = T.alloc_buffer((m, NSP), "float32")
        negc = T.alloc_buffer((m, NSP), "int32")
        # Activations: each 32-input span to int8 with scale max|x| / 127 (Q8_0's, as cpu_vnni_gemv rounds).
        for row in T.parallel(m):
            amax = T.alloc_buffer((1,), "float32")
            for sp in range(NSP):
                amax[0] = lane_reduce(T.fabs(T.Cast(f"float32x{SPAN}", A[T.int64(0), row, lanes(sp * T.int64(SPAN), SPAN)])),
                                      SPAN, T.max)
                xd[row, sp] = amax[0] / T.float32(127)
                amax[0] = T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
                for i in T.vectorized(SPAN):
                    xq[row, sp * T.int64(SPAN) + i] = T.Cast("int8", T.round(
                        T.Cast("float32", A[T.int64(0), row, sp * T.int64(SPAN) + i]) * amax[0]))
                negc[row, sp] = lane_sum(T.Cast(f"int32x{SPAN}", xq[row, lanes(sp * T.int64(SPAN), SPAN)]),
                                         SPAN) * T.int32(-offset)
        for task in T.parallel(TASKS):  # a run of panels each (cpu_matmul.task_split)
            panel = T.alloc_buffer((NQ, COLS), "int32")
            wscale = T.alloc_buffer((NSP, COLS), "float32")
            iacc = T.alloc_buffer((TI, CV, L), "int32")
            facc = T.alloc_buffer((TI, CV, L), "float32")
            blk = T.alloc_buffer((L, L), "int32")
            tmp = T.alloc_buffer((L, L), "int32")
            for t in range(T.min(PER, NP - task * PER)):
                pack(q, s, panel, wscale, blk, tmp, task * PER + t)
                sweep(xq, xd, negc, C, panel, wscale, iacc, facc, task * PER + t, m)

    return vnni_gemm
