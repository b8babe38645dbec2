"""Parity: an engine's logits against the transformers model on the same weights.

The same token sequence is fed to both: a seeded prompt, then at each decode step the reference's
greedy token. Compared at the prefill and at each of N decode steps: max abs and relative error,
and whether both pick the same greedy token.

float32 engines are held to ``tolerances.TOLERANCES``. Half-precision engines are held to a
tolerance derived from transformers itself: the same weights run in float32 are the reference,
transformers run in the engine's dtype measures what that dtype costs on these inputs, and the
engine may err by at most ``HALF_ERROR_FACTOR`` times that. A greedy token that differs from the
float32 reference's is forgiven only at a near-tie (the two tokens' float32 logits closer than
transformers' own error), and the report names each one.

MoE models are also compared on routing: at every step and sparse layer, the set of experts each
token was sent to, and over the prompt, how many tokens each expert received. A choice that
differs only between experts whose router probabilities tie within the dtype's tolerance is counted
as a near-tie, not a failure (either pick is correct to that precision).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any

import numpy as np
import torch

from .tolerances import HALF_ERROR_FACTOR, compare, tolerance_for_engine

log = logging.getLogger(__name__)

DEFAULT_PROMPT_TOKENS = 12
DEFAULT_DECODE_STEPS = 8


def parity_prompt(vocab_size: int, length: int = DEFAULT_PROMPT_TOKENS, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=gen).tolist()


def cache_kwargs(model, cache) -> dict[str, Any]:
    """The KV cache as this transformers' forward takes it: ``cache`` (5.24), ``past_key_values``
    (5.17, which passes an unknown ``cache=`` on to the attention layers, where it is ignored)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def reference_steps(model, prompt: list[int], steps: int, feed: list[int] | None = None):
    """The reference's last-position logits after the prompt and after each decode step, the tokens
    fed, and (MoE) each step's routing: per sparse layer, (router probabilities, experts).

    Decode steps feed the reference's own greedy tokens, or ``feed`` when given.
    """
    from transformers import DynamicCache

    from qwen2c.graphs.export import capture_routing

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    logits, fed, routing = [], [], []
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        for i in range(steps + 1):
            with capture_routing(model, with_logits=True) as layers:
                out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            routing.append([(torch.softmax(lg.float(), -1).cpu().numpy(), ex.cpu().numpy()) for lg, ex in layers])
            step = out.logits[0, -1].float().cpu().numpy()
            logits.append(step)
            token = int(np.argmax(step)) if feed is None or i >= len(feed) else feed[i]
            fed.append(token)
            ids = torch.tensor([[token]], device=device)
    return logits, fed[:-1], routing


@contextlib.contextmanager
def running_in_float32(model):
    """Run ``model`` (half precision) as its float32 self, without a float32 copy of its weights.

    Each module's own parameters are upcast (exactly) just before it runs and put back after, so
    at most one module's weights exist in float32 at a time; activations then flow in float32
    from the embedding on. A 7B bfloat16 model thus gets its float32 reference in 15 GB, not 45.
    """
    def upcast(module, _args):
        module._qwen2c_half = dict(module._parameters)
        for name, p in module._qwen2c_half.items():
            if p is not None and p.is_floating_point():
                module._parameters[name] = torch.nn.Parameter(p.detach().float(), requires_grad=False)

    def restore(module, _args, _out):
        module._parameters.update(module.__dict__.pop("_qwen2c_half"))

    leaves = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    handles = [h for m in leaves for h in (m.register_forward_pre_hook(upcast), m.register_forward_hook(restore))]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def check_parity(engine, model, dtype: str, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
                 decode_steps: int = DEFAULT_DECODE_STEPS) -> dict[str, Any]:
    """Step-by-step parity of ``engine`` with ``model`` (transformers, in ``dtype``).

    Half precision: the float32 reference is ``model`` itself, run in float32
    (``running_in_float32``); see the module docstring for how it sets the tolerance.
    """
    prompt = parity_prompt(engine.vocab_size, min(prompt_tokens, engine.max_context - decode_steps))
    half = dtype != "float32"
    if half:
        with running_in_float32(model):
            expected, fed, _ = reference_steps(model, prompt, decode_steps)
        in_dtype, _, ref_routing = reference_steps(model, prompt, decode_steps, feed=fed)
    else:
        expected, fed, ref_routing = reference_steps(model, prompt, decode_steps)
        in_dtype = None
    session = engine.session()
    actual = [session.prefill(prompt)]
    routing = [session.routing]
    for t in fed:
        actual.append(session.decode(t))
        routing.append(session.routing)
    tol = tolerance_for_engine(dtype, engine.manifest.get("kv_cache_dtype"))
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
    report = {"dtype": dtype, "tolerance": {"atol": tol.atol, "rtol": tol.rtol}}
    if half:
        report.update(_half_precision_verdict(steps, actual, expected, in_dtype))
    routing_report = compare_routing(engine.moe_layers, ref_routing, routing, tol.atol) if engine.moe_layers else None
    report.update({
        "passed": all(s["passed"] for s in steps) and (routing_report is None or routing_report["passed"]),
        "prompt_tokens": len(prompt),
        "decode_steps": decode_steps,
        "max_abs_err": max(s["max_abs_err"] for s in steps),
        "max_rel_err": max(s["rel_err"] for s in steps),
        "greedy_agreement": f"{sum(s['greedy_agrees'] for s in steps)}/{len(steps)}",
        "steps": steps,
        "routing": routing_report,
    })
    return report


