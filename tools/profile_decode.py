"""Where a TVM CPU engine's decode step spends its time, kernel by kernel.

    python tools/profile_decode.py ENGINE [--context 16,4000] [--steps 10]

For each context length: a prompt of that many tokens is prefilled, then ``--steps`` decode steps
run through a second VM over the same library and weights with an instrument that times every call
the VM makes (compiled kernels by name, VM builtins such as the KV cache's attention). Prints each
callee's calls and milliseconds per step, its share, and the step's wall time (the instrument's own
cost is the difference). Same-run ratios only: the machine may be shared.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tvm
from tvm.relax import VirtualMachine

import qwen2c
from qwen2c.targets.tvm import runtime as tvm_runtime


def profile(engine_dir: str, context: int, steps: int) -> tuple[dict[str, list[float]], float]:
    engine = qwen2c.load(engine_dir)
    program = engine._program
    session = engine.session()
    session.prefill([int(t) for t in np.random.default_rng(0).integers(0, engine.vocab_size, context)])
    vm = VirtualMachine(program.library, program.device)
    totals: dict[str, list[float]] = {}
    started: dict[str, float] = {}

    def instrument(func, name, before, ret, *args):
        if before:
            started[name] = time.perf_counter()
        else:
            entry = totals.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - started[name]

    vm.set_instrument(instrument)
    decode = vm["decode"]
    t0 = time.perf_counter()
    for i in range(steps):
        token = tvm.runtime.tensor(np.array([[100 + i]], "int64"), program.device)
        tvm_runtime._begin_forward(session._cache, tvm_runtime._SEQUENCE_IDS, tvm_runtime._ONE_TOKEN)
        decode(token, session._cache, *program.params)
        tvm_runtime._end_forward(session._cache)
    return totals, (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine")
    parser.add_argument("--context", default="16,4000", help="prompt lengths before the timed steps")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    for context in (int(c) for c in args.context.split(",")):
        totals, wall = profile(args.engine, context, args.steps)
        timed = sum(t for _, t in totals.values()) / args.steps
        print(f"\n{args.engine}: decode after {context} tokens, {args.steps} steps: "
              f"{wall * 1e3:.2f} ms per step ({timed * 1e3:.2f} ms inside timed calls)")
        for name, (calls, seconds) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:args.top]:
            per_step = seconds / args.steps
            print(f"  {name:58s} {calls // args.steps:5d} calls {per_step * 1e3:8.3f} ms {per_step / timed:6.1%}")


if __name__ == "__main__":
    main()
