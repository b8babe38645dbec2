"""``exp`` and ``exp2`` of float32 lowered to arithmetic that vectorizes, for the CPU build.

TVM lowers ``exp`` to LLVM's ``llvm.exp``, which LLVM turns, for a vector on x86, into one libm call per
lane: the legalized SwiGLU (``silu(gate) * up``) called ``expf`` 16 times per 512-bit vector, 5% of a
128-token prefill of qwen2-0.5b (13.9 of 270 ms measured), and TVM's KV-cache kernels (state merges,
tree attention) call ``expf``/``exp2f`` per score. While a CPU engine is compiled, the LLVM lowering of
both is replaced (``FLowerIntrinsic`` at a higher level, restored after):

* ``exp(x)``: Cody-Waite reduction, ``x = n ln2 + r`` with ``n = round(x log2 e)`` and ``ln2`` split in
  two (its high part exact in 24 bits, so ``n ln2_hi`` is exact), ``|r| <= ln2 / 2``; ``e^r`` by its
  Taylor series to degree 7 (truncation 5e-9); ``2^n`` built in the exponent bits. About one float32
  ulp, as libm; 0 below 2^-126 (no subnormal results), inf past x = 88.7 as libm.
* ``exp2(y)``: ``2^floor(y) * p(y - floor(y))`` (exact reduction), ``p`` of degree 6, relative error
  1.9e-9 (``cpu_decode_attention.fast_exp2``); 2^127.99 past 127.99 (libm: inf), 0 below -126.

Other dtypes keep TVM's lowering.
"""

from __future__ import annotations

import contextlib
import math

import tvm
from tvm import tirx

from qwen2c.schedules.cpu_decode_attention import _EXP2_POLY

ATTR = "llvm.FLowerIntrinsic"
LEVEL = 100  # above TVM's own registration (10)
LN2_HI = 0.693145751953125  # ln 2 to 16 bits: n * LN2_HI is exact for |n| < 256
LN2_LO = 1.428606765330187e-06  # ln 2 - LN2_HI
_TAYLOR = [1.0 / math.factorial(i) for i in range(8)]


def _constant(lanes: int):
    def c(value, dtype="float32"):
        scalar = tirx.const(value, dtype)
        return tirx.Broadcast(scalar, lanes) if lanes > 1 else scalar
    return c


def _power_of_two(n, lanes: int, c):
    """2^n for a float32 integral ``n`` in [-126, 127], through the exponent bits."""
    ints = "int32" if lanes == 1 else f"int32x{lanes}"
    bits = (tirx.Cast(ints, n) + c(127, "int32")) * c(1 << 23, "int32")
    return tirx.call_intrin("float32" if lanes == 1 else f"float32x{lanes}", "tirx.reinterpret", bits)


def _exp(x, lanes: int):
    c = _constant(lanes)
    n = tirx.floor(x * c(math.log2(math.e)) + c(0.5))
    n = tirx.Max(tirx.Min(n, c(127.0)), c(-126.0))
    r = x - n * c(LN2_HI) - n * c(LN2_LO)
    p = c(_TAYLOR[-1])
    for coefficient in reversed(_TAYLOR[:-1]):
        p = p * r + c(coefficient)
    return tirx.Select(x < c(-87.33654), c(0.0), p * _power_of_two(n, lanes, c))


def _exp2(y, lanes: int):
    c = _constant(lanes)
    clamped = tirx.Max(tirx.Min(y, c(127.99)), c(-126.0))
    n = tirx.floor(clamped)
    f = clamped - n
    p = c(_EXP2_POLY[-1])
    for coefficient in reversed(_EXP2_POLY[:-1]):
        p = p * f + c(coefficient)
    return tirx.Select(y < c(-126.0), c(0.0), p * _power_of_two(n, lanes, c))


def _lowering(polynomial, previous):
    def lower(call):
        dtype = tvm.DataType(str(call.ty.dtype))
        if dtype.type_code != tvm.DataType("float32").type_code or dtype.bits != 32:
            return previous(call)
        return polynomial(call.args[0], dtype.lanes)
    return lower


@contextlib.contextmanager
def vector_exp_lowering():
    """Within: float32 ``exp``/``exp2`` lower to the arithmetic above for LLVM targets."""
    ops = {"tirx.exp": _exp, "tirx.exp2": _exp2}
    previous = {}
    try:
        for name, polynomial in ops.items():
            op = tvm.ir.Op.get(name)
            previous[name] = op.get_attr(ATTR)
            op.set_attr(ATTR, _lowering(polynomial, previous[name]), LEVEL)
        yield
    finally:
        for name, lower in previous.items():
            op = tvm.ir.Op.get(name)
            op.reset_attr(ATTR)
            if lower is not None:
                op.set_attr(ATTR, lower, 10)
