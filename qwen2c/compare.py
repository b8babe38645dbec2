"""Two engines of the same model side by side (``qwen2c verify A B``).

Typically the TVM engine and the ONNX Runtime engine of one checkpoint. Both must hold the same
model: the same config and the same weights file (by SHA-256), in the same dtype. Verification runs
each engine's parity against transformers (``parity.check_parity``), then feeds both the same
prompt and the reference's greedy tokens and reports, per step, how far their logits are from each
other and whether their greedy tokens agree. Their speed side by side is ``qwen2c bench A B``
(``qwen2c/bench``: any engines of one model, whatever their backend, interleaved in one run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_reference, resolve_model
from .errors import ConfigError
from .parity import DEFAULT_DECODE_STEPS, DEFAULT_PROMPT_TOKENS, check_parity, parity_prompt, reference_steps
from .runtime import Engine, load
from .tolerances import compare


def _label(engine: Engine) -> str:
    return f"{engine.directory.name} ({engine.backend})"


def load_pair(a: str | Path, b: str | Path) -> tuple[Engine, Engine]:
    """Both engines, after checking they hold the same model in the same dtype."""
    first, second = load(a), load(b)
    ma, mb = first.manifest, second.manifest
    if ma["model"]["config"] != mb["model"]["config"]:
        raise ConfigError(f"{a} and {b} hold different models (their configs differ); compare engines of one model.")
    weights = "model.safetensors"
    sha = [m.get("files", {}).get(weights, {}).get("sha256") for m in (ma, mb)]
    if None in sha or sha[0] != sha[1]:
        raise ConfigError(f"{a} and {b} were built from different weights ({weights} differs); compare engines of "
                          "one checkpoint.")
    if ma["dtype"] != mb["dtype"]:
        raise ConfigError(f"{a} is {ma['dtype']} and {b} is {mb['dtype']}; compare engines of one dtype.")
    return first, second


def _torch_device(engine: Engine) -> str:
    from .verify import TORCH_DEVICES

    return TORCH_DEVICES.get(engine.manifest["target"]["device"], "cpu")


def verify_pair(a: str | Path, b: str | Path, decode_steps: int = DEFAULT_DECODE_STEPS) -> dict[str, Any]:
    first, second = load_pair(a, b)
    dtype = first.manifest["dtype"]
    devices = {_torch_device(first), _torch_device(second)}
    device = "cuda" if "cuda" in devices else "cpu"
    _, reference = load_reference(resolve_model(str(a)), dtype, copies=3.2 if device == "cpu" else 1.2)
    reference = reference.to(device)
    reports = [check_parity(e, reference, dtype, decode_steps=decode_steps) for e in (first, second)]
    prompt = parity_prompt(first.vocab_size, min(DEFAULT_PROMPT_TOKENS, first.max_context - decode_steps))
    with torch.no_grad():
        _, fed, _ = reference_steps(reference, prompt, decode_steps)
    logits = []
    for engine in (first, second):
        session = engine.session()
        logits.append([session.prefill(prompt)] + [session.decode(t) for t in fed])
    steps = []
    for i, (x, y) in enumerate(zip(*logits)):
        err, rel, _ = compare(x, y)
        steps.append({"step": "prefill" if i == 0 else f"decode {i}", "max_abs_diff": err, "rel_diff": rel,
                      "greedy_agrees": bool(np.argmax(x) == np.argmax(y))})
    return {
        "engines": [_label(first), _label(second)],
        "parity": reports,
        "between": {"max_abs_diff": max(s["max_abs_diff"] for s in steps),
                    "greedy_agreement": f"{sum(s['greedy_agrees'] for s in steps)}/{len(steps)}", "steps": steps},
        "passed": all(r["passed"] for r in reports),
    }


def format_verify_pair(result: dict[str, Any]) -> str:
    from .parity import format_report

    lines = []
    for label, report in zip(result["engines"], result["parity"]):
        lines += [f"{label}:", format_report(report)]
    between = result["between"]
    lines.append(f"{result['engines'][0]} vs {result['engines'][1]}: max abs logit difference "
                 f"{between['max_abs_diff']:.3e}; greedy tokens agree {between['greedy_agreement']}")
    for s in between["steps"]:
        lines.append(f"  {s['step']:>10}: max abs diff {s['max_abs_diff']:.3e}  rel {s['rel_diff']:.3e}  "
                     f"greedy {'=' if s['greedy_agrees'] else 'x'}")
    return "\n".join(lines)