def _half_precision_verdict(steps, actual, expected, in_dtype) -> dict[str, Any]:
    """Judge each step against transformers' own error in the dtype; name near-tie greedy flips."""
    hf_errs = [compare(h, ref)[0] for h, ref in zip(in_dtype, expected)]
    budget = HALF_ERROR_FACTOR * max(hf_errs)
    near_ties = []
    for i, (step, got, ref, hf_err) in enumerate(zip(steps, actual, expected, hf_errs)):
        step["transformers_abs_err"] = hf_err
        step["passed"] = step["max_abs_err"] <= budget
        if not step["greedy_agrees"]:
            want, have = int(np.argmax(ref)), int(np.argmax(got))
            gap = float(ref[want] - ref[have])
            tie = gap <= 2 * max(hf_errs)
            step["passed"] = step["passed"] and tie
            near_ties.append({"step": step["step"], "reference": want, "engine": have, "float32_logit_gap": gap,
                              "near_tie": tie})
    return {
        "reference": "transformers float32 on the same weights",
        "transformers_max_abs_err": max(hf_errs),
        "error_budget": budget,
        "error_factor": HALF_ERROR_FACTOR,
        "transformers_greedy_agreement": f"{sum(int(np.argmax(h) == np.argmax(r)) for h, r in zip(in_dtype, expected))}/{len(expected)}",
        "greedy_flips": near_ties,
    }


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
    verdict = "PASS" if report["passed"] else "FAIL"
    if "error_budget" in report:
        lines = [
            f"parity vs transformers float32 on the same weights ({report['dtype']} engine): {verdict}",
            f"  tolerance derived from transformers run in {report['dtype']}: its max abs err "
            f"{report['transformers_max_abs_err']:.3e} x {report['error_factor']:g} = {report['error_budget']:.3e}",
            f"  prompt {report['prompt_tokens']} tokens, {report['decode_steps']} decode steps; greedy tokens agree "
            f"{report['greedy_agreement']} (transformers in {report['dtype']}: {report['transformers_greedy_agreement']})",
        ]
        for s in report["steps"]:
            lines.append(
                f"  {s['step']:>10}: engine max abs err {s['max_abs_err']:.3e}  transformers {report['dtype']} "
                f"{s['transformers_abs_err']:.3e}  greedy {'=' if s['greedy_agrees'] else 'x'}  "
                f"{'ok' if s['passed'] else 'FAIL'}"
            )
        for f in report["greedy_flips"]:
            lines.append(
                f"  {f['step']}: greedy {f['engine']} vs reference {f['reference']}, float32 logit gap "
                f"{f['float32_logit_gap']:.3e}: {'a near-tie' if f['near_tie'] else 'NOT a near-tie'}"
            )
    else:
        lines = [
            f"parity vs transformers ({report['dtype']}, atol {report['tolerance']['atol']}, "
            f"rtol {report['tolerance']['rtol']}): {verdict}",
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
