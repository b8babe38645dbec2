"""Tuned against default kernel parameters, measured now: each tuned kernel of an engine, alone.

``qwen2c bench --model M --tuning-db DIR`` times the engine built both ways end to end; this adds the
kernels themselves, so a reader sees where an end-to-end difference comes from (or that tuning paid
for a kernel whose share of the step is small). Both choices of a kernel are compiled once, checked
to compute the same output, and timed in alternation, ``rounds`` times each; the medians are
compared.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable

from .tuner import _Measurer, find_tasks, own_tasks


def compare_kernels(engines: list[Path], rounds: int, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Each tuned kernel of ``engines`` against its defaults, on this process's TVM thread pool."""
    from qwen2c import engine_dir

    rows = []
    for engine in engines:
        manifest = engine_dir.read_manifest(engine, verify=False)
        tuned = {json.dumps(k["shape"], sort_keys=True) + k["kernel"]: k for k in (manifest.get("tuning") or {}).get("kernels", [])
                 if k["source"] == "tuned"}
        if not tuned:
            progress(f"{engine}: no kernel was tuned; nothing to compare")
            continue
        quant = manifest.get("quantization") or {}
        found = find_tasks(manifest["model"]["source"], manifest["target"]["name"], manifest["dtype"],
                           manifest["max_context"], quant.get("scheme"), quant.get("group_size"), progress)
        measurer = _Measurer(found.spec)
        for task in own_tasks(found):
            entry = tuned.get(json.dumps(task.shape, sort_keys=True) + task.kernel)
            if entry is None or entry["params"] == task.defaults:
                continue
            buckets = found.buckets if task.shape.get("rows") == "m" else (1,)
            reference = measurer.outputs(task, task.defaults, buckets)
            compiled = {"default": measurer.compile(task, task.defaults), "tuned": measurer.compile(task, entry["params"])}
            times: dict[str, list[float]] = {"default": [], "tuned": []}
            for _ in range(rounds):
                for which, params in (("default", task.defaults), ("tuned", entry["params"])):
                    times[which].append(measurer.time(task, params, buckets, reference, compiled[which])[0])
            default, best = statistics.median(times["default"]), statistics.median(times["tuned"])
            rows.append({"engine": str(engine), "kernel": task.kernel, "shape": task.shape,
                         "default_params": task.defaults, "tuned_params": entry["params"],
                         "default_seconds": default, "tuned_seconds": best, "speedup": default / best,
                         "unit": "per row over prefill buckets" if task.shape.get("rows") == "m" else "per call"})
            progress(f"    {task.title()}: {default / best:.2f}x ({rounds} alternating rounds)")
    return rows


def record_kernels(out: Path, rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(rows, indent=2) + "\n")


def format_kernels(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "Kernels: none of the tuned engine's kernels differ from their defaults."
    lines = ["Kernels, tuned vs default parameters (medians of alternating runs in this process):",
             f"{'kernel':<56} {'default':>18} {'tuned':>18} {'speedup':>8}"]
    for r in rows:
        shape = " ".join(f"{a}={b}" for a, b in r["shape"].items() if a != "vector")
        fmt = lambda p: ",".join(str(v) for v in p.values())  # noqa: E731
        lines.append(f"{(r['kernel'] + ' ' + shape)[:56]:<56} {fmt(r['default_params']):>18} "
                     f"{fmt(r['tuned_params']):>18} {r['speedup']:>7.2f}x")
    return "\n".join(lines)
