"""``qwen2c bench``: an engine (or engines built from a preset) against its peers on the same
weights, prompts and threads, interleaved in one run, each result also as a fraction of this
machine's measured limits; a table, a JSON file and a PNG plot.

``run_bench`` is the whole run; ``harness`` times, ``prepare`` chooses the systems and makes their
files, ``limits`` measures the machine, ``report`` writes what it found. ``bench_moe_dispatch``
(``--dense-experts``) compares a MoE engine's sparse dispatch with the same model run densely.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Callable

from .harness import Plan, run, summarize
from .prepare import DEFAULT_LLAMA_TYPES, INSTALL, PEERS, plan_systems
from .report import format_report, plot, write_json

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen2c" / "bench"

__all__ = ["DEFAULT_CACHE", "DEFAULT_LLAMA_TYPES", "PEERS", "Plan", "bench_moe_dispatch", "build_engines",
           "format_moe_bench", "format_report", "run_bench"]


def __getattr__(name: str):
    if name in ("bench_moe_dispatch", "format_moe_bench"):  # imports torch: only when asked for
        from . import moe

        return getattr(moe, name)
    raise AttributeError(name)


def build_engines(model: str, dtypes: list[str], out: Path, max_context: int | None,
                  progress: Callable[[str], None] = log.info,
                  tuning_db: list[str] | None = None) -> tuple[list[Path], dict[Path, float]]:
    """Engines of ``model`` (preset or checkpoint) in each dtype under ``out/engines/``, built here
    (timed) unless one of the same model, dtype, context and tuning is already there. With
    ``tuning_db``, each dtype twice: every kernel at its defaults, and with the database's records."""
    from .. import engine_dir
    from ..builder import build
    from ..errors import EngineError

    variants = [("", {})] if not tuning_db else [("-default", {"no_tuning": True}), ("-tuned", {"tuning_db": tuning_db})]
    engines, seconds = [], {}
    for dtype in dtypes:
        for suffix, tuning in variants:
            path = out / "engines" / f"{dtype}{suffix}"
            try:
                m = engine_dir.read_manifest(path, verify=False)
                same_tuning = (m.get("tuning") or {}).get("databases", []) == [str(d) for d in tuning.get("tuning_db", [])]
                if (m["model"]["source"], m["dtype"]) == (model, dtype) and same_tuning and \
                        m["max_context"] == (max_context or m["max_context"]) and (suffix or not tuning_db):
                    progress(f"using the engine already built at {path}")
                    engines.append(path)
                    continue
            except (EngineError, KeyError):
                pass
            progress(f"building {model} ({dtype}{', ' + suffix[1:] + ' kernel parameters' if suffix else ''}) into {path}")
            manifest = build(model, "llvm", path, dtype=dtype, max_context=max_context, force=path.exists(),
                             progress=progress, **tuning)
            engines.append(path)
            seconds[path] = manifest["build_seconds"]
    return engines, seconds


def run_bench(engines: list[Path], plan: Plan, out: Path, compare: bool = False, peers: list[str] | None = None,
              llama_types: list[str] = list(DEFAULT_LLAMA_TYPES), cache: Path = DEFAULT_CACHE,
              build_seconds: dict[Path, float] | None = None,
              progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Time ``engines`` (and with ``compare`` their peers); write OUT/bench.json and OUT/bench.png."""
    from .limits import machine

    plan.check()
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    chosen = (peers if peers is not None else list(PEERS)) if compare else []
    systems, skipped, config = plan_systems([Path(e) for e in engines], plan, chosen, cache, llama_types,
                                            build_seconds or {}, progress)
    for line in skipped:
        progress(line)
    about = dict(machine=machine(), skipped=skipped, model=_model_name(engines), engines=[str(e) for e in engines])

    def save_partial(measured: dict[str, Any]) -> None:
        write_json({**summarize(systems, measured, config, plan), **about, "complete": False}, out / "bench.json")

    measured = run(systems, plan, config["vocab_size"], out / "logs", progress, save_partial)
    result = summarize(systems, measured, config, plan)
    result.update(about, complete=True)
    (out / "bench.md").write_text(format_report(result, markdown=True) + "\n")
    if importlib.util.find_spec("matplotlib") is None:
        result["skipped"].append(f"plot: skipped, matplotlib not installed ({INSTALL})")
    else:
        plot(result, out / "bench.png")
        result["plot"] = str(out / "bench.png")
    write_json(result, out / "bench.json")
    return result


def _model_name(engines: list[Path]) -> str:
    from .. import engine_dir

    return engine_dir.read_manifest(Path(engines[0]), verify=False)["model"]["source"]
