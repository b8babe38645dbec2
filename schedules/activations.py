"""The activations of gated MLPs (``act(gate) * up``) as TIR expressions, in float32.

Named as ``graphs/ops.ACTIVATIONS`` names them (what transformers' ``hidden_act`` traces to):
silu (Qwen2's SwiGLU), gelu (exact, erf), gelu_tanh (``gelu_pytorch_tanh``), relu. Kernels take
the activation as an index into ``GATED_ACTIVATIONS`` (kernel statics are numbers).
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def activation_index(name: str) -> int:
    return GATED_ACTIVATIONS.index(name)


def gated(act: int, gate, up):
    """``act(gate) * up`` for float32 expressions; ``act`` indexes ``GATED_ACTIVATIONS``."""
    one, half = T.float32(1), T.float32(0.5)
    name = GATED_ACTIVATIONS[act]
    if name == "silu":
        value = gate / (one + T.exp(T.float32(0) - gate))
    elif name == "gelu":
        value = half * gate * (one + tirx.erf(gate * T.float32(1 / math.sqrt(2))))
    elif name == "gelu_tanh":
        value = half * gate * (one + T.tanh(T.float32(math.sqrt(2 / math.pi)) * (gate + T.float32(0.044715) * gate * gate * gate)))
    else:
        value = T.max(gate, T.float32(0))
    return value * up
