"""Record what ``transform_params`` makes of the weights, so an engine can skip running it at load.

After ``lift_weight_transforms`` the combined linear layers' weights are computed at load by
``transform_params``: each of its outputs is either a weight as stored, or weights concatenated along
their first axis (q/k/v, gate/up). Concatenating row-major tensors along the first axis is putting
their bytes end to end, so an engine whose weights file stores each group end to end can hand the
mapped file region to the VM instead of running ``transform_params`` (which copies about half the
weights: 0.94 GB of qwen2-0.5b's 2 GB).

This pass sets the module attribute ``qwen2c.weight_layout`` and adds the same, as JSON, as the library
function ``qwen2c_weight_layout()`` (``targets/tvm/fingerprint.py``): per output
of ``transform_params``, the list of parameter indices whose concatenation it is (one index: the
weight itself). When an output is anything else, it records nothing and the engine runs
``transform_params`` at load as before. Runs right after ``lift_weight_transforms``.
"""

from __future__ import annotations

import json

import tvm
from tvm import relax

from ..fingerprint import add_constant_function
from ..runtime import WEIGHT_LAYOUT_FUNCTION

WEIGHT_LAYOUT_ATTR = "qwen2c.weight_layout"


def record_weight_layout() -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="RecordWeightLayout")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        layout = weight_layout(mod)
        if layout is None:
            return mod
        # Also inside the library: the runtime takes the layout from the code it runs, never from the
        # manifest alone (an edited one must not regroup the weights the library receives).
        mod = add_constant_function(mod, WEIGHT_LAYOUT_FUNCTION, json.dumps(layout).encode())
        return mod.with_attr(WEIGHT_LAYOUT_ATTR, layout)

    return _pass


def weight_layout(mod: tvm.IRModule) -> list[list[int]] | None:
    """Per output of ``transform_params``, the parameters concatenated (axis 0) to make it; None if
    the module has no ``transform_params`` or it does anything else."""
    funcs = {gv.name_hint: f for gv, f in mod.functions_items()}
    func = funcs.get("transform_params")
    if not isinstance(func, relax.Function) or len(func.params) != 1:
        return None
    params = func.params[0]
    sources: dict[relax.Var, list[int]] = {}
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return None
    for block in body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                return None
            value = binding.value
            if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(params):
                sources[binding.var] = [int(value.index)]
            elif isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.concat")):
                parts = value.args[0]
                if int(value.attrs.axis) != 0 or not isinstance(parts, relax.Tuple) or \
                        any(p not in sources for p in parts.fields):
                    return None
                sources[binding.var] = [i for p in parts.fields for i in sources[p]]
            elif isinstance(value, relax.Tuple) and all(f in sources for f in value.fields):
                sources[binding.var] = None  # the output tuple, resolved below
            else:
                return None
    result = body.body
    outputs = None
    for block in body.blocks:
        for binding in block.bindings:
            if binding.var.same_as(result) and isinstance(binding.value, relax.Tuple):
                outputs = binding.value.fields
    if isinstance(result, relax.Tuple):
        outputs = result.fields
    if outputs is None or any(f not in sources or sources[f] is None for f in outputs):
        return None
    return [sources[f] for f in outputs]
