"""Trace the transformers model with torch.export, once, with a dynamic sequence length.

The traced program computes the logits of the last position only (``logits_to_keep=1``): that is
all generation needs, and it saves the vocabulary projection for every other prompt token.

For MoE models the program also returns its routing: for each sparse layer, in layer order, the
experts each token was sent to ([tokens, top_k] int64). Parity compares it with the reference's,
and engines keep it as an output, so routing can be inspected in a deployed engine too.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)

# Param names in the program carry this prefix (the wrapper's attribute); strip it to get the
# transformers state-dict names.
PARAM_PREFIX = "model."


class _LastLogits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        with capture_routing(self.model) as routing:
            logits = self.model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits
        return (logits, *routing) if routing_layers(self.model) else logits


def routing_layers(model: torch.nn.Module) -> list[int]:
    from qwen2c.model_config import moe_layers

    return moe_layers(model.config)


@contextlib.contextmanager
def capture_routing(model: torch.nn.Module, with_logits: bool = False):
    """Collect each sparse layer's chosen experts ([tokens, top_k]) during forward calls, in layer order
    (``(router_logits, experts)`` pairs with ``with_logits``).

    transformers' router returns (router_logits, router_scores, router_indices).
    """
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        if not (isinstance(output, tuple) and len(output) == 3):
            raise TypeError(f"{type(module).__name__} returned {type(output).__name__}; expected "
                            "(router_logits, router_scores, router_indices)")
        captured.append((output[0], output[2]) if with_logits else output[2])

    layers = model.model.layers if hasattr(model, "model") else model.layers
    handles = [layers[i].mlp.gate.register_forward_hook(hook) for i in routing_layers(model)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def export_model(model: torch.nn.Module, max_context: int) -> torch.export.ExportedProgram:
    """Export ``model`` (eval mode) as ``input_ids [1, seq] -> logits [1, 1, vocab]``."""
    if routing_layers(model) and hasattr(model, "set_experts_implementation"):
        # The experts as grouped matmuls: the form fuse_moe recognises. (The "eager" loop over experts
        # does not export: its trip count depends on the data.) All implementations compute the same.
        model.set_experts_implementation("grouped_mm")
    seq = torch.export.Dim("seq", min=1, max=max_context)
    # Example length >= 2: torch.export specialises sizes 0 and 1.
    example = torch.zeros((1, min(8, max_context)), dtype=torch.int64, device=_device_of(model))
    with torch.no_grad():
        program = torch.export.export(
            _LastLogits(model.eval()), (example,), dynamic_shapes=({1: seq},), strict=False
        )
    log.info("exported %d graph nodes", len(program.graph.nodes))
    return program


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def param_names(program: torch.export.ExportedProgram) -> list[tuple[str, str]]:
    """(placeholder name, transformers state-dict name) for each parameter, in program order."""
    kind = torch.export.graph_signature.InputKind.PARAMETER
    return [
        (spec.arg.name, spec.target.removeprefix(PARAM_PREFIX))
        for spec in program.graph_signature.input_specs
        if spec.kind is kind
    ]


def attention_geometry(program: torch.export.ExportedProgram) -> dict:
    """What a backend's KV cache must know of the fused attention ops: their RoPE (inv_freq as
    float32 values, and the cos/sin scaling) and each layer's sliding window (0: full attention),
    layers in order."""
    fused = [n for n in program.graph.nodes if n.target is torch.ops.qwen2c.fused_attention.default]
    fused.sort(key=lambda n: n.args[4])
    tensors = {spec.arg.name: spec.target for spec in program.graph_signature.input_specs}
    tables = set()
    for n in fused:
        name = tensors[n.args[3].name]
        inv_freq = program.state_dict[name] if name in program.state_dict else program.constants[name]
        tables.add((tuple(inv_freq.to(torch.float32).tolist()), float(n.args[5])))
    # transformers' Qwen2 has one rotary embedding for all layers.
    assert len(tables) == 1, f"layers use {len(tables)} different RoPE tables"
    (inv_freq, scaling), = tables
    return {"rope_inv_freq": list(inv_freq), "rope_scaling": scaling,
            "sliding_windows": [int(n.args[7]) for n in fused]}
