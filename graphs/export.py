"""Trace the transformers model with torch.export, once, with a dynamic sequence length.

The traced program computes the logits of the last position only (``logits_to_keep=1``): that is
all generation needs, and it saves the vocabulary projection for every other prompt token.
"""

from __future__ import annotations

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

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits


def export_model(model: torch.nn.Module, max_context: int) -> torch.export.ExportedProgram:
    """Export ``model`` (eval mode) as ``input_ids [1, seq] -> logits [1, 1, vocab]``."""
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
