"""``qwen2c bench``: an engine against transformers eager on the same weights, in one process.

Both run on the same thread count (torch's intra-op threads are set to TVM's worker count). Each
measurement is the median of ``repeats`` runs after one warm-up; results are reported as tokens/s
and as the engine/eager ratio, never as pass/fail on wall-clock time.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_reference, resolve_model
from .parity import cache_kwargs, parity_prompt
from .runtime import load


def _check_counts(engine, prompt_tokens, decode_tokens, repeats) -> None:
    """Before any work: counts are integers >= 1, and the prompt plus decode steps fit the context."""
    from .args import count
    from .errors import ConfigError

    prompt = count("--prompt-tokens", prompt_tokens)
    decode = count("--decode-tokens", decode_tokens)
    count("--repeats", repeats)
    if prompt + decode > engine.max_context:
        raise ConfigError(f"--prompt-tokens {prompt} + --decode-tokens {decode} exceed this engine's maximum "
                          f"context of {engine.max_context} tokens.")


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


def bench(directory: str | Path, prompt_tokens: int = 128, decode_tokens: int = 32, repeats: int = 3) -> dict[str, Any]:
    from transformers import DynamicCache

    engine = load(directory)
    _check_counts(engine, prompt_tokens, decode_tokens, repeats)
    _, model = load_reference(resolve_model(str(directory)), engine.manifest["dtype"], copies=2.2)
    threads = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    prompt = parity_prompt(engine.vocab_size, prompt_tokens, seed=1)

    def engine_prefill():
        engine.session().prefill(prompt)

    def eager_prefill():
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)

    def eager_decode() -> float:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([prompt[:8]]), **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            start = time.perf_counter()
            for _ in range(decode_tokens):
                token = int(out.logits[0, -1].argmax())
                out = model(input_ids=torch.tensor([[token]]), **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start

    with torch.no_grad():
        t = {
            "engine_prefill": _median_time(engine_prefill, repeats),
            "eager_prefill": _median_time(eager_prefill, repeats),
            # Decode steps only, after an 8-token prefill that is not timed.
            "engine_decode": _median_of(lambda: _decode_run(engine, prompt[:8], decode_tokens), repeats),
            "eager_decode": _median_of(eager_decode, repeats),
        }
    result = {
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "prefill_tok_s": {"engine": prompt_tokens / t["engine_prefill"], "eager": prompt_tokens / t["eager_prefill"]},
        "decode_tok_s": {"engine": decode_tokens / t["engine_decode"], "eager": decode_tokens / t["eager_decode"]},
    }
    result["prefill_speedup"] = result["prefill_tok_s"]["engine"] / result["prefill_tok_s"]["eager"]
    result["decode_speedup"] = result["decode_tok_s"]["engine"] / result["decode_tok_s"]["eager"]
    return result


def format_bench(r: dict[str, Any]) -> str:
    return "\n".join([
        f"threads {r['threads']}, prompt {r['prompt_tokens']} tokens, {r['decode_tokens']} decode steps (median of runs)",
        f"  prefill: engine {r['prefill_tok_s']['engine']:8.1f} tok/s   transformers eager {r['prefill_tok_s']['eager']:8.1f} tok/s   "
        f"ratio {r['prefill_speedup']:.2f}x",
        f"  decode : engine {r['decode_tok_s']['engine']:8.1f} tok/s   transformers eager {r['decode_tok_s']['eager']:8.1f} tok/s   "
        f"ratio {r['decode_speedup']:.2f}x",
    ])


def bench_moe_dispatch(directory: str | Path, prompt_tokens: int = 128, decode_tokens: int = 32, repeats: int = 3,
                       progress=lambda msg: None) -> dict[str, Any]:
    """A sparse MoE engine against the same model compiled to run every expert on every token.

    The dense variant is built here, from the engine's own checkpoint files, with the same target
    and kernels (only the dispatch differs), into a temporary directory; both are timed in this
    process, alternately, on the same prompt.
    """
    import tempfile

    import tvm  # noqa: F401  (all of TVM, before load() would take the runtime only: this builds too)

    from .args import count
    from .builder import build
    from .errors import ConfigError

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
