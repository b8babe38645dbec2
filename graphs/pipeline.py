"""The graph pass pipeline: one list, run in order, each pass checked against its input.

After every pass that fires, the rewritten program runs in PyTorch (the fused ops have eager
references) on prompts of two lengths and is compared with the program before the pass, so a pass
that breaks numerics is named here, before any backend sees the graph.
"""

from __future__ import annotations

import logging

import torch

from qwen2c.errors import PassCheckError
from qwen2c.tolerances import compare, tolerance_for

from . import ops  # noqa: F401  (registers the fused ops)
from .fuse_attention import FuseAttention
from .fuse_moe import FuseMoe
from .fuse_rms_norm import FuseRmsNorm
from .pass_base import GraphPass, PassContext, PassReport

log = logging.getLogger(__name__)


def default_passes() -> list[GraphPass]:
    return [
        # Attention first: it removes the mask plumbing and RoPE tables the other passes never need.
        FuseAttention(),
        FuseRmsNorm(),
        FuseMoe(),
    ]


def run_passes(
    program: torch.export.ExportedProgram,
    config,
    dtype: str,
    passes: list[GraphPass] | None = None,
    check_lengths: tuple[int, ...] = (3, 7),
) -> list[PassReport]:
    """Rewrite ``program`` in place; return each pass's report. Raises PassCheckError on drift."""
    ctx = PassContext(config=config, program=program)
    probes = _probe_inputs(config.vocab_size, check_lengths)
    before = _run(program, probes) if check_lengths else []
    reports = []
    for graph_pass in passes if passes is not None else default_passes():
        report = graph_pass(ctx)
        reports.append(report)
        log.info("pass %s fired %d time(s)%s", report.name, report.fired,
                 f"; missed: {report.misses}" if report.misses else "")
        if report.fired and check_lengths:
            after = _run(program, probes)
            _check(report.name, before, after, dtype, check_lengths)
            before = after
    return reports


def _probe_inputs(vocab: int, lengths: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (1, n), generator=gen) for n in lengths]


def _run(program: torch.export.ExportedProgram, probes: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """Each probe's outputs: the logits, then (MoE models) each sparse layer's chosen experts."""
    module = program.module()
    with torch.no_grad():
        outs = [module(ids) for ids in probes]
    return [tuple(o) if isinstance(o, (tuple, list)) else (o,) for o in outs]


def _check(pass_name: str, before, after, dtype: str, lengths: tuple[int, ...]) -> None:
    tol = tolerance_for(dtype)
    for n, (ref, *ref_routing), (got, *got_routing) in zip(lengths, before, after):
        for layer, (r, g) in enumerate(zip(ref_routing, got_routing)):
            if not torch.equal(r.sort(-1).values, g.sort(-1).values):
                raise PassCheckError(
                    f"graph pass {pass_name!r} changed which experts tokens are routed to (sparse layer "
                    f"{layer}, prompt of {n} tokens). The pass is wrong for this model; report it "
                    "with the model's config.json."
                )
        ref, got = ref.float(), got.float()
        err, rel, scale = compare(got.numpy(), ref.numpy())
        if not tol.allows(err, scale):
            raise PassCheckError(
                f"graph pass {pass_name!r} changed the model's logits beyond the {dtype} tolerance "
                f"(max abs error {err:.3g}, relative {rel:.3g}, atol {tol.atol}, rtol {tol.rtol}) "
                f"on a prompt of {n} tokens. The pass is wrong "
                "for this model; report it with the model's config.json."
            )
