"""``qwen2c bench E1 E2 ...``: decode speed of several engines in one process, against the memory roofline.

A decode step must read every weight it uses once, so its floor is (bytes of weights read per token)
/ (memory bandwidth). Both are measured here, in the same run: the bytes from each engine's weights
file (the embedding table counts one row when the vocabulary projection has its own weights, since
the gather reads one row; MoE experts count at top_k / num_experts), the bandwidth as the best of
several timed reductions over a buffer much larger than the caches, on the engines' thread count.
Engines are timed alternately, median of ``repeats`` runs each, so they share the machine's state.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import engine_dir
from .bench.moe import _decode_run
from .parity import parity_prompt
from .runtime import load

_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1}
BANDWIDTH_BUFFER = 1 << 30  # bytes: far beyond any L3 seen on these machines (480 MiB at most)


def decode_bytes_per_token(directory: Path, manifest: dict[str, Any]) -> int:
    """Bytes of weights one decode step reads."""
    cfg = manifest["model"]["config"]
    moe = manifest.get("moe") or {}
    share = moe.get("num_experts_per_tok", 1) / moe.get("num_experts", 1) if moe else 1.0
    tied = bool(cfg.get("tie_word_embeddings"))
    total = 0.0
    for t in engine_dir.weights_spec(directory / engine_dir.WEIGHTS):
        size = _SAFETENSORS_BYTES[t["dtype"]] * int(np.prod(t["shape"]))
        if t["name"].startswith("model.embed_tokens.") and not tied:
            size /= t["shape"][0]  # one row per token
        elif ".mlp.experts." in t["name"]:
            size *= share
        total += size
    return int(total)


def memory_bandwidth(threads: int, repeats: int = 5) -> float:
    """Bytes/s of a multi-threaded read of a large buffer (torch's sum, ``threads`` threads)."""
    import torch

    torch.set_num_threads(threads)
    buf = torch.ones(BANDWIDTH_BUFFER // 4, dtype=torch.float32)
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(repeats))
    return BANDWIDTH_BUFFER / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_decode(directories: list[str | Path], decode_tokens: int = 32, repeats: int = 3) -> dict[str, Any]:
    threads = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
    engines = [(Path(d), load(d)) for d in directories]
    prompt = parity_prompt(engines[0][1].vocab_size, 8, seed=1)
    times: dict[int, list[float]] = {i: [] for i in range(len(engines))}
    for i, (_, e) in enumerate(engines):
        _decode_run(e, prompt, 2)  # warm-up
    for _ in range(repeats):
        for i, (_, e) in enumerate(engines):
            times[i].append(_decode_run(e, prompt, decode_tokens) / decode_tokens)
    bandwidth = memory_bandwidth(threads)
    rows = []
    for i, (d, e) in enumerate(engines):
        q = e.manifest.get("quantization")
        weights = decode_bytes_per_token(d, e.manifest)
        seconds = statistics.median(times[i])
        rows.append({
            "engine": str(d), "dtype": e.manifest["dtype"],
            "weights": f"{q['scheme']} g{q['group_size']}" if q else e.manifest["dtype"],
            "decode_ms_per_token": 1e3 * seconds,
            "bytes_per_token": weights,
            "roofline_ms": 1e3 * weights / bandwidth,
            "roofline_fraction": weights / bandwidth / seconds,
        })
    base = rows[0]["decode_ms_per_token"]
    for r in rows:
        r["speedup_vs_first"] = base / r["decode_ms_per_token"]
    return {"threads": threads, "decode_tokens": decode_tokens, "repeats": repeats,
            "bandwidth_gb_s": bandwidth / 1e9, "engines": rows}


def format_bench_decode(r: dict[str, Any]) -> str:
    lines = [f"decode, {r['decode_tokens']} steps after an 8-token prompt, median of {r['repeats']} (engines "
             f"alternating); threads {r['threads']}; memory read bandwidth {r['bandwidth_gb_s']:.1f} GB/s (same run)",
             f"  {'weights':14}{'ms/token':>10}{'vs first':>10}{'MB/token':>10}{'roofline ms':>13}{'of roofline':>13}  engine"]
    for e in r["engines"]:
        lines.append(f"  {e['weights']:14}{e['decode_ms_per_token']:10.2f}{e['speedup_vs_first']:9.2f}x"
                     f"{e['bytes_per_token'] / 1e6:10.1f}{e['roofline_ms']:13.2f}{e['roofline_fraction']:12.0%}  "
                     f"{e['engine']}")
    return "\n".join(lines)
