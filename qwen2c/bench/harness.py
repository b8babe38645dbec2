"""Time several systems on the same prompts, thread count and machine, interleaved, in one run.

Each system runs in a worker process of its own (``worker.py``). Every round asks each system, in
an order rotated from round to round, for each measurement in turn: a prefill of each prompt length,
then decode steps after each context length. So a disturbance on the machine (a neighbour's job,
thermal drift) lands on all systems alike rather than on whichever ran during it; the spread across
rounds is reported next to each median. A short pause between systems lets the previous one's
spinning threads (llama.cpp's, OpenMP's, TVM's) go idle before the next is timed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..memory import GIB, available_bytes
from .limits import measure_limits

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Plan:
    threads: int
    prefill: tuple[int, ...] = (128, 1024, 4096)
    decode_contexts: tuple[int, ...] = (16, 128, 4000)
    decode_steps: int = 32
    rounds: int = 3
    settle_s: float = 0.3  # pause between systems: spinning thread pools go idle
    timeout_s: float = 1800.0  # one request (a 4,096-token prefill of a slow peer takes minutes)
    # The machine's limits (before and after; seconds each, and a 1 GiB buffer): what fractions of
    # peak are measured against. A sweep compares engines with each other only and leaves them out.
    limits: bool = True

    def check(self) -> None:
        from ..errors import ConfigError

        for name, values in (("--prefill", self.prefill), ("--decode-context", self.decode_contexts)):
            if not values or any(v < 1 for v in values):
                raise ConfigError(f"{name} {','.join(map(str, values))}: give positive token counts.")
        for name, value in (("--decode-steps", self.decode_steps), ("--rounds", self.rounds), ("--threads", self.threads)):
            if value < 1:
                raise ConfigError(f"{name} {value}: must be at least 1.")


@dataclasses.dataclass
class System:
    name: str  # "qwen2c float32", "llama.cpp q4_0"
    family: str  # "qwen2c", "transformers eager", "torch.compile", "onnxruntime", "llama.cpp"
    precision: str
    bits: int
    spec: dict[str, Any]  # what the worker needs (kind, path, dtype, ...)
    memory_bytes: int  # expected resident size, to decide which workers can live at once
    prepare_s: float | None = None  # building the engine / exporting / converting, when it happened in this run
    prepare_what: str = ""
    threads: int | None = None  # this system's own thread count (a sweep's knob); None: the plan's


class Worker:
    """The parent's end of one worker process."""

    def __init__(self, system: System, threads: int, log_dir: Path, timeout_s: float):
        self.system, self.timeout_s = system, timeout_s
        child_read, parent_write = os.pipe()
        parent_read, child_write = os.pipe()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TVM_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads)}
        env.pop("TVM_USE_RUNTIME_LIB", None)
        spec = {**system.spec, "threads": threads}
        self.log_path = log_dir / f"worker-{_slug(system.name)}.log"
        with open(self.log_path, "w") as logfile:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "qwen2c.bench.worker", str(child_read), str(child_write), json.dumps(spec)],
                pass_fds=(child_read, child_write), env=env, stdout=logfile, stderr=subprocess.STDOUT)
        os.close(child_read)
        os.close(child_write)
        self._write = os.fdopen(parent_write, "w")
        self._read = os.fdopen(parent_read)
        self.hello = self._reply()

    def _reply(self) -> dict[str, Any]:
        ready, _, _ = select.select([self._read], [], [], self.timeout_s)
        line = self._read.readline() if ready else ""
        if not line:
            self.process.kill()
            tail = self.log_path.read_text()[-1500:] if self.log_path.exists() else ""
            why = "timed out" if not ready else "exited"
            return {"error": f"worker {why} (log {self.log_path}): {tail.strip()}"}
        return json.loads(line)

    def request(self, value: dict[str, Any]) -> dict[str, Any]:
        if self.process.poll() is not None:
            return {"error": f"worker is gone (log {self.log_path})"}
        try:
            self._write.write(json.dumps(value) + "\n")
            self._write.flush()
        except BrokenPipeError:
            return {"error": f"worker is gone (log {self.log_path})"}
        return self._reply()

    def close(self) -> dict[str, Any]:
        reply = self.request({"op": "quit"}) if self.process.poll() is None else {}
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._write.close()
        self._read.close()
        return reply


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def prompt_ids(vocab_size: int, length: int, seed: int = 1) -> list[int]:
    """The prompt every system gets: seeded ordinary tokens (ids below the special tokens)."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, min(vocab_size, 151643), length).tolist()


def _groups(peers: list[System], budget: int) -> list[list[System]]:
    """Peers whose workers can be alive at once within ``budget`` bytes, in order."""
    groups: list[list[System]] = [[]]
    used = 0
    for s in peers:
        if groups[-1] and used + s.memory_bytes > budget:
            groups.append([])
            used = 0
        groups[-1].append(s)
        used += s.memory_bytes
    return groups


def run(systems: list[System], plan: Plan, vocab_size: int, log_dir: Path,
        progress: Callable[[str], None] = log.info,
        after_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure every system; return the raw measurements, the limits and the run's conditions.

    qwen2c's engines stay loaded for the whole run. When the peers do not all fit in memory beside
    them, the peers come in groups that do, each group interleaved with the engines, so every peer
    is compared with qwen2c under the same conditions (the engines then get a share of rounds with
    each group, all kept). ``after_round`` gets the measurements so far after every round (a long
    run keeps what it measured if it is stopped).
    """
    plan.check()
    log_dir.mkdir(parents=True, exist_ok=True)
    limits = []
    if plan.limits:
        progress(f"measuring this machine's limits ({plan.threads} threads)")
        limits.append(measure_limits(plan.threads))
    ours = [s for s in systems if s.family == "qwen2c"]
    peers = [s for s in systems if s.family != "qwen2c"]
    budget = available_bytes() - GIB - sum(s.memory_bytes for s in ours)
    groups = _groups(peers, budget)
    if len(groups) > 1:
        progress(f"not enough memory for all {len(peers)} peers at once: {len(groups)} groups, each interleaved "
                 "with qwen2c's engines")
    raw: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()

    def start(group: list[System]) -> dict[str, Worker]:
        workers = {}
        for s in group:
            progress(f"loading {s.name}")
            w = Worker(s, s.threads or plan.threads, log_dir, plan.timeout_s)
            raw[s.name] = {"load": w.hello, "prefill": {}, "decode": {}, "errors": []}
            if "error" in w.hello:
                progress(f"    {s.name}: failed to load: {w.hello['error'][-300:]}")
                w.close()
                continue
            workers[s.name] = w
        return workers

    def stop(workers: dict[str, Worker]) -> None:
        for name, w in workers.items():
            raw[name]["peak_rss_bytes"] = w.close().get("peak_rss_bytes")

    engines = start(ours)
    try:
        for group in groups:
            workers = start(group)
            try:
                _rounds({**engines, **workers}, plan, vocab_size, raw, progress,
                        lambda: after_round and after_round({"raw": raw, "limits_runs": limits, "groups": len(groups),
                                                             "seconds": time.perf_counter() - started}))
            finally:
                stop(workers)
    finally:
        stop(engines)
    if plan.limits:
        progress("measuring this machine's limits again")
        limits.append(measure_limits(plan.threads))
    return {"raw": raw, "limits_runs": limits, "seconds": time.perf_counter() - started, "groups": len(groups)}


