"""ONNX Runtime's contrib ops (domain ``com.microsoft``) as onnxscript can call them.

onnxscript and the PyTorch exporter build a node from its ``onnx.defs.OpSchema``; ONNX itself has
no schema for ONNX Runtime's ops, so the inputs, outputs and attributes qwen2c uses are declared
here, as ONNX Runtime 1.32 documents them (``onnxruntime/core/graph/contrib_ops``). They are not
registered globally: only the ops built from them carry them.
"""

from __future__ import annotations

import functools

import onnx
from onnx.defs import OpSchema
from onnxscript import values

DOMAIN = "com.microsoft"
FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_A = OpSchema.AttrType


def _param(name: str, type_str: str, optional: bool = False) -> OpSchema.FormalParameter:
    option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
    return OpSchema.FormalParameter(name, type_str, param_option=option)


def _attr(name: str, kind) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, kind, required=False)


@functools.cache
def _schemas() -> dict[str, OpSchema]:
    gqa = OpSchema(
        "GroupQueryAttention", DOMAIN, 1,
        inputs=[_param("query", "T"), _param("key", "T", True), _param("value", "T", True),
                _param("past_key", "T", True), _param("past_value", "T", True),
                _param("seqlens_k", "M"), _param("total_sequence_length", "M"),
                _param("cos_cache", "T", True), _param("sin_cache", "T", True)],
        outputs=[_param("output", "T"), _param("present_key", "T"), _param("present_value", "T")],
        type_constraints=[("T", FLOATS, ""), ("M", ["tensor(int32)"], "")],
        attributes=[_attr("num_heads", _A.INT), _attr("kv_num_heads", _A.INT), _attr("scale", _A.FLOAT),
                    _attr("do_rotary", _A.INT), _attr("rotary_interleaved", _A.INT)],
    )
    moe = OpSchema(
        "MoE", DOMAIN, 1,
        inputs=[_param("input", "T"), _param("router_probs", "T"), _param("fc1_experts_weights", "T"),
                _param("fc1_experts_bias", "T", True), _param("fc2_experts_weights", "T"),
                _param("fc2_experts_bias", "T", True), _param("fc3_experts_weights", "T", True)],
        outputs=[_param("output", "T")],
        type_constraints=[("T", FLOATS, "")],
        attributes=[_attr("k", _A.INT), _attr("activation_type", _A.STRING), _attr("activation_alpha", _A.FLOAT),
                    _attr("activation_beta", _A.FLOAT), _attr("normalize_routing_weights", _A.INT),
                    _attr("swiglu_fusion", _A.INT), _attr("use_sparse_mixer", _A.INT)],
    )
    return {s.name: s for s in (gqa, moe)}


def contrib_op(name: str) -> values.Op:
    """The onnxscript op ``com.microsoft::name`` (e.g. ``contrib_op("GroupQueryAttention")(q, ...)``)."""
    return values.Op(values.Opset(DOMAIN, 1), name, _schemas()[name])


def contrib_opset_import() -> onnx.OperatorSetIdProto:
    return onnx.helper.make_opsetid(DOMAIN, 1)
