"""``qwen2c tune``: tune an engine's kernels into a database; ``tune merge`` joins databases."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from qwen2c.args import cli_count
from qwen2c.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory or preset to tune (as for build)")
    p.add_argument("--target", default="llvm", help="compile target (default: llvm, this machine's CPU)")
    p.add_argument("--trials", type=cli_count, default=16,
                   help="most parameter choices measured per kernel, the defaults included (default 16); MetaSchedule "
                        "gets this many trials per TIR kernel")
    p.add_argument("--tir-trials", type=int, default=None,
                   help="MetaSchedule trials per TVM TIR kernel (default: --trials; 0 skips MetaSchedule)")
    p.add_argument("--db", default="tuning-db",
                   help="tuning database folder; created, or extended (a rerun resumes) (default ./tuning-db)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"), help="as for build")
    p.add_argument("--max-context", type=cli_count, default=None, help="as for build (sets the prefill buckets)")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none", help="as for build")
    p.add_argument("--group-size", type=int, default=None, choices=(32, 64), help="as for build")
    p.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT",
                   help="time candidates on machines registered with this TVM RPC tracker (with --rpc-key)")
    p.add_argument("--rpc-key", default=None, metavar="KEY", help="the tracker's device key to request")
    p.add_argument("--seed", type=int, default=0, help="order in which choices are tried (default 0)")
    sub = p.add_subparsers(dest="tune_command", required=False, metavar="{merge,sweep}")
    m = sub.add_parser("merge", help="join tuning databases into one",
                       description="Every valid record of the given databases into --db (its own are kept); "
                                   "damaged lines are skipped and counted.")
    m.add_argument("databases", nargs="+", metavar="DB", help="tuning database folders to merge in")
    m.add_argument("--db", dest="merge_into", required=True, help="the database folder to merge into")
    from .sweep import add_arguments as add_sweep_arguments

    s = sub.add_parser("sweep", help="build and benchmark a grid of configurations from a spec file",
                       description="Runs the grid a TOML spec describes; writes results.csv, results.json and "
                                   "results.png; resumes where an interrupted sweep stopped.")
    add_sweep_arguments(s)


def run_command(args, progress: Callable[[str], None]) -> int:
    if args.tune_command == "merge":
        return _merge(args, progress)
    if args.tune_command == "sweep":
        from .sweep import run_command as run_sweep

        return run_sweep(args, progress)
    if not args.model:
        raise ConfigError("tune needs --model (a checkpoint directory or preset), or a subcommand: merge, sweep.")
    remote = _remote(args)
    from .tuner import tune

    db = Path(args.db)
    try:
        summary = tune(args.model, args.target, db, args.trials, dtype=args.dtype, max_context=args.max_context,
                       quantize=args.quantize, group_size=args.group_size, progress=progress, rpc=remote,
                       seed=args.seed, tir_trials=args.tir_trials)
    except KeyboardInterrupt:
        print(f"qwen2c tune: interrupted; every measurement made so far is in {db} (rerun the same command to "
              "resume where it stopped).", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


def _remote(args):
    if (args.rpc_tracker is None) != (args.rpc_key is None):
        raise ConfigError("--rpc-tracker and --rpc-key go together: the tracker HOST:PORT and the device key to "
                          "request from it.")
    if args.rpc_tracker is None:
        return None
    from .rpc import Remote, parse_tracker

    return Remote(parse_tracker(args.rpc_tracker), args.rpc_key)


def _merge(args, progress) -> int:
    from . import database

    out = Path(args.merge_into)
    folders = [database.check_folder(f, "tune merge") for f in args.databases]
    counts = database.merge(out, folders, warn=lambda m: progress("warning: " + m))
    from .metaschedule_db import merge as merge_metaschedule

    ms = merge_metaschedule(out / database.METASCHEDULE,
                            [f / database.METASCHEDULE for f in folders if (f / database.METASCHEDULE).is_dir()])
    print(f"merged into {out}: {counts['records']} records ({counts['duplicates']} duplicates dropped, "
          f"{counts['damaged_lines']} damaged lines skipped)" + (f"; MetaSchedule: {ms}" if ms else ""))
    return 0


def format_summary(summary: dict) -> str:
    lines = [f"tuning database {summary['db']} (target {summary['target']['target']}, key {summary['target']['match']}; "
             f"prefill buckets {', '.join(map(str, summary['buckets']))})"]
    lines.append(f"{'kernel':<64} {'trials':>9} {'best':>22} {'vs default':>10}")
    for k in summary["kernels"]:
        shape = " ".join(f"{a}={b}" for a, b in k["shape"].items() if a not in ("vector",))
        best = ",".join(f"{a}={b}" for a, b in (k["best"] or {}).items())
        speedup = f"{k['speedup']:.2f}x" if k.get("speedup") else "-"
        lines.append(f"{(k['kernel'] + ' ' + shape)[:64]:<64} {k['trials']:>4}/{k['choices']:<4} {best:>22} {speedup:>10}")
    ms = summary.get("metaschedule")
    if ms and ms.get("tasks"):
        lines.append(f"MetaSchedule ({ms['db']}): TVM's static-shape TIR functions; a record is applied only where it "
                     "beat the default schedule")
        lines.append(f"{'function':<64} {'trials':>9} {'best µs':>12} {'default µs':>12}")
        for t in ms["tasks"]:
            best = f"{t['best_us']:.3f}" if t.get("best_us") is not None else "-"
            default = f"{t['default_us']:.3f}" if t.get("default_us") is not None else "-"
            lines.append(f"{t['name'][:64]:<64} {t['trials']:>9} {best:>12} {default:>12}")
    if summary.get("damaged_lines"):
        lines.append(f"{summary['damaged_lines']} damaged line(s) of the database were skipped")
    lines.append("apply with: qwen2c build ... --tuning-db " + summary["db"])
    return "\n".join(lines)
