"""Fold each quantized weight's ``dequantize`` into the kernel that reads it; fail if one is left.

``quantized_params.py`` writes a quantized weight as ``W = dequantize(q, scales)``; left so, TVM
would compute W once at load (``LiftTransformParams``) and keep a dequantized copy: the very memory
and bandwidth quantization saves. This pass rewrites every reader of W into an abstract kernel that
takes ``q`` and ``scales`` (``dispatch_kernels.py`` then gives each device kind its kernels):

    concat(dequantize(q1, s1), dequantize(q2, s2), axis=0)   -> dequantize(concat(q1, q2), concat(s1, s2))
    matmul(x, permute_dims(dequantize(q, s)))                -> q_matmul(x, q, s)          linear layers, lm_head
    take(dequantize(q, s), ids, axis=0)                      -> q_take(q, s, ids)          the embedding
    moe_grouped_swiglu / moe_grouped_down(.., dequantize(q, s), ..)  -> their _q variants  MoE experts

The first rule keeps combined linears (q/k/v, gate/up: ``combine_parallel_linears.py``) combined:
groups run along each output row's inputs, so stacking rows commutes with quantization, and the
concatenation of packed bytes and scales is what ``transform_params`` does once at load.

Runs after ``combine_parallel_linears`` and before ``dispatch_kernels``. A dequantize that still has
a reader afterwards (an op no rule covers) fails the build, naming the op.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from qwen2c.errors import BackendUnavailableError

from ..quantized_params import dequantize_args, dequantize_call
from . import user_error
from .dispatch_kernels import PREFIX

QUANTIZED_KERNELS = {PREFIX + "moe_grouped_swiglu": "moe_grouped_swiglu_q", PREFIX + "moe_grouped_down": "moe_grouped_down_q"}


def fuse_dequantize() -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="FuseDequantize")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = _Folder(mod).run()
        mod = relax.transform.DeadCodeElimination()(mod)
        _check_none_left(mod)
        return mod

    return _pass


@mutator
class _Folder(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.finalize()

    def _value(self, expr):
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            return expr if bound is None else bound
        return expr

    def _dequantized(self, expr):
        return dequantize_args(self._value(expr))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        op = call.op
        if op == tvm.ir.Op.get("relax.concat"):
            return self._concat(call)
        if op == tvm.ir.Op.get("relax.matmul"):
            return self._matmul(call)
        if op == tvm.ir.Op.get("relax.take"):
            return self._take(call)
        if op == tvm.ir.Op.get("relax.call_dps_packed") and isinstance(call.args[0], relax.ExternFunc):
            return self._moe(call)
        return call

    def _concat(self, call):
        parts = self._value(call.args[0])
        if int(call.attrs.axis) != 0 or not isinstance(parts, relax.Tuple):
            return call
        pieces = [self._dequantized(p) for p in parts.fields]
        if any(p is None for p in pieces) or len({(bits, group) for _, _, bits, group in pieces}) != 1:
            return call
        bits, group = pieces[0][2], pieces[0][3]
        q = self.builder_.emit(relax.op.concat([p[0] for p in pieces], axis=0))
        s = self.builder_.emit(relax.op.concat([p[1] for p in pieces], axis=0))
        return dequantize_call(q, s, bits, group, call.ty)

    def _matmul(self, call):
        x, rhs = call.args
        transposed = self._value(rhs)
        if not (isinstance(transposed, relax.Call) and transposed.op == tvm.ir.Op.get("relax.permute_dims")):
            return call
        axes = transposed.attrs.axes
        weight = self._dequantized(transposed.args[0])
        if weight is None or transposed.args[0].ty.ndim != 2 or (axes is not None and [int(a) for a in axes] != [1, 0]):
            return call
        if x.ty.ndim != 3 or not _is_one(x.ty.shape[0]):  # the kernels' x[1, m, K]
            return call
        q, s, bits, group = weight
        return _kernel("q_matmul", [x, q, s], [bits, group], call.ty)

    def _take(self, call):
        table, ids = call.args
        weight = self._dequantized(table)
        if weight is None or int(call.attrs.axis) != 0 or table.ty.ndim != 2 or ids.ty.ndim != 1:
            return call
        q, s, bits, group = weight
        return _kernel("q_take", [q, s, ids], [bits, group], call.ty)

    def _moe(self, call):
        name = str(call.args[0].global_symbol)
        if name not in QUANTIZED_KERNELS:
            return call
        args = list(call.args[1].fields)
        static = (tvm.tirx.IntImm, tvm.tirx.FloatImm)
        tensors = [a for a in args if not isinstance(a, static)]
        statics = [int(a.value) for a in args if isinstance(a, static)]
        weight = self._dequantized(tensors[1])  # (x, experts' weights, rows, offsets)
        if weight is None:
            return call
        q, s, bits, group = weight
        return _kernel(QUANTIZED_KERNELS[name], [tensors[0], q, s, *tensors[2:]], [*statics, bits, group],
                       call.ty_args[0])


def _is_one(dim) -> bool:
    return isinstance(dim, tvm.tirx.IntImm) and int(dim) == 1


def _kernel(name: str, tensors, statics, out_ty) -> relax.Call:
    args = [*tensors, *(relax.prim_value(int(v)) for v in statics)]
    return relax.call_dps_packed(relax.ExternFunc(PREFIX + name), args, out_ty)


def _check_none_left(mod: tvm.IRModule) -> None:
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for block in getattr(func.body, "blocks", []):
            for binding in block.bindings:
                if dequantize_args(binding.value) is not None:
                    readers = _readers(func, binding.var)
                    raise user_error(BackendUnavailableError(
                        f"{gv.name_hint}: the quantized weight {binding.var.name} is read by "
                        f"{', '.join(readers) or 'the function result'}, which has no kernel that dequantizes "
                        "in registers; qwen2c will not keep a dequantized copy of a weight. Build without "
                        "--quantize, or add a quantized kernel for that op."))


def _readers(func: relax.Function, var: relax.Var) -> list[str]:
    found = []
    for block in getattr(func.body, "blocks", []):
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and any(_uses(a, var) for a in value.args):
                found.append(str(value.op.name) if hasattr(value.op, "name") else str(value.op))
    return found


def _uses(arg, var) -> bool:
    if isinstance(arg, relax.Tuple):
        return any(_uses(f, var) for f in arg.fields)
    return isinstance(arg, relax.Var) and arg.same_as(var)
