"""Give an engine function quantized weight parameters: each quantized ``W`` becomes ``(q, scales)``.

The function keeps computing with ``W``: its first bindings are ``W = dequantize(q, scales)``, an
abstract call (``qwen2c.kernel.dequantize``) that no kernel serves. It only marks where a weight is
read; the pipeline's ``fuse_dequantize`` pass rewrites every use of it (linear layers, the embedding
gather, MoE experts) into a kernel that reads ``q`` and ``scales`` and dequantizes in registers, and
fails the build if any use is left, so no dequantized copy of a weight ever exists in memory.

Runs on the assembled ``prefill`` function (``relax_module.py``), before the pipeline; decode is a
copy of it. The parameter order is the builder's (``qwen2c.quantization``, ``builder._save_weights``):
a quantized weight's place holds its ``q`` then its ``scales``.
"""

from __future__ import annotations

from typing import Sequence

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qwen2c.quantization import SCALE_DTYPE, WeightFormat

from .pipelines.dispatch_kernels import PREFIX

DEQUANTIZE = PREFIX + "dequantize"


def dequantize_call(q: relax.Expr, scales: relax.Expr, fmt_bits: int, group: int, ty: relax.TensorType) -> relax.Call:
    return relax.call_dps_packed(relax.ExternFunc(DEQUANTIZE),
                                 [q, scales, relax.prim_value(fmt_bits), relax.prim_value(group)], ty)


def dequantize_args(expr: relax.Expr) -> tuple[relax.Expr, relax.Expr, int, int] | None:
    """(q, scales, bits, group) when ``expr`` is an abstract dequantize call, else None."""
    if not (isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.call_dps_packed")
            and isinstance(expr.args[0], relax.ExternFunc) and str(expr.args[0].global_symbol) == DEQUANTIZE):
        return None
    q, s, bits, group = expr.args[1].fields
    return q, s, int(bits.value), int(group.value)


def quantize_params(func: relax.Function, formats: Sequence[WeightFormat | None]) -> relax.Function:
    """``func`` with weight parameter i (after the ``num_input`` inputs) stored as ``formats[i]``."""
    n_inputs = int(func.attrs["num_input"])
    inputs, weights = list(func.params[:n_inputs]), list(func.params[n_inputs:])
    if len(weights) != len(formats):
        raise ValueError(f"{len(formats)} weight formats for {len(weights)} weights")
    params, bindings, substitute = list(inputs), [], {}
    for w, fmt in zip(weights, formats):
        if fmt is None:
            params.append(w)
            continue
        shape = tuple(int(d) for d in w.ty.shape)
        q_shape, s_shape = fmt.stored_shapes(shape)
        q = relax.Var(w.name + "_q", relax.TensorType(q_shape, fmt.qdtype))
        s = relax.Var(w.name + "_scales", relax.TensorType(s_shape, SCALE_DTYPE))
        params += [q, s]
        dequantized = relax.DataflowVar(w.name, w.ty)
        bindings.append(relax.VarBinding(dequantized, dequantize_call(q, s, fmt.bits, fmt.group, w.ty)))
        substitute[w] = dequantized
    if not bindings:
        return func
    body = func.body
    first = body.blocks[0] if len(body.blocks) else None
    if not isinstance(first, relax.DataflowBlock):
        raise ValueError("expected the engine function to start with a dataflow block")
    body = relax.SeqExpr([relax.DataflowBlock(bindings + list(first.bindings)), *body.blocks[1:]], body.body)
    return _Substitute(substitute).visit_expr(relax.Function(params, body, func.ret_ty, is_pure=func.is_pure,
                                                             attrs=func.attrs))


@mutator
class _Substitute(PyExprMutator):
    def __init__(self, mapping: dict):
        super().__init__()
        self.mapping = mapping

    def visit_var_(self, var: relax.Var) -> relax.Expr:
        return self.mapping.get(var, var)
