"""A V x V float32 block transposed in registers: log2(V) stages of two-row shuffles.

The CPU kernels that need a matrix's other orientation in vector lanes (the packed prompt matmul's
weight panel, decode attention's keys) move it a square block at a time: V row loads, log2(V)
stages in which rows i and i + b exchange their off-diagonal b-lane halves, V stores. A scalar
copy costs a load and a store per element; this costs two shuffles per row and stage.
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


def block_transpose(vector: int, index=T.int64):
    """``(transpose, in_a)``: the macro ``transpose(src, col, a, b)`` below, and whether its result
    lies in ``a`` (it does when log2(V), the number of stages, is odd). ``index`` is the index
    dtype's constructor (``T.int64`` or ``T.int32``)."""
    if vector not in LANES:
        raise ValueError(f"block transpose: {vector} lanes; the stages are written out for {LANES}")

    def lanes(start):
        return tirx.Ramp(start, index(1), vector)

    def swapped(src, i, b: int, which: int, col):
        idx = swap_lanes(b, vector)[which]
        return tirx.Shuffle([src[i, lanes(col)], src[i + index(b), lanes(col)]],
                            [tirx.IntImm("int32", x) for x in idx])

    @T.macro
    def stage(src, dst, b: int, col):
        """Rows i (bit b clear) and i + b swap their off-diagonal halves."""
        for g, t in T.grid(index(vector // (2 * b)), index(b)):
            dst[g * index(2 * b) + t, lanes(index(0))] = swapped(src, g * index(2 * b) + t, b, 0, col)
            dst[g * index(2 * b) + t + index(b), lanes(index(0))] = swapped(src, g * index(2 * b) + t, b, 1, col)

    @T.macro
    def transpose(src, col, a, b):
        """The V x V block of ``src`` at column ``col`` (rows 0..V) transposed into ``a`` or ``b``
        (``in_a``): stages b = V/2, V/4, .., 1, the first reading ``src``, the rest alternating
        between ``a`` and ``b``. ``b`` may be ``src`` itself when ``col`` is 0."""
        stage(src, a, vector // 2, col)
        if vector >= 4:
            stage(a, b, vector // 4, index(0))
        if vector >= 8:
            stage(b, a, vector // 8, index(0))
        if vector >= 16:
            stage(a, b, vector // 16, index(0))

    return transpose, (vector.bit_length() - 1) % 2 == 1
