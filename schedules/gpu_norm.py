"""RMSNorm on a GPU: one thread block per row, float32 sums, a shared-memory tree reduction.

``out = x * rsqrt(mean(x^2) + eps) * w`` with x and w widened as they are loaded, so a
half-precision norm is one kernel (no separate casts). Portable TIR (thread bindings, shared
memory, barriers): the same kernel builds for CUDA, ROCm, Metal and OpenCL.
"""

from __future__ import annotations

from tvm.script import tirx as T

THREADS = 256  # threads per row (a power of two; the default: autotune/params.py may choose another)


def rms_norm_kernel(hidden: int, eps: float, dtype: str, threads: int = THREADS):
    """``(x[rows, H], w[H]) -> out[rows, H]`` for any number of rows."""
    assert threads & (threads - 1) == 0, "the tree reduction halves the threads down to one"
    H, TB = T.int64(hidden), T.int64(threads)
    PER = T.int64(-(-hidden // threads))
    levels = threads.bit_length() - 1

    @T.prim_func(private=True)
    def rms_norm(a: T.handle, w: T.Buffer((H,), dtype), c: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 4, "tirx.is_scheduled": True})
        rows = T.int64()
        x = T.match_buffer(a, (rows, H), dtype)
        out = T.match_buffer(c, (rows, H), dtype)
        for r in T.thread_binding(rows, thread="blockIdx.x"):
            for tx in T.thread_binding(TB, thread="threadIdx.x"):
                partial = T.alloc_buffer((TB,), "float32", scope="shared")
                acc = T.alloc_buffer((1,), "float32", scope="local")
                acc[0] = T.float32(0)
                for i in range(PER):
                    if i * TB + tx < H:
                        acc[0] = acc[0] + T.Cast("float32", x[r, i * TB + tx]) * T.Cast("float32", x[r, i * TB + tx])
                partial[tx] = acc[0]
                T.tvm_storage_sync("shared")
                for level in range(levels):
                    if tx < T.shift_right(TB, level + 1):
                        partial[tx] = partial[tx] + partial[tx + T.shift_right(TB, level + 1)]
                    T.tvm_storage_sync("shared")
                acc[0] = T.rsqrt(partial[0] / T.float32(hidden) + T.float32(eps))
                for i in range(PER):
                    if i * TB + tx < H:
                        out[r, i * TB + tx] = T.Cast(dtype, T.Cast("float32", x[r, i * TB + tx]) * acc[0]
                                                     * T.Cast("float32", w[i * TB + tx]))

    return rms_norm
