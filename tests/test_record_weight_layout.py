"""RecordWeightLayout: transform_params read as concatenations of parameters along axis 0, and
nothing recorded when it does anything else (the engine then runs transform_params at load)."""

import tvm
from tvm import relax

from qwen2c.targets.tvm.pipelines.record_weight_layout import WEIGHT_LAYOUT_ATTR, record_weight_layout


def _module(make_outputs) -> tvm.IRModule:
    """A module whose transform_params takes 3 weights (4x8, 2x8, 8) and returns make_outputs(bb, them)."""
    bb = relax.BlockBuilder()
    params = relax.Var("model_params", relax.TupleType([
        relax.TensorType((4, 8), "float32"), relax.TensorType((2, 8), "float32"),
        relax.TensorType((8,), "float32")]))
    with bb.function("transform_params", [params]):
        with bb.dataflow():
            w = [bb.emit(relax.TupleGetItem(params, i)) for i in range(3)]
            out = bb.emit_output(relax.Tuple([bb.emit(o) if isinstance(o, relax.Call) else o for o in make_outputs(bb, w)]))
        bb.emit_func_output(out)
    return bb.get()


def test_concatenations_along_the_first_axis_are_recorded():
    mod = record_weight_layout()(_module(lambda bb, w: [w[2], relax.op.concat([w[0], w[1]], axis=0), w[0]]))
    assert [[int(i) for i in out] for out in mod.attrs[WEIGHT_LAYOUT_ATTR]] == [[2], [0, 1], [0]]


def test_a_concatenation_of_concatenations_is_flattened():
    def outputs(bb, w):
        inner = bb.emit(relax.op.concat([w[0], w[1]], axis=0))
        return [relax.op.concat([inner, w[1]], axis=0)]

    mod = record_weight_layout()(_module(outputs))
    assert [[int(i) for i in out] for out in mod.attrs[WEIGHT_LAYOUT_ATTR]] == [[0, 1, 1]]


def test_anything_else_records_nothing():
    for make in (lambda bb, w: [relax.op.concat([w[0], w[0]], axis=1)],  # not along rows
                 lambda bb, w: [relax.op.permute_dims(w[0])],             # not a concatenation
                 lambda bb, w: [relax.op.multiply(w[2], w[2])]):
        mod = record_weight_layout()(_module(make))
        assert mod.attrs is None or WEIGHT_LAYOUT_ATTR not in mod.attrs


def test_a_module_without_transform_params_records_nothing():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2,), "float32"))
    with bb.function("main", [x]):
        bb.emit_func_output(x)
    mod = record_weight_layout()(bb.get())
    assert mod.attrs is None or WEIGHT_LAYOUT_ATTR not in mod.attrs
