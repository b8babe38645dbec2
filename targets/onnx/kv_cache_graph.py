"""Give the rewritten program its KV cache as graph inputs and outputs, for the ONNX export.

The traced program has no cache: each ``qwen2c::fused_attention`` means "attention of these tokens
over everything the sequence has seen" (DESIGN.md, decision 3). ONNX graphs cannot own state, so
here each one becomes ``qwen2c::cached_attention`` over explicit tensors: the graph takes
``past_key_values.{i}.key/value`` [1, kv_heads, past, head_dim] and returns
``present.{i}.key/value`` [1, kv_heads, past + seq, head_dim] after its own outputs. One graph then
serves prefill (past = 0, or a further chunk) and decode (seq = 1).

The RoPE tables are two buffers shared by every layer ([max_context, head_dim / 2], the engine's
dtype, computed in float32 as transformers computes them from the model's inv_freq, any RoPE scaling
type and its attention factor included), so the export holds them once. Sliding-window layers are
refused: neither translation of ``cached_attention`` limits the keys a query sees.

The result is an ``fx.GraphModule`` that still runs in PyTorch (the ops have eager references):
``check_against`` compares it with the program before any exporter sees it.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from qwen2c.errors import UnsupportedModelError
from qwen2c.graphs import ops
from qwen2c.graphs.export import attention_geometry
from qwen2c.model_config import head_dim


@dataclasses.dataclass
class CachedGraph:
    module: fx.GraphModule  # (input_ids, *past) -> (logits, *routing, *present)
    layers: int
    kv_heads: int
    head_dim: int
    routing_outputs: int

    @property
    def input_names(self) -> list[str]:
        return ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    @property
    def output_names(self) -> list[str]:
        return (["logits"] + [f"routing.{i}" for i in range(self.routing_outputs)]
                + [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")])

    def empty_past(self, dtype: torch.dtype, length: int = 0) -> list[torch.Tensor]:
        shape = (1, self.kv_heads, length, self.head_dim)
        return [torch.zeros(shape, dtype=dtype) for _ in range(2 * self.layers)]


def with_kv_cache(program: torch.export.ExportedProgram, config, dtype: str, max_context: int) -> CachedGraph:
    gm = program.module()
    graph = gm.graph
    graph._codegen = fx.graph.CodeGen()  # plain positional inputs and a flat output tuple
    attention = [n for n in graph.nodes if n.target is torch.ops.qwen2c.fused_attention.default]
    if not attention:
        raise ValueError("the program has no qwen2c::fused_attention: run the graph passes first")
    dim = head_dim(config)
    geometry = attention_geometry(program)
    windows = sorted({w for w in geometry["sliding_windows"] if w > 0})
    if windows:
        raise UnsupportedModelError(
            f"sliding-window attention (windows {', '.join(map(str, windows))}; config use_sliding_window): the ONNX "
            "export's attention (GroupQueryAttention, or RotaryEmbedding + Attention) attends to the whole cache; "
            "build this model with --backend tvm.")
    acts = sorted({n.args[10] for n in graph.nodes if n.target is torch.ops.qwen2c.fused_moe.default} - {"silu"})
    if acts:
        raise UnsupportedModelError(
            f"MoE experts with activation {', '.join(acts)} (config hidden_act): ONNX Runtime's MoE kernel runs "
            "SwiGLU (silu) experts only; build this model with --backend tvm.")
    cos, sin = _rope_tables(max_context, dim, geometry["rope_inv_freq"], geometry["rope_scaling"], getattr(torch, dtype))
    gm.register_buffer("qwen2c_rope_cos", cos)
    gm.register_buffer("qwen2c_rope_sin", sin)

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    past = []
    with graph.inserting_after(placeholders[-1]):
        for i in reversed(range(len(attention))):  # each insertion goes first, so insert last to first
            for kv in ("value", "key"):
                past.append(graph.placeholder(f"past_{kv}_{i}"))
    past.reverse()
    with graph.inserting_before(attention[0]):
        cos_node, sin_node = graph.get_attr("qwen2c_rope_cos"), graph.get_attr("qwen2c_rope_sin")
    presents = []
    for i, node in enumerate(attention):
        q, k, v, _inv_freq, _layer, _scaling, scale, _window = node.args
        with graph.inserting_before(node):
            cached = graph.call_function(torch.ops.qwen2c.cached_attention.default,
                                         (q, k, v, past[2 * i], past[2 * i + 1], cos_node, sin_node, scale))
            out, present_key, present_value = (graph.call_function(operator.getitem, (cached, j)) for j in range(3))
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        presents += [present_key, present_value]
    output = next(n for n in graph.nodes if n.op == "output")
    flat = output.args[0]
    flat = list(flat) if isinstance(flat, (tuple, list)) else [flat]
    output.args = (tuple(flat + presents),)
    graph.lint()
    # A fresh module: the unlifted one checks its inputs against the traced signature (one tensor).
    module = fx.GraphModule(gm, graph)
    return CachedGraph(module, len(attention), config.num_key_value_heads, dim, len(flat) - 1)


def _rope_tables(positions: int, dim: int, inv_freq: list[float], scaling: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = ops.rope_cos_sin(torch.arange(positions), torch.tensor(inv_freq, dtype=torch.float32), scaling, dtype)
    return cos[:, : dim // 2].contiguous(), sin[:, : dim // 2].contiguous()


def check_against(cached: CachedGraph, program: torch.export.ExportedProgram, vocab: int, dtype: str) -> float:
    """Max abs difference of the last logits between ``program`` (no cache) and ``cached`` fed its
    own cache: a prompt in two chunks and one decode step. Any error here is the KV-cache rewrite's."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (1, 9), generator=gen)
    torch_dtype = getattr(torch, dtype)
    reference = program.module()
    worst = 0.0
    with torch.no_grad():
        past = cached.empty_past(torch_dtype)
        for start, stop in ((0, 5), (5, 8), (8, 9)):
            out = cached.module(ids[:, start:stop], *past)
            past = list(out[-2 * cached.layers:])
            want = reference(ids[:, :stop])
            want = want[0] if isinstance(want, (tuple, list)) else want
            worst = max(worst, float((out[0].float() - want.float()).abs().max()))
    return worst
