"""Export the pass-rewritten program to ONNX: fused ops as single nodes, the KV cache as past/present.

Steps: give the program explicit cache inputs/outputs (``kv_cache_graph.py``) and check it in
PyTorch against the program; ``torch.onnx.export`` with the dynamo exporter and qwen2c's
translations (``translations.py``), opset 23; onnxscript's optimizer (constant folding, dead code,
common subexpressions), which ``torch.onnx.export(optimize=True)`` runs. The caller saves the model
with ``external_data.save``, which also runs ``onnx.checker`` on the written file.

Inputs: ``input_ids`` int64 [1, seq]; ``past_key_values.{i}.key|value`` [1, kv_heads, past, head_dim]
in the model dtype. Outputs: ``logits`` [1, 1, vocab] (last position, float32 whatever the dtype:
an exact upcast, and NumPy has no bfloat16 for runtimes to hand it over in), ``routing.{j}`` int64
[seq, top_k] per sparse layer (MoE), ``present.{i}.key|value`` [1, kv_heads, past + seq, head_dim].
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import logging
from typing import Any

import torch

from qwen2c.errors import UnsupportedModelError
from qwen2c.tolerances import tolerance_for

from .kv_cache_graph import CachedGraph, check_against, with_kv_cache
from .requirements import require
from .translations import translation_table

log = logging.getLogger(__name__)

OPSET = 23


@dataclasses.dataclass
class Exported:
    model: Any  # onnx_ir.Model
    graph: CachedGraph
    op_set: str
    dtype: str
    max_context: int

    def op_counts(self) -> dict[str, int]:
        return op_counts(self.model)

    def io_manifest(self) -> dict[str, Any]:
        """What the manifest records about the graph's interface."""
        return {"op_set": self.op_set, "opset": OPSET, "inputs": self.graph.input_names,
                "outputs": self.graph.output_names, "layers": self.graph.layers, "kv_heads": self.graph.kv_heads,
                "head_dim": self.graph.head_dim, "routing_outputs": self.graph.routing_outputs}


def op_counts(model) -> dict[str, int]:
    """Nodes per ``domain::op_type`` (the default domain unprefixed), sorted."""
    counts = collections.Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type) for n in model.graph)
    return dict(sorted(counts.items()))


def export_onnx(program: torch.export.ExportedProgram, config, dtype: str, max_context: int,
                op_set: str = "onnxruntime") -> Exported:
    """The rewritten ``program`` as an in-memory ONNX model (onnx_ir) with past/present KV inputs."""
    require("onnx", "onnxscript")
    cached = with_kv_cache(program, config, dtype, max_context)
    drift = check_against(cached, program, config.vocab_size, dtype)
    if not tolerance_for(dtype).allows(drift, 1.0):
        raise UnsupportedModelError(
            f"giving the graph its KV cache as inputs/outputs changed the logits by {drift:.3g} ({dtype}); "
            "the ONNX export would be wrong for this model. Report it with the model's config.json."
        )
    torch_dtype = getattr(torch, dtype)
    example = (torch.zeros((1, min(8, max_context - 3)), dtype=torch.int64), *cached.empty_past(torch_dtype, 3))
    seq = torch.export.Dim("seq", min=1, max=max_context)
    past = torch.export.Dim("past", min=0, max=max_context - 1)
    dynamic = ({1: seq}, *({2: past} for _ in range(2 * cached.layers)))
    log.info("exporting to ONNX opset %d (%s ops)", OPSET, op_set)
    cached.module.eval()
    with _quiet():
        onnx_program = torch.onnx.export(
            cached.module, example, dynamo=True, dynamic_shapes=dynamic, opset_version=OPSET,
            input_names=cached.input_names, output_names=cached.output_names,
            custom_translation_table=translation_table(op_set), optimize=True, verify=False, report=False)
    model = onnx_program.model
    _interleave_moe_gate_up(model)
    _drop_unused_outputs(model)
    _logits_in_float32(model)
    _check_fused(model, cached, op_set)
    return Exported(model, cached, op_set, dtype, max_context)


def _interleave_moe_gate_up(model) -> None:
    """Store each MoE node's gate/up weights interleaved (row 2j gate j, row 2j+1 up j).

    The translation emits transformers' layout ([gate rows | up rows], ``swiglu_fusion=2``); ONNX
    Runtime's CPU MoE kernel takes only the interleaved one (``swiglu_fusion=1``: "CPU MoE only
    supports interleaved SwiGLU format"), which its CUDA kernel takes too. The weights are permuted
    once, here, so no runtime copy is needed.
    """
    import onnx_ir as ir

    for node in model.graph:
        if node.domain != "com.microsoft" or node.op_type != "MoE":
            continue
        fc1 = node.inputs[2]
        if fc1.const_value is None:
            raise UnsupportedModelError(f"MoE node {node.name}: its expert weights are not constants")
        array = fc1.const_value.numpy()
        experts, rows, hidden = array.shape
        array = array.reshape(experts, 2, rows // 2, hidden).transpose(0, 2, 1, 3).reshape(experts, rows, hidden)
        fc1.const_value = ir.tensor(array.copy(), name=fc1.name)
        node.attributes["swiglu_fusion"] = ir.AttrInt64("swiglu_fusion", 1)


def _logits_in_float32(model) -> None:
    import onnx_ir as ir

    logits = model.graph.outputs[0]
    if logits.dtype == ir.DataType.FLOAT:
        return
    cast = ir.node("Cast", [logits], attributes={"to": ir.DataType.FLOAT}, name="logits_to_float32")
    model.graph.append(cast)
    out = cast.outputs[0]
    out.dtype, out.shape = ir.DataType.FLOAT, logits.shape
    name = logits.name
    logits.name = f"{name}_{logits.dtype.name.lower()}"
    out.name = name
    model.graph.outputs[0] = out


def _drop_unused_outputs(model) -> None:
    """Trailing outputs nobody reads (``Attention``'s present/qk outputs when the cache is concatenated
    outside it; ``GroupQueryAttention``'s output_qk) are removed: TensorRT refuses an Attention node
    that declares them, and no runtime needs them."""
    graph_outputs = set(model.graph.outputs)
    for node in model.graph:
        keep = len(node.outputs)
        while keep > 1 and not node.outputs[keep - 1].uses() and node.outputs[keep - 1] not in graph_outputs:
            keep -= 1
        if keep < len(node.outputs):
            node.resize_outputs(keep)


def _check_fused(model, cached: CachedGraph, op_set: str) -> None:
    """Each fused op must have become its node: a lost fusion is an exporter change to hear about."""
    counts = op_counts(model)
    attention = "com.microsoft::GroupQueryAttention" if op_set == "onnxruntime" else "Attention"
    if counts.get(attention, 0) != cached.layers:
        raise UnsupportedModelError(
            f"the ONNX export holds {counts.get(attention, 0)} {attention} nodes for {cached.layers} attention "
            f"layers; the attention translation did not apply. Nodes: {counts}"
        )


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints its progress to stdout; keep it in the log instead."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        log.info("torch.onnx.export: %s", buffer.getvalue().strip())
