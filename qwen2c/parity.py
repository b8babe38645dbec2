"""Parity: an engine's logits against the transformers model on the same weights.

The same token sequence is fed to both: a seeded prompt, then at each decode step the reference's
greedy token. Compared at the prefill and at each of N decode steps: max abs and relative error
(tolerances from ``tolerances.TOLERANCES``), and whether both pick the same greedy token.

MoE models are also compared on routing: at every step and sparse layer, the set of experts each
token was sent to, and over the prompt, how many tokens each expert received. A choice that
differs only between experts whose router probabilities tie within the dtype's tolerance is counted
as a near-tie, not a failure (either pick is correct to that precision).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .tolerances import compare, tolerance_for

log = logging.getLogger(__name__)

DEFAULT_PROMPT_TOKENS = 12
DEFAULT_DECODE_STEPS = 8


def parity_prompt(vocab_size: int, length: int = DEFAULT_PROMPT_TOKENS, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=gen).tolist()


def reference_steps(model, prompt: list[int], steps: int):
    """The reference's last-position logits after the prompt and after each greedy decode step, the
    tokens fed, and (MoE) each step's routing: per sparse layer, (router probabilities, experts)."""
    from transformers import DynamicCache

    from qwen2c.graphs.export import capture_routing

    cache = DynamicCache(config=model.config)
    logits, fed, routing = [], [], []
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps + 1):
            with capture_routing(model, with_logits=True) as layers:
                out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            routing.append([(torch.softmax(lg.float(), -1).numpy(), ex.numpy()) for lg, ex in layers])
            step = out.logits[0, -1].float().numpy()
            logits.append(step)
            token = int(np.argmax(step))
            fed.append(token)
            ids = torch.tensor([[token]])
    return logits, fed[:-1], routing


def check_parity(engine, model, dtype: str, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
                 decode_steps: int = DEFAULT_DECODE_STEPS) -> dict[str, Any]:
    prompt = parity_prompt(engine.vocab_size, min(prompt_tokens, engine.max_context - decode_steps))
    expected, fed, ref_routing = reference_steps(model, prompt, decode_steps)
    session = engine.session()
    actual = [session.prefill(prompt)]
    routing = [session.routing]
    for t in fed:
        actual.append(session.decode(t))
        routing.append(session.routing)
    tol = tolerance_for(dtype)
    steps = []
    for i, (got, ref) in enumerate(zip(actual, expected)):
        err, rel, scale = compare(got, ref)
        steps.append({
            "step": "prefill" if i == 0 else f"decode {i}",
            "max_abs_err": err,
            "rel_err": rel,
            "greedy_agrees": bool(np.argmax(got) == np.argmax(ref)),
            "passed": tol.allows(err, scale),
        })
    routing_report = compare_routing(engine.moe_layers, ref_routing, routing, tol.atol) if engine.moe_layers else None
    report = {
        "passed": all(s["passed"] for s in steps) and (routing_report is None or routing_report["passed"]),
        "dtype": dtype,
        "tolerance": {"atol": tol.atol, "rtol": tol.rtol},
        "prompt_tokens": len(prompt),
        "decode_steps": decode_steps,
        "max_abs_err": max(s["max_abs_err"] for s in steps),
        "max_rel_err": max(s["rel_err"] for s in steps),
        "greedy_agreement": f"{sum(s['greedy_agrees'] for s in steps)}/{len(steps)}",
        "steps": steps,
        "routing": routing_report,
    }
    return report


def compare_routing(layers: list[int], reference, engine, tie_tol: float) -> dict[str, Any]:
    """Routing agreement per sparse layer over all steps, and per-expert token counts over the prompt.

    ``reference``: per step, per layer, (router probabilities [n, E], experts [n, k]);
    ``engine``: per step, per layer, experts [n, k].
    """
    per_layer = []
    for li, layer in enumerate(layers):
        agree = ties = total = 0
        first_miss = None
        for step, (ref_step, eng_step) in enumerate(zip(reference, engine)):
            probs, ref_experts = ref_step[li]
            got = eng_step[li]
            for token in range(ref_experts.shape[0]):
                total += 1
                want, have = set(ref_experts[token].tolist()), set(got[token].tolist())
                if want == have:
                    agree += 1
                    continue
                # A near-tie: the experts swapped in and out are as probable as the k-th choice.
                kth = np.sort(probs[token])[-len(want)]
                if all(abs(probs[token][e] - kth) <= tie_tol for e in want ^ have):
                    ties += 1
                elif first_miss is None:
                    first_miss = f"step {step}, token {token}: reference {sorted(want)}, engine {sorted(have)}"
        experts = reference[0][li][0].shape[-1]
        ref_counts = np.bincount(reference[0][li][1].reshape(-1), minlength=experts)
        eng_counts = np.bincount(engine[0][li].reshape(-1), minlength=experts)
        per_layer.append({
            "layer": layer, "tokens": total, "agree": agree, "near_ties": ties,
            "counts_equal": bool(np.array_equal(ref_counts, eng_counts)),
            "max_count_diff": int(np.abs(ref_counts - eng_counts).max()),
            "first_mismatch": first_miss,
        })
    disagree = sum(r["tokens"] - r["agree"] - r["near_ties"] for r in per_layer)
    counts_ok = all(r["counts_equal"] or r["near_ties"] for r in per_layer)
    return {
        "passed": disagree == 0 and counts_ok,
        "choices": sum(r["tokens"] for r in per_layer),
        "agree": sum(r["agree"] for r in per_layer),
        "near_ties": sum(r["near_ties"] for r in per_layer),
        "counts_equal_layers": f"{sum(r['counts_equal'] for r in per_layer)}/{len(per_layer)}",
        "layers": per_layer,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"parity vs transformers ({report['dtype']}, atol {report['tolerance']['atol']}, "
        f"rtol {report['tolerance']['rtol']}): {'PASS' if report['passed'] else 'FAIL'}",
        f"  prompt {report['prompt_tokens']} tokens, {report['decode_steps']} decode steps; "
        f"greedy tokens agree {report['greedy_agreement']}",
    ]
    for s in report["steps"]:
        lines.append(
            f"  {s['step']:>10}: max abs err {s['max_abs_err']:.3e}  rel {s['rel_err']:.3e}  "
            f"greedy {'=' if s['greedy_agrees'] else 'x'}  {'ok' if s['passed'] else 'FAIL'}"
        )
    routing = report.get("routing")
    if routing:
        lines.append(
            f"  routing: {'PASS' if routing['passed'] else 'FAIL'}; top-k expert sets agree for "
            f"{routing['agree']}/{routing['choices']} (token, layer) choices"
            + (f" (+{routing['near_ties']} near-ties)" if routing["near_ties"] else "")
            + f"; per-expert token counts over the prompt equal in {routing['counts_equal_layers']} layers"
        )
        for r in routing["layers"]:
            if r["agree"] + r["near_ties"] < r["tokens"] or not r["counts_equal"]:
                lines.append(f"    layer {r['layer']}: {r['agree']}/{r['tokens']} agree, counts differ by up to "
                             f"{r['max_count_diff']}; first mismatch: {r['first_mismatch']}")
    return "\n".join(lines)
