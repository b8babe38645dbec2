"""Dispatch qwen2c's abstract kernel calls to the kernels of one device kind.

Op lowering (``lower_moe.py``) writes the algorithm of a fused op as calls to named kernels,
``call_dps_packed("qwen2c.kernel.<name>", tensors..., static ints...)``, without choosing how each
kernel runs. Each pipeline then runs this pass with its own table, ``name -> make(inputs, outputs,
*statics) -> PrimFunc``, so a new device kind adds kernels, not branches in the lowering.

Runs first in a pipeline, before legalization; a call no table entry serves fails the build
naming the kernel and the device kind.
"""

from __future__ import annotations

from typing import Callable, Sequence

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from qwen2c.errors import BackendUnavailableError

from . import user_error

PREFIX = "qwen2c.kernel."

KernelMaker = Callable[..., tirx.PrimFunc]


def kernel_call(bb: relax.BlockBuilder, name: str, tensors: Sequence[relax.Expr], statics: Sequence[int | float],
                outs: Sequence[tuple]) -> relax.Var:
    """Emit an abstract call of kernel ``name``; ``outs`` are (shape, dtype) of its results.

    ``statics`` (ints, bools or floats) reach the kernel maker after the tensor types.
    """
    types = [relax.TensorType(shape, dtype) for shape, dtype in outs]
    args = [*tensors, *(relax.prim_value(s if isinstance(s, float) else int(s)) for s in statics)]
    return bb.emit(relax.call_dps_packed(relax.ExternFunc(PREFIX + name), args,
                                         types if len(types) > 1 else types[0]))


def dispatch_kernels(table: dict[str, KernelMaker], device: str) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="DispatchKernels")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _Dispatcher(mod, table, device).run()

    return _pass


@mutator
class _Dispatcher(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, table: dict[str, KernelMaker], device: str):
        super().__init__(mod)
        self.mod_, self.table, self.device = mod, table, device
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        self.unserved: list[str] = []

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        # Raised here, not in the visitor, whose C++ side would turn it into a RuntimeError.
        if self.unserved:
            raise user_error(BackendUnavailableError(
                f"no {self.device} kernel for qwen2c's '{self.unserved[0]}' (kernels for {self.device}: "
                f"{', '.join(sorted(self.table)) or 'none'}); this model cannot be built for a {self.device} target yet."
            ))
        return self.builder_.finalize()

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.call_dps_packed") or not isinstance(call.args[0], relax.ExternFunc):
            return call
        symbol = str(call.args[0].global_symbol)
        if not symbol.startswith(PREFIX):
            return call
        name = symbol.removeprefix(PREFIX)
        make = self.table.get(name)
        if make is None:
            self.unserved.append(name)
            return call
        args = list(call.args[1].fields)
        static = (tirx.IntImm, tirx.FloatImm)
        tensors = [a for a in args if not isinstance(a, static)]
        statics = tuple(a.value for a in args if isinstance(a, static))
        out_ty = call.ty_args[0]
        outs = list(out_ty.fields) if isinstance(out_ty, relax.TupleType) else [out_ty]
        key = (name, tuple(_signature(a.ty) for a in tensors), tuple(_signature(o) for o in outs), statics)
        if key not in self.kernels:
            func = make([a.ty for a in tensors], outs, *statics)
            self.kernels[key] = self.builder_.add_func(func, name)
        return relax.call_tir(self.kernels[key], tensors, outs if len(outs) > 1 else outs[0])


def _signature(ty) -> tuple:
    return (str(ty.dtype), tuple(str(d) for d in ty.shape))


def static_dims(ty, *axes: int) -> list[int]:
    """The sizes of ``ty`` along ``axes``, which must be static."""
    return [int(ty.shape[a]) for a in axes]
