"""Parity: an engine's logits against the transformers model on the same weights.

The same token sequence is fed to both: a seeded prompt, then at each decode step the reference's
greedy token. Compared at the prefill and at each of N decode steps: max abs and relative error
(tolerances from ``tolerances.TOLERANCES``), and whether both pick the same greedy token.
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


def reference_steps(model, prompt: list[int], steps: int) -> tuple[list[np.ndarray], list[int]]:
    """The reference's last-position logits after the prompt and after each greedy decode step."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits, fed = [], []
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps + 1):
            out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            step = out.logits[0, -1].float().numpy()
            logits.append(step)
            token = int(np.argmax(step))
            fed.append(token)
            ids = torch.tensor([[token]])
    return logits, fed[:-1]


def check_parity(engine, model, dtype: str, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
                 decode_steps: int = DEFAULT_DECODE_STEPS) -> dict[str, Any]:
    prompt = parity_prompt(engine.vocab_size, min(prompt_tokens, engine.max_context - decode_steps))
    expected, fed = reference_steps(model, prompt, decode_steps)
    session = engine.session()
    actual = [session.prefill(prompt)] + [session.decode(t) for t in fed]
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
    report = {
        "passed": all(s["passed"] for s in steps),
        "dtype": dtype,
        "tolerance": {"atol": tol.atol, "rtol": tol.rtol},
        "prompt_tokens": len(prompt),
        "decode_steps": decode_steps,
        "max_abs_err": max(s["max_abs_err"] for s in steps),
        "max_rel_err": max(s["rel_err"] for s in steps),
        "greedy_agreement": f"{sum(s['greedy_agrees'] for s in steps)}/{len(steps)}",
        "steps": steps,
    }
    return report


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
    return "\n".join(lines)
