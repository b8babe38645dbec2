"""CPU kernels for the model's linear layers: ``y[1, m, N] = x[1, m, K] @ W[N, K]^T``.

Weights stay in the layout transformers stores them ([out, in], rows contiguous), so one copy
serves decode and prefill, and tied embeddings are not duplicated. The kernel computes a tile of
TI rows x TJ output features with TI*TJ vector accumulators running along K, reduced horizontally
at the end; rows past ``m`` are clamped, not predicated, so the inner loop stays branch-free.
``m`` is symbolic: the same kernel serves a prompt of any length and the decode step (m = 1),
where it streams each weight row exactly once.

Why hand-written rather than scheduled from the legalized matmul: TVM 0.27's rfactor-based
schedule for a symbolic row count allocates the reduction buffer at full size per parallel task
(measured: 130 ms vs 14 ms for 128x896x4864 on two Zen 3 cores).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard
from tvm.script import tirx as T

from qwen2c.autotune import params

from .lanes import buffer_lane_sum

TILE_COLS = 4  # the default; autotune/params.py may choose another per shape
MAX_TASKS = 256  # parallel tasks per call: enough to balance many cores, few enough to set up cheaply


def task_split(tiles: int) -> tuple[int, int]:
    """(tasks, tiles per task) for ``tiles`` output tiles: at most MAX_TASKS tasks, none empty.

    Why runs of tiles rather than one tile per parallel iteration: TVM 0.27 allocates a kernel's
    local buffers from its workspace pool (a call each, not the stack) at the top of the parallel
    body, which cost more than a decode step's tile of work. Measured on the vocabulary projection
    (896 x 151936, int8 VNNI kernel, four outputs per tile, TVM's default thread count here):
    14.5 ms with a task per tile, 6.5 ms with 256 tasks."""
    per = -(-tiles // MAX_TASKS)
    return -(-tiles // per), per


def nt_matmul_kernel(k: int, n: int, vector: int, tile_rows: int, tile_cols: int = TILE_COLS,
                     dtype: str = "float32"):
    """A PrimFunc ``(x[1, m, k], w[n, k]) -> y[1, m, n]`` in ``dtype``, accumulated in float32.

    Half-precision inputs are widened to float32 as they are loaded (a shift for bfloat16, F16C
    for float16), so a decode step streams half the bytes and sums as exactly as torch does.
    """
    K, N = T.int64(k), T.int64(n)
    body = nt_matmul_body(k, n, vector, tile_rows, tile_cols, dtype)

    @T.prim_func(private=True)
    def nt_matmul(a: T.handle, w: T.Buffer((N, K), dtype), c: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        A = T.match_buffer(a, (T.int64(1), m, K), dtype)
        C = T.match_buffer(c, (T.int64(1), m, N), dtype)
        body(A, w, C, m)

    return nt_matmul


def nt_matmul_body(k: int, n: int, vector: int, tile_rows: int, tile_cols: int = TILE_COLS, dtype: str = "float32"):
    """The kernel's loop nest as a macro ``(A, w, C, m)``, for kernels that take this path for some ``m``.

    No software prefetch, unlike the VNNI GEMV (``prefetch.py``): a tile's TJ rows are adjacent in
    memory, and the hardware prefetcher alone streams them at the memory's rate (float32 896 x 9728,
    weights cold, 2 threads: 58 GB/s); each row's line 4 KB ahead made it 0.65-0.90x.
    """
    K, N, TI, TJ, V = (T.int64(v) for v in (k, n, tile_rows, tile_cols, vector))
    KO = T.int64(k // vector)
    tasks, per = task_split(n // tile_cols)
    NT, TASKS, PER = T.int64(n // tile_cols), T.int64(tasks), T.int64(per)

    @T.macro
    def body(A, w, C, m):
        for task in T.parallel(TASKS):  # a run of column tiles each (task_split)
            acc = T.alloc_buffer((TI, TJ, V), "float32")
            # The tile index a loop variable, not an assigned scalar: TVM 0.27 makes the latter a buffer
            # drawn from its workspace pool in every task.
            for jo in range(task * PER, T.min(task * PER + PER, NT)):
                for io in range((m + TI - T.int64(1)) // TI):
                    for ii in T.unroll(TI):
                        for jj in T.unroll(TJ):
                            for v in T.vectorized(V):
                                acc[ii, jj, v] = T.float32(0)
                    for ko in range(KO):
                        for ii in T.unroll(TI):
                            for jj in T.unroll(TJ):
                                for v in T.vectorized(V):
                                    acc[ii, jj, v] = acc[ii, jj, v] + T.Cast("float32", A[
                                        T.int64(0), T.min(io * TI + ii, m - T.int64(1)), ko * V + v
                                    ]) * T.Cast("float32", w[jo * TJ + jj, ko * V + v])
                    for ii in range(TI):
                        if io * TI + ii < m:
                            for jj in range(TJ):
                                C[T.int64(0), io * TI + ii, jo * TJ + jj] = T.Cast(
                                    dtype, buffer_lane_sum(acc, (ii, jj), vector))

    return body


def tile_rows(vector: int) -> int:
    """Rows per tile for prompts: TI*TJ accumulators must fit the register file (16 ymm / 32 zmm).

    Measured for 128x896x4864 on two cores: AVX-512 4x4 5.1 ms, 2x4 5.8 ms (torch 4.2 ms).
    """
    return 4 if vector >= 16 else 2


KERNEL_DTYPES = ("float32", "float16", "bfloat16")


def _fits(x_ty, w_ty, vector: int) -> bool:
    if x_ty.dtype not in KERNEL_DTYPES or w_ty.dtype != x_ty.dtype or x_ty.ndim != 3 or w_ty.ndim != 2:
        return False
    batch, _, k = x_ty.shape
    n, wk = w_ty.shape
    static = all(isinstance(v, tvm.tirx.IntImm) for v in (batch, k, n, wk))
    return static and int(batch) == 1 and int(k) == int(wk) and int(k) % vector == 0 and int(n) % TILE_COLS == 0


def dispatch_cpu_matmul(vector_lanes: int) -> tvm.transform.Pass:
    """Replace ``matmul(x, permute_dims(w))`` (a traced linear layer) with ``nt_matmul``.

    Runs before legalization. Leaves any matmul it cannot serve (other dtypes, shapes whose K
    is not a multiple of the vector width) to the default lowering.
    """

    @tvm.transform.module_pass(opt_level=0, name="DispatchCpuMatmul")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _dispatch(mod, vector_lanes)

    return _pass


def _dispatch(mod: tvm.IRModule, vector: int) -> tvm.IRModule:
    from . import cpu_packed_matmul as packed  # it imports task_split from here

    x, w = wildcard(), wildcard()
    transpose = is_op("relax.permute_dims")(w)
    pattern = is_op("relax.matmul")(x, transpose)
    bb = relax.BlockBuilder(mod)
    kernels: dict[tuple[int, int, int], tvm.ir.GlobalVar] = {}

    def rewriter(expr, matches):
        x_ty, w_ty = matches[x].ty, matches[w].ty
        perm = matches[transpose].attrs.axes
        if not _fits(x_ty, w_ty, vector) or (perm is not None and [int(a) for a in perm] != [1, 0]):
            return expr
        k, n = int(w_ty.shape[1]), int(w_ty.shape[0])
        # One row (decode): a row tile of 1, so no work is spent on clamped duplicate rows.
        one_row = isinstance(x_ty.shape[1], tvm.tirx.IntImm) and int(x_ty.shape[1]) == 1
        dtype = x_ty.dtype
        key = (k, n, one_row, dtype)
        if key not in kernels:
            shape = {"k": k, "n": n, "rows": 1 if one_row else "m", "dtype": dtype, "vector": vector}
            if not one_row and packed.fits(k, n, vector, packed.defaults(vector)["col_vectors"]):
                # Prompts: outer products over a packed panel (cpu_packed_matmul.py), 1.3-3x nt_matmul.
                func = params.kernel("packed_matmul", shape, packed.defaults(vector),
                                     lambda rows, col_vectors: packed.packed_matmul_kernel(
                                         k, n, vector, rows, col_vectors, dtype=dtype))
                kernels[key] = bb.add_func(func, f"packed_matmul_k{k}_n{n}_{dtype}")
            else:
                defaults = {"tile_rows": 1 if one_row else tile_rows(vector), "tile_cols": TILE_COLS}
                func = params.kernel("nt_matmul", shape, defaults, lambda tile_rows, tile_cols: nt_matmul_kernel(
                    k, n, vector, tile_rows, tile_cols, dtype=dtype))
                kernels[key] = bb.add_func(func, f"nt_matmul_k{k}_n{n}_{'decode' if one_row else 'prefill'}_{dtype}")
        out_ty = relax.TensorType([1, x_ty.shape[1], n], dtype)
        return relax.call_tir(kernels[key], [matches[x], matches[w]], out_ty)

    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            bb.update_func(gv, rewrite_call(pattern, rewriter, func))
    return bb.finalize()
