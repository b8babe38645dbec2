"""``qwen2c bench``'s arguments and what the command does with them (cli.py only wires it in)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

from ..args import cli_count
from ..errors import ConfigError
from .prepare import DEFAULT_LLAMA_TYPES, PEERS


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 128,1024") from None


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("engines", nargs="*", metavar="ENGINE", help="engine directories (same model; any dtypes)")
    p.add_argument("--model", help="instead of engines: a preset or checkpoint, built here (timed) in each --dtype")
    p.add_argument("--dtype", default="float32", help="with --model: comma-separated dtypes (default float32)")
    p.add_argument("--max-context", type=cli_count, default=None, help="with --model: engines' context (default 4096)")
    p.add_argument("--tuning-db", action="append", default=None, metavar="DIR",
                   help="with --model: build each dtype twice, default kernel parameters and this tuning database's "
                        "(`qwen2c tune --db`), and time both, end to end and each tuned kernel alone, in one run")
    p.add_argument("--compare", action="store_true",
                   help="also time the peers on the same weights, prompts and threads: " + ", ".join(PEERS))
    p.add_argument("--peers", type=_names, default=None,
                   help=f"with --compare: which peers, comma-separated (default all: {','.join(PEERS)})")
    p.add_argument("--llama-types", type=_names, default=list(DEFAULT_LLAMA_TYPES),
                   help=f"llama.cpp GGUF types (default {','.join(DEFAULT_LLAMA_TYPES)}; also bf16, q4_k_m, q5_0, q6_k)")
    p.add_argument("--prefill", type=_ints, default=(128, 1024, 4096), help="prompt lengths (default 128,1024,4096)")
    p.add_argument("--decode-context", type=_ints, default=(16, 128, 4000),
                   help="decode after this many tokens (default 16,128,4000)")
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps timed per context and round (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads for every system (default: all this process may use)")
    p.add_argument("-o", "--output", default="bench-results", help="folder for bench.json, bench.md, bench.png, logs")
    p.add_argument("--cache", default=None, help="where ONNX exports and GGUFs are kept (default ~/.cache/qwen2c/bench)")
    p.add_argument("--dense-experts", action="store_true",
                   help="MoE engines: compare with the same model built to run all experts on every token")
    p.add_argument("--prompt-tokens", type=cli_count, default=128, help="with --dense-experts: prompt length")
    p.add_argument("--decode-tokens", type=cli_count, default=32, help="with --dense-experts: decode steps")
    p.add_argument("--repeats", type=cli_count, default=3, help="with --dense-experts: runs per measurement")


def run_command(args, progress: Callable[[str], None]) -> int:
    from . import DEFAULT_CACHE, Plan, bench_moe_dispatch, build_engines, format_moe_bench, format_report, run_bench

    if args.dense_experts:
        if len(args.engines) != 1:
            raise ConfigError("--dense-experts takes one MoE engine directory.")
        from ..engine_dir import read_manifest

        if read_manifest(Path(args.engines[0]), verify=False).get("backend") != "tvm":
            raise ConfigError("--dense-experts rebuilds the engine with TVM's dense MoE dispatch; give a tvm engine.")
        print(format_moe_bench(bench_moe_dispatch(args.engines[0], args.prompt_tokens, args.decode_tokens,
                                                  args.repeats, progress)))
        return 0
    if bool(args.engines) == bool(args.model):
        raise ConfigError("give engine directories or --model (a preset or checkpoint to build), not both or neither.")
    if args.peers and not args.compare:
        raise ConfigError("--peers chooses among the peers --compare adds; add --compare.")
    unknown = [p for p in args.peers or [] if p not in PEERS]
    if unknown:
        raise ConfigError(f"--peers {','.join(unknown)}: not a peer; choose from {', '.join(PEERS)}.")
    plan = Plan(threads=args.threads, prefill=args.prefill, decode_contexts=args.decode_context,
                decode_steps=args.decode_steps, rounds=args.rounds)
    plan.check()
    out = Path(args.output)
    engines, seconds = [Path(e) for e in args.engines], {}
    if args.tuning_db and not args.model:
        raise ConfigError("--tuning-db builds the model both ways: give --model (a preset or checkpoint).")
    if args.tuning_db:
        from qwen2c.autotune.database import check_folder

        for folder in args.tuning_db:
            check_folder(folder)
    if args.model:
        dtypes = _names(args.dtype)
        engines, seconds = build_engines(args.model, dtypes, out, args.max_context, progress, args.tuning_db)
    result = run_bench(engines, plan, out, compare=args.compare, peers=args.peers, llama_types=args.llama_types,
                       cache=Path(args.cache) if args.cache else DEFAULT_CACHE, build_seconds=seconds,
                       progress=progress)
    if args.tuning_db:
        from qwen2c.autotune.compare import compare_kernels, format_kernels, record_kernels

        rows = compare_kernels([e for e in engines if e.name.endswith("-tuned")], plan.rounds, progress)
        record_kernels(out, rows)
        print(format_kernels(rows) + "\n")
    print(format_report(result))
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'} (the tables in Markdown)"
          + (f" and {result['plot']}" if result.get("plot") else ""))
    return 0
