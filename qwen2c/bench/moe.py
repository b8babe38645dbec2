"""``qwen2c bench --dense-experts``: a MoE engine's sparse dispatch against the same model built to
run every expert on every token, timed alternately in one process (median of ``repeats`` runs after
one warm-up), reported as ratios.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..parity import parity_prompt
from ..runtime import load


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _median_of(timed, repeats: int) -> float:
    """Median of what ``timed()`` reports (seconds of the part it times), after one warm-up."""
    timed()
    return statistics.median(timed() for _ in range(repeats))


def bench_moe_dispatch(directory: str | Path, prompt_tokens: int = 128, decode_tokens: int = 32, repeats: int = 3,
                       progress=lambda msg: None) -> dict[str, Any]:
    """A sparse MoE engine against the same model compiled to run every expert on every token.

    The dense variant is built here, from the engine's own checkpoint files, with the same target
    and kernels (only the dispatch differs), into a temporary directory; both are timed in this
    process, alternately, on the same prompt.
    """
    import tempfile

    import tvm  # noqa: F401  (all of TVM, before load() would take the runtime only: this builds too)

    from ..args import count
    from ..builder import build
    from ..errors import ConfigError

    engine = load(directory)
    moe = engine.manifest.get("moe")
    if not moe:
        raise ConfigError(f"{directory}: not a MoE engine; --dense-experts compares MoE dispatch strategies.")
    if moe["dispatch"] != "sparse":
        raise ConfigError(f"{directory}: built with --moe-dispatch {moe['dispatch']}; give the sparse engine.")
    count("--prompt-tokens", prompt_tokens)  # shortened to fit the context (below)
    count("--repeats", repeats)
    if count("--decode-tokens", decode_tokens) + 2 > engine.max_context:
        raise ConfigError(f"--decode-tokens {decode_tokens} leaves no room for a prompt in this engine's context of "
                          f"{engine.max_context} tokens.")
    with tempfile.TemporaryDirectory(prefix="qwen2c-dense-") as tmp:
        progress("building the dense-experts variant of the same model for comparison")
        build(str(directory), engine.manifest["target"]["name"], Path(tmp) / "dense", dtype=engine.manifest["dtype"],
              max_context=engine.max_context, moe_dispatch="dense", progress=progress)
        dense = load(Path(tmp) / "dense")
        prompt = parity_prompt(engine.vocab_size, min(prompt_tokens, engine.max_context - decode_tokens - 1), seed=1)
        t: dict[str, float] = {}
        for name, e in (("sparse", engine), ("dense", dense)):
            t[f"{name}_prefill"] = _median_time(lambda: e.session().prefill(prompt), repeats)
            t[f"{name}_decode"] = _median_of(lambda: _decode_run(e, prompt, decode_tokens), repeats)
    result = {
        "experts": moe["num_experts"], "experts_per_token": moe["num_experts_per_tok"], "moe_layers": len(moe["layers"]),
        "threads": int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)),
        "prompt_tokens": len(prompt), "decode_tokens": decode_tokens,
        "decode_ms_per_token": {k: 1e3 * t[f"{k}_decode"] / decode_tokens for k in ("sparse", "dense")},
        "prefill_tok_s": {k: len(prompt) / t[f"{k}_prefill"] for k in ("sparse", "dense")},
    }
    result["decode_speedup"] = result["decode_ms_per_token"]["dense"] / result["decode_ms_per_token"]["sparse"]
    result["prefill_speedup"] = result["prefill_tok_s"]["sparse"] / result["prefill_tok_s"]["dense"]
    return result


def _decode_run(engine, prompt: list[int], steps: int) -> float:
    """Prefill ``prompt``, then time ``steps`` greedy decode steps; return their seconds."""
    s = engine.session()
    logits = s.prefill(prompt)
    start = time.perf_counter()
    for _ in range(steps):
        logits = s.decode(int(np.argmax(logits)))
    return time.perf_counter() - start


def format_moe_bench(r: dict[str, Any]) -> str:
    return "\n".join([
        f"MoE dispatch: {r['experts']} experts, {r['experts_per_token']} per token, {r['moe_layers']} sparse layers; "
        f"threads {r['threads']}, prompt {r['prompt_tokens']} tokens, {r['decode_tokens']} decode steps (median of runs)",
        f"  decode : sparse {r['decode_ms_per_token']['sparse']:8.2f} ms/token   all experts (dense) "
        f"{r['decode_ms_per_token']['dense']:8.2f} ms/token   speedup {r['decode_speedup']:.2f}x",
        f"  prefill: sparse {r['prefill_tok_s']['sparse']:8.1f} tok/s      all experts (dense) "
        f"{r['prefill_tok_s']['dense']:8.1f} tok/s      speedup {r['prefill_speedup']:.2f}x",
    ])
