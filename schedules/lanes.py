"""Work across vector lanes, written as shuffles for the CPU kernels.

- ``block_transpose``: a V x V block transposed in registers. The kernels that need a matrix's other
  orientation in vector lanes (the packed prompt matmuls' weight panels, float and VNNI) move it a
  square block at a time: V row loads, log2(V) stages in which rows i and i + b exchange their
  off-diagonal b-lane halves, V stores. A scalar copy costs a load and a store per element; this
  costs two shuffles per row and stage.
- ``lane_reduce`` / ``lane_sum``: one value from the lanes of a vector expression.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

LANES = (2, 4, 8, 16)  # the vector widths the stages below are written out for


def swap_lanes(b: int, lanes: int) -> tuple[list[int], list[int]]:
    """Indices into (row i, row i + b) concatenated giving the new rows i and i + b of one transpose
    stage: the off-diagonal b x b blocks of every 2b x 2b block change places."""
    first = [(lanes + l - b) if l & b else l for l in range(lanes)]
    second = [(lanes + l) if l & b else (l + b) for l in range(lanes)]
    return first, second


def block_transpose(vector: int):
    """``(transpose, in_tmp)``: a macro ``transpose(blk, tmp)`` over two local [V, V] buffers (int64
    indices) that transposes ``blk``, and whether the result lies in ``tmp`` (log2(V) stages
    alternate between the two, so it does when that is odd)."""
    if vector not in LANES:
        raise ValueError(f"block transpose: {vector} lanes; the stages are written out for {LANES}")
    zero = T.int64(0)

    def lanes(start):
        return tirx.Ramp(start, T.int64(1), vector)

    def swapped(src, i, b: int, which: int):
        idx = swap_lanes(b, vector)[which]
        return tirx.Shuffle([src[i, lanes(zero)], src[i + T.int64(b), lanes(zero)]],
                            [tirx.IntImm("int32", x) for x in idx])

    @T.macro
    def stage(src, dst, b: int):
        """Rows i (bit b clear) and i + b swap their off-diagonal halves."""
        for g, t in T.grid(T.int64(vector // (2 * b)), T.int64(b)):
            dst[g * T.int64(2 * b) + t, lanes(zero)] = swapped(src, g * T.int64(2 * b) + t, b, 0)
            dst[g * T.int64(2 * b) + t + T.int64(b), lanes(zero)] = swapped(src, g * T.int64(2 * b) + t, b, 1)

    @T.macro
    def transpose(blk, tmp):
        # Stages b = V/2, V/4, .., 1, alternating between the two blocks.
        stage(blk, tmp, vector // 2)
        if vector >= 4:
            stage(tmp, blk, vector // 4)
        if vector >= 8:
            stage(blk, tmp, vector // 8)
        if vector >= 16:
            stage(tmp, blk, vector // 16)

    return transpose, (vector.bit_length() - 1) % 2 == 1


def lane_reduce(vector, lanes: int, combine):
    """``combine`` (an associative binary op) over the lanes of a ``lanes``-wide vector expression:
    the halves combined log2(lanes) times.

    Written as shuffles of one value rather than as vectorized loops over a local buffer: LLVM turned
    the buffer form into an element-by-element extract and insert (about 40 instructions per score,
    decode attention's largest cost at long contexts); this is an extract and an op per halving."""
    while lanes > 1:
        half = lanes // 2
        vector = combine(tirx.Shuffle([vector], [tirx.IntImm("int32", i) for i in range(half)]),
                         tirx.Shuffle([vector], [tirx.IntImm("int32", i) for i in range(half, lanes)]))
        lanes = half
    return vector


def lane_sum(vector, lanes: int):
    """The sum of a ``lanes``-wide vector expression (``lane_reduce``)."""
    return lane_reduce(vector, lanes, lambda a, b: a + b)


def buffer_lane_sum(buf, prefix: tuple, lanes: int):
    """The sum of ``buf[*prefix, 0:lanes]`` (a power of two of lanes; one is a plain load): a vector
    accumulator's total as ``lane_sum`` does it, not ``lanes`` dependent scalar adds."""
    if lanes == 1:
        return buf[(*prefix, T.int64(0))]
    return lane_sum(buf[(*prefix, T.ramp(T.int64(0), T.int64(1), lanes))], lanes)
