"""Which ONNX nodes TensorRT's ONNX parser takes: checked before TensorRT sees the model.

The list is TensorRT 10.15's operator support matrix (onnx-tensorrt ``docs/operators.md``, opsets 9
to 24), reduced to the operators it marks supported; ``RESTRICTIONS`` encodes the restrictions of
that table which an export of qwen2c can run into. A model that fails the check is refused with
every offending node named, before any engine build starts: a parser error after minutes of
loading a large model is the worse way to learn it.
"""

from __future__ import annotations

from typing import Callable

TENSORRT_VERSION_OF_LIST = "10.15"

SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh
Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


def _rank(value) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _attention(node) -> str | None:
    names = ("Q", "K", "V", "attn_mask")
    for name, value in zip(names, node.inputs):
        if value is not None and _rank(value) not in (4, None):
            return f"{name} is {_rank(value)}-D; TensorRT takes Attention with 4-D Q, K, V and attn_mask"
    if len(node.inputs) > 4 and any(v is not None for v in node.inputs[4:]):
        return "it has past_key/past_value (or nonpad_kv_seqlen) inputs, which TensorRT does not take"
    if len(node.outputs) > 1:
        return "it declares present_key/present_value/qk_matmul_output outputs, which TensorRT does not take"
    return None


def _rotary(node) -> str | None:
    positions = node.inputs[3] if len(node.inputs) > 3 else None
    if positions is not None and positions.dtype is not None and positions.dtype.name != "INT64":
        return f"position_ids is {positions.dtype.name}; TensorRT takes INT64"
    return None


def _topk(node) -> str | None:
    if node.attributes.get_int("sorted", 1) != 1:
        return "sorted must be 1"
    return None


def _constant_axes(position: int, what: str) -> Callable:
    def check(node) -> str | None:
        axes = node.inputs[position] if len(node.inputs) > position else None
        if axes is not None and axes.const_value is None and (axes.producer() is None or axes.producer().op_type != "Constant"):
            return f"its {what} input is computed at run time; TensorRT needs it constant"
        return None

    return check


RESTRICTIONS: dict[str, Callable] = {
    "Attention": _attention,
    "RotaryEmbedding": _rotary,
    "TopK": _topk,
    "Squeeze": _constant_axes(1, "axes"),
    "Unsqueeze": _constant_axes(1, "axes"),
}


def unsupported_nodes(model) -> list[str]:
    """One line per node TensorRT's parser would refuse (empty: every node is supported)."""
    problems = []
    for node in model.graph:
        kind = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED:
            problems.append(f"{node.name} ({kind}): not an operator TensorRT {TENSORRT_VERSION_OF_LIST}'s ONNX parser supports")
            continue
        check = RESTRICTIONS.get(node.op_type)
        reason = check(node) if check else None
        if reason:
            problems.append(f"{node.name} ({kind}): {reason}")
    return problems
