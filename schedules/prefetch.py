"""Software prefetch for the CPU kernels' weight streams.

A decode step's linear layer reads each output row's weights once, as one sequential stream per
row, and a task interleaves the streams of its tile's rows. With the hardware prefetcher alone,
long rows waited on DRAM; each 64-byte step of a row therefore also asks for the line
``STREAM_AHEAD_BYTES`` further on in that row (``llvm.prefetch``: read, locality 3, data cache).
The distance was chosen on the VNNI GEMV (int4 4864 x 896, rows of 2.4 KB, weights cold, 2 threads:
36-40 GB/s without, 46-50 with; 1 KB ahead was too close, 8 KB no better). The float decode GEMV
(``cpu_matmul``) does without: its tile's rows are adjacent, which the hardware prefetcher serves.
"""

from __future__ import annotations

from tvm.script import tirx as T

STREAM_AHEAD_BYTES = 4096


def prefetch(buffer, *index):
    """Ask for the cache line holding ``buffer[index]`` (a hint: it never faults nor blocks)."""
    return T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(buffer[index]),
                                         T.uint32(0), T.uint32(3), T.uint32(1)))


def prefetch_stream(buffer, rows, cols, at):
    """Prefetch the line ``STREAM_AHEAD_BYTES`` past flat byte ``at`` of a row-major [rows, cols]
    byte buffer (packed weights), clamped to its last byte (the address stays inside the buffer)."""
    ahead = T.min(at + T.int64(STREAM_AHEAD_BYTES), rows * cols - T.int64(1))
    return prefetch(buffer, ahead // cols, ahead % cols)
