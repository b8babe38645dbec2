"""CPU kernel for the decode step's quantized linear layers with VNNI integer dot products.

``y[1, 1, N] = x[1, 1, K] @ dequantize(q, scales)^T`` for the layouts of ``qwen2c/quantization.py``,
without widening a single weight to float. The float kernel (``cpu_qmatmul.py``) spends four or five
512-bit operations per 16 weights (widen, convert, scale, multiply-add); this one spends one
``vpdpbusd`` per 64 weights (int8) or two per 128 (int4, after two byte masks), plus one float
scale step per 64-byte chunk. It does what llama.cpp's Q8_0/Q4_0 dot products do: the activation
row is first rounded to int8 with one float scale per 32 inputs (``ACT_GROUP``, Q8_0's block), once
per call, and every output then sums integer products and applies ``x_scale * w_scale`` per group.

The prologue (serial: K values, against N*K weight bytes) writes three small buffers:

- ``xq``: the int8 activations in the order the weight bytes are read. ``vpdpbusd`` multiplies
  *unsigned* bytes by *signed* ones, so the weights take the unsigned side: int8 weights are made
  unsigned with one XOR (w + 128); int4 nibbles are stored unsigned already (w + 8). For int4 a
  64-byte chunk holds four 32-input blocks whose low nibbles are inputs 0..15 and high nibbles inputs
  16..31, so ``xq`` holds each chunk's 64 "low" activations, then its 64 "high" ones.
- ``negc``: per chunk and lane, minus the offset times the sum of the activations that lane
  multiplies (128 or 8 times), so each chunk's integer accumulator starts at the correction that
  removes the unsigned offset, with no extra work per weight.
- ``xdl``: per chunk and lane, the float scale of the activation group that lane's inputs are in.

Lane ``l`` of a chunk covers weight bytes ``4l .. 4l + 3``, so its weight group is fixed by the
layout; the group scales are loaded as a short float16 vector and spread over the lanes with one
shuffle.

Only for one activation row (the decode step); prompts keep ``cpu_qmatmul`` (their weights are
reused across rows, so they are not bound by the weight stream). Needs AVX-512 VNNI (the target's
``cpu_features``) and K a multiple of the chunk (64 inputs for int8, 128 for int4).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .cpu_matmul import task_split
from .dequantize import INT4_BLOCK, qdtype, stored_shapes
from .lanes import lane_sum
from .prefetch import prefetch_stream

ACT_GROUP = 32  # activations per int8 scale: llama.cpp's Q8_0 block
CHUNK_BYTES = 64  # one 512-bit load of weight bytes
LANES = 16  # int32 lanes of one vpdpbusd
TILE_COLS = 1  # outputs per tile (tunable). One: each task reads its run of rows as one sequential stream;
# measured with the weights in DRAM (as a decode step finds them), int4 896x151936 streamed at 49 GB/s with
# one, 26 with four; int8 4864x896 at 49 vs 29 (two cores, 50 GB/s memory).
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"


def chunk_inputs(bits: int) -> int:
    return CHUNK_BYTES if bits == 8 else 2 * CHUNK_BYTES


def fits(k: int, n: int, bits: int, group: int) -> bool:
    """Whether this kernel serves a ``k``-input, ``n``-output layer (else ``cpu_qmatmul`` does)."""
    # Whole chunks, each holding whole weight groups (and, 64 or 128 inputs, whole activation groups).
    return k % chunk_inputs(bits) == 0 and chunk_inputs(bits) % group == 0


def default_tile_cols(n: int) -> int:
    return TILE_COLS if n % TILE_COLS == 0 else 1


def _lane_input(bits: int, lane: int) -> int:
    """The first input (within its chunk) that lane ``lane`` multiplies: its group decides its scales."""
    return 4 * lane if bits == 8 else INT4_BLOCK * (lane // 4) + 4 * (lane % 4)


def _spread(vec, width: int, index: list[int]):
    """``vec`` (``width`` lanes) spread to len(index) lanes: lane i takes ``vec[index[i]]``."""
    if width == 1:
        return T.broadcast(vec, len(index))
    # TIR's shuffle cannot widen one vector; over repeated copies it can (LLVM folds them to one permute).
    return tirx.Shuffle([vec] * (len(index) // width), [tirx.IntImm("int32", i) for i in index])


def dpbusd(acc, unsigned_bytes, signed_bytes):
    """acc + per int32 lane the sum of 4 unsigned-by-signed byte products (``vpdpbusd``)."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(VPDPBUSD), acc, unsigned_bytes, signed_bytes,
                                   dtype="int32x16")


