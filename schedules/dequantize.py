"""Reading quantized weights inside kernels (layouts: ``qwen2c/quantization.py``).

``element(q, s, bits, group, *lead, k)`` is the float32 value of weight ``[*lead, k]`` as an
expression on the packed buffer ``q`` and the scales ``s``: kernels use it where they would load a
float weight, so the weight is dequantized in registers and never stored. Also here: the two
kernels every device kind shares, written as plain TIR for the device's scheduler:

- ``take_kernel``: the embedding gather of quantized rows (CPU: ``cpu_injective``; GPU: DLight);
- ``gpu_matmul_kernel``: the dequantize and the NT matmul as two blocks of one function, the form
  FuseOps/FuseTIR give a fused dequantize-matmul, which DLight schedules with the dequantize inlined
  into the weight loads: Matmul for prompts; for the decode step GEMV (int8), or GeneralReduction
  (int4: TVM 0.27's GEMV rule cannot analyse the two-level index of the 32-input nibble blocks and
  raises, so the pipeline's next rule takes it: one cross-thread reduction per output).

Why not a separate dequantize function that FuseOps fuses, as MLC-LLM does: here the pipeline lifts
everything that depends on weights alone into ``transform_params`` before FuseOps runs, so a
dequantize of its own would be computed once at load into a dequantized copy, the thing to avoid.
"""

from __future__ import annotations

from tvm import te, tirx

INT4_BLOCK = 32


def int4_byte(k):
    """Byte of input ``k`` in its row, and the shift of its nibble (see quantization.py)."""
    return k // INT4_BLOCK * (INT4_BLOCK // 2) + k % (INT4_BLOCK // 2), k // (INT4_BLOCK // 2) % 2 * 4


def nibble_value(byte, shift):
    """float32 (nibble - 8) of an int4 byte read."""
    return tirx.Cast("float32", (tirx.Cast("int32", byte) >> shift) & 15) - tirx.const(8, "float32")


def element(q, s, bits: int, group: int, *index):
    """float32 weight ``[*lead, k]`` read from ``q`` (packed) and ``s`` (scales)."""
    *lead, k = index
    scale = tirx.Cast("float32", s[(*lead, k // group)])
    if bits == 8:
        return tirx.Cast("float32", q[(*lead, k)]) * scale
    byte, shift = int4_byte(k)
    return nibble_value(q[(*lead, byte)], shift) * scale


def stored_shapes(n: int, k: int, bits: int, group: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return (n, k if bits == 8 else k // 2), (n, k // group)


def qdtype(bits: int) -> str:
    return "int8" if bits == 8 else "uint8"


def take_kernel(rows: int, k: int, bits: int, group: int, dtype: str, ids_dtype: str = "int32"):
    """``(q[rows, .], scales[rows, .], ids[n]) -> out[n, k]``: the embedding of each id, dequantized."""
    q_shape, s_shape = stored_shapes(rows, k, bits, group)
    n = tirx.Var("n", "int64")
    q = te.placeholder(q_shape, qdtype(bits), name="q")
    s = te.placeholder(s_shape, "float16", name="scales")
    ids = te.placeholder((n,), ids_dtype, name="ids")
    out = te.compute((n, k), lambda t, j: element(q, s, bits, group, tirx.Cast("int64", ids[t]), j).astype(dtype),
                     name="dequantize_take")
    return te.create_prim_func([q, s, ids, out]).without_attr("global_symbol")


def gpu_matmul_kernel(k: int, n: int, bits: int, group: int, dtype: str, rows=None):
    """``(x[1, m, k], q, scales) -> y[1, m, n]``: dequantize block + NT matmul block, float32 sums.

    ``rows``: m when static (decode: 1), else symbolic. Every extent
    is int64, as in the legalized matmuls DLight expects (mixed int32/int64 indices fail its rules).
    """
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    m = tirx.Var("m", "int64") if rows is None else i64(rows)
    (qn, qk), (sn, sk) = stored_shapes(n, k, bits, group)
    x = te.placeholder((i64(1), m, i64(k)), dtype, name="x")
    q = te.placeholder((i64(qn), i64(qk)), qdtype(bits), name="q")
    s = te.placeholder((i64(sn), i64(sk)), "float16", name="scales")
    w = te.compute((i64(n), i64(k)), lambda j, i: element(q, s, bits, group, j, i), name="dequantize")  # float32
    r = te.reduce_axis((i64(0), i64(k)), name="k")
    acc = te.compute((i64(1), m, i64(n)), lambda b, i, j: te.sum(x[b, i, r].astype("float32") * w[j, r], axis=r),
                     name="NT_matmul")
    out = acc if dtype == "float32" else te.compute(acc.shape, lambda b, i, j: acc[b, i, j].astype(dtype), name="cast")
    func = te.create_prim_func([x, q, s, out]).without_attr("global_symbol")
    # Not fused with its neighbours: TVM 0.27's FuseTIR fails on a half-precision one followed by a
    # bias add ("Inconsistent buffers cast and lv.. mapped to the same relax var").
    return func if dtype == "float32" else func.with_attr("op_pattern", 8)
