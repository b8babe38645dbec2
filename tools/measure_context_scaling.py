"""Measure how an engine scales with context: prefill tokens/s at several prompt lengths, decode
ms/token after several context lengths, and ``qwen2c.load`` time with the files in the page cache.

    python tools/measure_context_scaling.py ENGINE [--prefill 128,1024,4096] [--decode-after 16,1024,4000]

Prints one JSON object. Timings are medians over ``--repeats`` (prefill, load) or over the timed
decode steps; the machine may be shared, so compare engines in runs made close together.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import qwen2c


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engine")
    p.add_argument("--prefill", type=_ints, default=[128, 1024, 4096])
    p.add_argument("--decode-after", type=_ints, default=[16, 1024, 4000])
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    qwen2c.load(args.engine)  # warms the page cache
    loads = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        engine = qwen2c.load(args.engine)
        loads.append(time.perf_counter() - start)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, engine.vocab_size, max(args.prefill + args.decode_after))]
    engine.session().prefill(prompt[:32])  # first call: the VM's own warm-up

    prefill = {}
    for n in args.prefill:
        times = []
        for _ in range(args.repeats if n <= 1024 else 1):
            s = engine.session()
            start = time.perf_counter()
            s.prefill(prompt[:n])
            times.append(time.perf_counter() - start)
        prefill[n] = round(n / statistics.median(times), 1)

    decode = {}
    for n in args.decode_after:
        s = engine.session()
        logits = s.prefill(prompt[:n])
        steps = []
        for _ in range(args.decode_steps):
            start = time.perf_counter()
            logits = s.decode(int(np.argmax(logits)))
            steps.append(time.perf_counter() - start)
        decode[n] = round(1e3 * statistics.median(steps), 2)

    print(json.dumps({
        "engine": args.engine,
        "load_s": {"median": round(statistics.median(loads), 3), "all": [round(t, 3) for t in loads]},
        "prefill_tok_s": prefill,
        "decode_ms_per_token_after": decode,
        "decode_ratio_longest_vs_shortest": round(decode[max(decode)] / decode[min(decode)], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