def vnni_gemv_kernel(k: int, n: int, bits: int, group: int, dtype: str = "float32",
                     tile_cols: int | None = None):
    """A PrimFunc ``(x[1, 1, k], q, scales) -> y[1, 1, n]`` in ``dtype``; requires ``fits(k, n, ...)``."""
    if not fits(k, n, bits, group):
        raise ValueError(f"vnni_gemv: k={k}, bits={bits}, group={group} do not fit 64-byte chunks")
    tile_cols = tile_cols or default_tile_cols(n)
    if n % tile_cols:
        raise ValueError(f"vnni_gemv: tile_cols {tile_cols} does not divide n={n}")
    (_, kq), (_, ng) = stored_shapes(n, k, bits, group)
    ci = chunk_inputs(bits)
    nc, per_chunk = k // ci, ci // group  # chunks per row, weight scales per chunk
    lane_group = [_lane_input(bits, l) // group for l in range(LANES)]  # weight group of each lane, in its chunk
    acts_per_chunk = ci // ACT_GROUP
    offset = 128 if bits == 8 else 8  # what makes the weights unsigned
    K, N, NG, KQ, NC = (T.int64(v) for v in (k, n, ng, kq, nc))
    TJ, CI, PC = T.int64(tile_cols), T.int64(ci), T.int64(per_chunk)
    AG, APC, L = T.int64(ACT_GROUP), T.int64(acts_per_chunk), T.int64(LANES)
    NAG = T.int64(k // ACT_GROUP)
    B = T.int64(CHUNK_BYTES)
    tasks, per = task_split(n // tile_cols)
    NT, TASKS, PER = T.int64(n // tile_cols), T.int64(tasks), T.int64(per)

    def xq_pos(i):
        """Where activation ``i`` goes in ``xq`` (the order its weight bytes are read)."""
        if bits == 8:
            return i
        c, r = i // CI, i % CI
        half = r % T.int64(INT4_BLOCK) // T.int64(INT4_BLOCK // 2)  # low (0) or high (1) nibble
        return c * CI + half * B + r // T.int64(INT4_BLOCK) * T.int64(INT4_BLOCK // 2) + r % T.int64(INT4_BLOCK // 2)

    def weights(q, row, c):
        """The chunk's weight bytes as the unsigned operand(s) of vpdpbusd."""
        raw = q[row, T.ramp(c * B, T.int64(1), CHUNK_BYTES)]
        if bits == 8:
            return (T.bitwise_xor(raw, T.broadcast(T.int8(-128), CHUNK_BYTES)),)
        return (T.bitwise_and(raw, T.broadcast(T.uint8(15), CHUNK_BYTES)),
                T.shift_right(raw, T.broadcast(T.uint8(4), CHUNK_BYTES)))

    def chunk_dot(q, xq, negc, row, c):
        """int32 lanes: the chunk's integer products, starting from the offset correction."""
        acc = negc[T.ramp(c * L, T.int64(1), LANES)]
        for part, w in enumerate(weights(q, row, c)):
            acc = dpbusd(acc, w, xq[T.ramp(c * CI + T.int64(part) * B, T.int64(1), CHUNK_BYTES)])
        return acc

    def lane_scales(s, row, c):
        loaded = s[row, T.ramp(c * PC, T.int64(1), per_chunk)] if per_chunk > 1 else s[row, c * PC]
        return _spread(T.Cast(f"float32x{per_chunk}" if per_chunk > 1 else "float32", loaded), per_chunk, lane_group)

    @T.prim_func(private=True)
    def vnni_gemv(A: T.Buffer((T.int64(1), T.int64(1), K), dtype), q: T.Buffer((N, KQ), qdtype(bits)),
                  s: T.Buffer((N, NG), "float16"), C: T.Buffer((T.int64(1), T.int64(1), N), dtype)):
        T.func_attr({"tirx.noalias": True})
        xq = T.alloc_buffer((K,), "int8")
        xd = T.alloc_buffer((NAG,), "float32")
        negc = T.alloc_buffer((NC * L,), "int32")
        xdl = T.alloc_buffer((NC * L,), "float32")
        # Prologue 1: each group of 32 activations to int8 with scale max|x| / 127 (Q8_0's rounding).
        for g in range(NAG):
            amax = T.alloc_buffer((1,), "float32")
            amax[0] = T.float32(0)
            for i in range(AG):
                amax[0] = T.max(amax[0], T.fabs(T.Cast("float32", A[T.int64(0), T.int64(0), g * AG + i])))
            xd[g] = amax[0] / T.float32(127)
            inv = T.alloc_buffer((1,), "float32")
            inv[0] = T.if_then_else(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
            for i in T.vectorized(AG):
                xq[xq_pos(g * AG + i)] = T.Cast("int8", T.round(
                    T.Cast("float32", A[T.int64(0), T.int64(0), g * AG + i]) * inv[0]))
        # Prologue 2: per chunk and lane, the offset correction and the activation scale.
        for c in range(NC):
            for l in range(L):
                total = T.alloc_buffer((1,), "int32")
                total[0] = 0
                for b in range(T.int64(4)):
                    total[0] = total[0] + T.Cast("int32", xq[c * CI + l * T.int64(4) + b])
                    if bits == 4:
                        total[0] = total[0] + T.Cast("int32", xq[c * CI + B + l * T.int64(4) + b])
                negc[c * L + l] = total[0] * T.int32(-offset)
            for l in range(L):
                xdl[c * L + l] = xd[c * APC + l // T.int64(LANES // acts_per_chunk)]
        # The weight stream: TJ outputs per tile, one 64-byte chunk of each per step; each parallel task takes
        # a run of tiles (cpu_matmul.task_split).
        for task in T.parallel(TASKS):
            acc = T.alloc_buffer((TJ * L,), "float32")
            for tile in range(task * PER, T.min(task * PER + PER, NT)):  # see cpu_matmul.task_split
                for jj in T.unroll(TJ):
                    acc[T.ramp(jj * L, T.int64(1), LANES)] = T.broadcast(T.float32(0), LANES)
                for c in range(NC):
                    for jj in T.unroll(TJ):  # each row's stream, a line ahead per chunk (prefetch.py)
                        prefetch_stream(q, N, KQ, (tile * TJ + jj) * KQ + c * B)
                    for jj in T.unroll(TJ):
                        acc[T.ramp(jj * L, T.int64(1), LANES)] = acc[T.ramp(jj * L, T.int64(1), LANES)] + T.Cast(
                            "float32x16", chunk_dot(q, xq, negc, tile * TJ + jj, c)) * lane_scales(
                            s, tile * TJ + jj, c) * xdl[T.ramp(c * L, T.int64(1), LANES)]
                for jj in range(TJ):
                    C[T.int64(0), T.int64(0), tile * TJ + jj] = T.Cast(
                        dtype, lane_sum(acc[T.ramp(jj * L, T.int64(1), LANES)], LANES))

    return vnni_gemv