def _rounds(workers: dict[str, Worker], plan: Plan, vocab_size: int, raw: dict[str, Any],
            progress: Callable[[str], None], after_round: Callable[[], Any]) -> None:
    names = list(workers)
    items = [("prefill", n) for n in plan.prefill] + [("decode", c) for c in plan.decode_contexts]
    for r in range(plan.rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        progress(f"round {r + 1}/{plan.rounds}")
        for op, n in items:
            progress(f"    {op} {n}")
            ids = prompt_ids(vocab_size, n)
            for name in order:
                w = workers[name]
                limit = w.hello.get("max_context") or 0
                need = n if op == "prefill" else n + plan.decode_steps
                if need > limit:
                    raw[name][op].setdefault(str(n), {"skipped": f"needs {need} tokens of context; it serves {limit}"})
                    continue
                request = {"op": op, "ids": ids} if op == "prefill" else {"op": op, "ids": ids, "steps": plan.decode_steps}
                reply = w.request(request)
                if "error" in reply:
                    raw[name]["errors"].append(f"{op} {n}: {reply['error']}")
                    progress(f"    {name} {op} {n}: {reply['error'][-300:]}")
                else:
                    raw[name][op].setdefault(str(n), {"runs": []})["runs"].append(reply)
                time.sleep(plan.settle_s)
        after_round()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(systems: list[System], measured: dict[str, Any], config: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Medians, p90s, spreads and fractions of this machine's limits for every system."""
    from .roofline import prefill_flops

    limits = _limits(measured["limits_runs"]) if measured["limits_runs"] else None  # None: Plan(limits=False)
    out = []
    for s in systems:
        if s.name not in measured["raw"]:  # a partial result, written while the run goes on
            out.append({"name": s.name, "family": s.family, "precision": s.precision, "bits": s.bits,
                        "error": "not measured yet"})
            continue
        raw = measured["raw"][s.name]
        load = raw["load"]
        row: dict[str, Any] = {"name": s.name, "family": s.family, "precision": s.precision, "bits": s.bits,
                               "prepare_s": s.prepare_s, "prepare_what": s.prepare_what}
        if "error" in load:
            row["error"] = load["error"]
            out.append(row)
            continue
        info = load["info"]
        row.update(load_s=load["load_s"], cold_first_token_s=load["load_s"] + load["first_call_s"],
                   weight_bytes_per_token=info["weight_bytes_per_token"],
                   peak_rss_bytes=raw.get("peak_rss_bytes"), errors=raw["errors"])
        if info.get("build_s") is not None and s.prepare_s is None:
            row["prepare_s"], row["prepare_what"] = info["build_s"], "engine build (from its manifest)"
        peak = _peak(limits, s.bits)
        row["prefill"] = {}
        # A decode measurement's prompt is a timed prefill too: a context not among the prefill
        # lengths adds a point to the prefill curve for free (marked "from_decode").
        prompts = {c: {"runs": [{"s": r["prompt_s"]} for r in m["runs"]], "from_decode": True}
                   for c, m in raw["decode"].items() if "runs" in m and c not in raw["prefill"]}
        for n, m in {**raw["prefill"], **prompts}.items():
            if "skipped" in m:
                row["prefill"][n] = m
                continue
            times = [r["s"] for r in m["runs"]]
            med = statistics.median(times)
            flops = prefill_flops(config, int(n))
            row["prefill"][n] = {"tok_s": int(n) / med, "median_s": med, "runs_s": times,
                                 "spread": (max(times) - min(times)) / med,
                                 "fraction_of_peak": flops / med / (peak * 1e9) if peak else None, "from_decode": "from_decode" in m}
        row["decode"] = {}
        floor_s = info["weight_bytes_per_token"] / (limits["bandwidth_GB_s"] * 1e9) if limits else None
        for c, m in raw["decode"].items():
            if "skipped" in m:
                row["decode"][c] = m
                continue
            steps = [t for r in m["runs"] for t in r["step_s"]]
            per_round = [statistics.median(r["step_s"]) for r in m["runs"]]
            med = statistics.median(steps)
            row["decode"][c] = {"ms_per_token": 1e3 * med, "p90_ms": 1e3 * percentile(steps, 0.9),
                                "tok_s": 1 / med, "round_medians_ms": [1e3 * t for t in per_round],
                                "spread": (max(per_round) - min(per_round)) / med,
                                "fraction_of_roofline": floor_s / med if floor_s else None, "tokens": m["runs"][-1]["tokens"]}
        shortest = min((int(n) for n, v in row["prefill"].items() if "tok_s" in v and not v["from_decode"]), default=None)
        if shortest is not None:
            row["ttft_ms"] = {"prompt_tokens": shortest, "ms": 1e3 * row["prefill"][str(shortest)]["median_s"]}
        out.append(row)
    return {"plan": dataclasses.asdict(plan), "limits": limits, "systems": out, "ratios": ratios(out),
            "seconds": measured["seconds"], "memory_groups": measured["groups"]}


def _peak(limits: dict[str, Any] | None, bits: int) -> float | None:
    """The arithmetic roof of a system's prefill: 8- and 4-bit systems round activations to int8 for
    integer dot products where the machine has them (qwen2c's VNNI kernels, llama.cpp's Q8_0/Q4_0),
    so the int8 roof; others the float GEMM roof of their dtype."""
    if not limits:
        return None
    if bits <= 8 and limits.get("int8_GOP_s"):
        return limits["int8_GOP_s"]
    return limits["gemm_GFLOP_s"]["float32" if bits == 32 else "bfloat16"]


def _limits(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The limits used: the best of the runs (the machine can do at least that), with each run kept."""
    return {"bandwidth_GB_s": max(r["bandwidth"]["GB_s"] for r in runs),
            "gemm_GFLOP_s": {d: max(max(r["gemm"][d]["GFLOP_s"], r.get("fma", {}).get("GFLOP_s", 0)) for r in runs)
                             for d in ("float32", "bfloat16")},
            "fma_GFLOP_s": max((r["fma"]["GFLOP_s"] for r in runs if "fma" in r), default=None),
            "int8_GOP_s": max((r["int8_dot"]["GOP_s"] for r in runs if r.get("int8_dot")), default=None),
            "runs": runs}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """qwen2c against each peer at the same weight bits: its tokens/s over theirs, per measurement."""
    out = []
    ours = [r for r in rows if r["family"] == "qwen2c" and "error" not in r]
    for q in ours:
        for p in rows:
            if p["family"] == "qwen2c" or "error" in p or p["bits"] != q["bits"]:
                continue
            entry: dict[str, Any] = {"qwen2c": q["name"], "peer": p["name"], "prefill": {}, "decode": {}}
            for kind in ("prefill", "decode"):
                for n, v in q[kind].items():
                    w = p[kind].get(n, {})
                    if "tok_s" in v and "tok_s" in w:
                        entry[kind][n] = v["tok_s"] / w["tok_s"]
            if p.get("load_s"):
                entry["load"] = p["load_s"] / q["load_s"]
            if p.get("ttft_ms") and q.get("ttft_ms") and p["ttft_ms"]["prompt_tokens"] == q["ttft_ms"]["prompt_tokens"]:
                entry["ttft"] = p["ttft_ms"]["ms"] / q["ttft_ms"]["ms"]
            out.append(entry)
    return out
