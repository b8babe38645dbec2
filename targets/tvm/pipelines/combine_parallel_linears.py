"""Combine the linear layers that read the same input (q/k/v; gate/up) into one, weights concatenated once.

TVM's ``CombineParallelMatmul`` turns ``x @ Wq^T, x @ Wk^T, x @ Wv^T`` into one matmul with the
transposed weights concatenated along columns, then a split. Left so, the concatenation of the
transposes would be lifted out as a [K, N] weight, which the NT-layout kernels (CPU ``nt_matmul``,
DLight's GEMV over contiguous rows) do not read well; so this pass rewrites
``concat(permute_dims(a), permute_dims(b), ..., axis=1)`` to ``permute_dims(concat(a, b, ..., axis=0))``
and the linear keeps its ``matmul(x, permute_dims(W))`` form. ``LiftTransformParams`` then moves
the weight concatenations into ``transform_params``, which the engine runs once when it loads.

Per decode step this is one GEMV instead of three (attention) and one instead of two (MLP): for
qwen2-0.5b on a GPU, 3 kernels fewer per layer. The engine's weights file keeps transformers'
tensors; only the uploaded copies are combined. Runs first among the dispatch passes, before
linear layers are given kernels.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard


def combine_parallel_linears() -> list[tvm.transform.Pass]:
    return [relax.transform.CombineParallelMatmul(_same_weight_format), _concat_before_transpose(),
            _split_then_concat_is_reshape()]


def _same_weight_format(_input, rhs, _bias, bindings) -> bool:
    """Combine only linears whose weights are stored alike: all float, or all quantized the same way
    (one kernel reads the combined weight; MoE's float router beside its quantized shared expert stays apart)."""
    from ..quantized_params import dequantize_args

    def storage(var):
        value = bindings.get(var, var)
        if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.permute_dims"):
            value = bindings.get(value.args[0], value.args[0])
        args = dequantize_args(value)
        return None if args is None else args[2:]

    return len({storage(r) for r in rhs}) == 1


def lift_weight_transforms() -> tvm.transform.Pass:
    """After linear layers have kernels: what depends on weights alone becomes ``transform_params``.

    Only functions that say which of their parameters are inputs (``num_input``; the engine's
    prefill and decode) have weights to lift; TVM's pass fails on a module with none.
    """
    lift = relax.transform.LiftTransformParams(shared_transform=True)

    @tvm.transform.module_pass(opt_level=0, name="LiftWeightTransforms")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        declared = any(isinstance(f, relax.Function) and f.attrs is not None and "num_input" in f.attrs
                       for _, f in mod.functions_items())
        return lift(mod) if declared else mod

    return _pass


def _concat_rewrite(name: str, rewrite):
    """A module pass applying ``rewrite(concat_call, bindings) -> expr`` to every ``concat`` of every
    Relax function; ``bindings`` maps the function's dataflow variables to their values."""
    pattern = is_op("relax.concat")(wildcard())

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                bound = _bindings(func)
                mod[gv] = rewrite_call(pattern, lambda expr, _matches: rewrite(expr, bound), func)
        return mod

    return _pass


def _concat_before_transpose() -> tvm.transform.Pass:
    def rewrite(concat: relax.Call, bound: dict):
        parts = concat.args[0]
        if int(concat.attrs.axis) != 1 or not isinstance(parts, relax.Tuple):
            return concat
        sources = [_transposed_2d(bound.get(part, part)) for part in parts.fields]
        if any(s is None for s in sources):
            return concat
        return relax.op.permute_dims(relax.op.concat(sources, axis=0))

    return _concat_rewrite("ConcatBeforeTranspose", rewrite)


def _split_then_concat_is_reshape() -> tvm.transform.Pass:
    """``concat(reshape(split(y)[0]), reshape(split(y)[1]), ...)`` of every piece in order is ``reshape(y)``.

    The attention lowering concatenates q, k and v for the KV cache; once the q/k/v projections
    are one matmul, that is a split followed by a concatenation of the same bytes: a copy kernel
    per layer, gone when it becomes a reshape (a view).
    """
    def rewrite(concat: relax.Call, bound: dict):
        whole = _whole_split_source(concat, bound)
        return concat if whole is None else relax.op.reshape(whole, concat.ty.shape)

    return _concat_rewrite("SplitThenConcatIsReshape", rewrite)


def _whole_split_source(concat: relax.Call, bound: dict):
    """y when ``concat`` joins every piece of ``split(y, axis=-1)`` in order, each as it was or reshaped
    from [..., n * D] to [..., n, D] and joined along n; else None. Either way the bytes are y's."""
    parts = concat.args[0]
    if not isinstance(parts, relax.Tuple):
        return None
    split, pieces, reshaped = None, [], []
    for part in parts.fields:
        value = bound.get(part, part)
        if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.reshape"):
            reshaped.append(value)
            value = bound.get(value.args[0], value.args[0])
        if not isinstance(value, relax.TupleGetItem):
            return None
        source = bound.get(value.tuple_value, value.tuple_value)
        if not (isinstance(source, relax.Call) and source.op == tvm.ir.Op.get("relax.split")):
            return None
        if split is not None and not source.same_as(split):
            return None
        split, pieces = source, pieces + [int(value.index)]
    y = split.args[0]
    if pieces != list(range(len(split.ty.fields))) or int(split.attrs.axis) not in (-1, y.ty.ndim - 1):
        return None
    axis = int(concat.attrs.axis) % concat.ty.ndim
    if not reshaped:
        return y if axis == y.ty.ndim - 1 else None
    if len(reshaped) != len(pieces) or axis != concat.ty.ndim - 2 or concat.ty.ndim != y.ty.ndim + 1:
        return None
    lead, last = list(y.ty.shape)[:-1], list(concat.ty.shape)[-1]
    for r in reshaped:
        shape = list(r.ty.shape)
        if not (_same(shape[:-2], lead) and _same([shape[-1]], [last])):
            return None
    return y


def _same(a: list, b: list) -> bool:
    from tvm.sym.analyzer import Analyzer

    analyzer = Analyzer()
    return len(a) == len(b) and all(analyzer.can_prove_equal(x, y) for x, y in zip(a, b))


def _bindings(func: relax.Function) -> dict:
    body = func.body
    return {b.var: b.value for block in getattr(body, "blocks", []) for b in block.bindings}


def _transposed_2d(expr):
    """``a`` when ``expr`` is ``permute_dims(a)`` of a 2-D tensor (bound through a dataflow var)."""
    if isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.permute_dims"):
        axes = expr.attrs.axes
        source = expr.args[0]
        if source.ty.ndim == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
            return source
    return None
