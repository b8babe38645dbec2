"""``qwen2c tune sweep SPEC``: build and benchmark every point of a grid; a table, JSON and a plot.

A point is one combination of the spec's knobs (``sweep_spec.py``). Engines are built once per
build configuration (trials, backend, dtype, quantize) under OUT/engines/ and reused by every point
that differs only in runtime knobs (threads). Each point is timed by the benchmark harness
(``qwen2c/bench``: one worker process per engine, its own thread count) interleaved with the
baseline point's engine in the same run, so its speed is a ratio measured under the same
conditions, whatever else the machine did between points or between an interrupted sweep and its
resumption. The baseline is the first point with trials 0 (else the first point); it is measured
first, alone.

Resuming: every finished point is one JSON line appended (flushed and fsynced) to
OUT/points.jsonl with the spec's fingerprint; a rerun skips the points already there. A spec that
changed is refused (its points would be compared with the old spec's) unless ``--restart``.
Builds publish atomically (``qwen2c.build``'s staging), so a sweep killed mid-build leaves no
half-written engine; a tuning database is used only once its tuning finished (a marker file).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from qwen2c.errors import ConfigError, Qwen2cError, read_json_object

from .sweep_spec import BUILD_KNOBS, SweepSpec, load_spec

log = logging.getLogger(__name__)

POINTS = "points.jsonl"
SPEC_RECORD = "sweep-spec.json"
TUNED_MARKER = "sweep-tuned.json"


class Sweep:
    """One sweep in its output folder: the checked plan, the points done, and how to do the rest."""

    def __init__(self, spec: SweepSpec, out: Path, progress: Callable[[str], None] = log.info):
        self.spec, self.out, self.progress = spec, out, progress
        self.points, self.left_out = plan_points(spec)
        baseline = next((p for p in self.points if p.get("trials", 0) == 0), self.points[0])
        self.baseline = baseline
        self.order = [baseline] + [p for p in self.points if p is not baseline]  # the baseline is timed first
        self.fingerprint = spec.fingerprint()

    # -- what is done --------------------------------------------------------------------------
    def claim(self, restart: bool) -> None:
        """Make OUT this spec's: refuse another spec's points unless ``restart`` (then drop them)."""
        self.out.mkdir(parents=True, exist_ok=True)
        record = self.out / SPEC_RECORD
        if record.exists():
            old = read_json_object(record, ConfigError)
            if old.get("fingerprint") != self.fingerprint and not restart:
                changed = [k for k in ("model", "target", "max_context", "measure", "grid")
                           if old.get("spec", {}).get(k) != self.spec.to_json()[k]]
                raise ConfigError(
                    f"{self.out} holds a sweep of another spec (changed: {', '.join(changed) or 'the spec'}); its "
                    f"{len(self.done())} finished points would be compared with this spec's, which measure other "
                    "things. Give --restart to discard them (engines already built are reused where they match), "
                    "or -o another folder.")
        if restart:
            for name in (POINTS, "results.json", "results.csv", "results.png"):
                (self.out / name).unlink(missing_ok=True)
        _write_atomic(record, json.dumps({"fingerprint": self.fingerprint, "spec": self.spec.to_json(),
                                          "spec_file": str(self.spec.path)}, indent=1) + "\n")

    def records(self) -> dict[str, dict[str, Any]]:
        """The latest record of every point measured (or failed) under this spec, by point key."""
        path = self.out / POINTS
        found: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:  # a line cut short by a kill while it was written: not finished
                    continue
                if isinstance(r, dict) and r.get("fingerprint") == self.fingerprint:
                    found[point_key(r["knobs"])] = r
        return found

    def done(self) -> dict[str, dict[str, Any]]:
        return {k: r for k, r in self.records().items() if not r.get("error")}

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.out / POINTS, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # -- doing it ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from .sweep_report import write_results

        done = self.done()
        todo = [p for p in self.order if point_key(p) not in done]
        if done:
            self.progress(f"resuming: {len(done)} of {len(self.points)} points already measured; {len(todo)} to go")
        for line in self.left_out:
            self.progress(f"left out: {line}")
        for point in todo:
            index = self.points.index(point) + 1
            self.progress(f"point {index}/{len(self.points)}: {describe(point)}")
            record = self._point(point, index)
            self._append(record)
            if record.get("error"):
                self.progress(f"    failed: {record['error']}")
                if point is self.baseline:
                    raise ConfigError(f"the baseline point ({describe(point)}) failed, so no point has anything to "
                                      f"be compared with: {record['error']}")
            else:
                self.progress(f"    decode {_fmt(record['decode_ratio'])}x, prefill {_fmt(record['prefill_ratio'])}x "
                              "the baseline")
            write_results(self, final=False)
        return write_results(self, final=True)

    def _point(self, point: dict[str, Any], index: int) -> dict[str, Any]:
        record: dict[str, Any] = {"fingerprint": self.fingerprint, "point": index, "knobs": point,
                                  "baseline": point is self.baseline}
        started = time.time()
        try:
            engine = self.engine(point)
            reference = None if point is self.baseline else self.engine(self.baseline)
            record.update(engine=str(engine.relative_to(self.out)), **measure_point(
                engine, point.get("threads"), reference, self.baseline.get("threads"), self.spec,
                self.out / "logs" / f"point-{index}", self._indented))
        except Qwen2cError as e:
            record["error"] = str(e)
        record["seconds"] = time.time() - started
        return record

    def engine(self, point: dict[str, Any]) -> Path:
        """The engine of ``point``'s build configuration: already there, or built (tuned first) now."""
        from qwen2c import engine_dir
        from qwen2c.builder import build

        key = self._build_key(point)
        path = self.out / "engines" / key
        try:
            engine_dir.read_manifest(path, verify=False)
            return path
        except Qwen2cError:
            pass
        options: dict[str, Any] = {}
        if point.get("trials"):
            options["tuning_db"] = self.tuning_db(point)
        elif "trials" in point:  # trials 0: every kernel parameter at its default, shipped records not applied
            options["no_tuning"] = True
        self.progress(f"    building {key}")
        build(self.spec.model, self.spec.target, path, dtype=point.get("dtype"), max_context=self.spec.max_context,
              quantize=_scheme(point.get("quantize")), backend=point.get("backend"), force=path.exists(),
              progress=self._indented, **options)
        return path

    def tuning_db(self, point: dict[str, Any]) -> Path:
        """A tuning database of ``point``'s trials for its dtype and quantization: one whose tuning
        finished (its marker is written last), else tuned now. A tuning that was killed left its
        measurements in the database (each appended as it is made), and ``tune`` measures only
        what is missing."""
        from .tuner import tune  # checked importable before any work (plan_points)

        db = self.out / "tuning" / self._build_key(point)
        if (db / TUNED_MARKER).exists():
            return db
        db.mkdir(parents=True, exist_ok=True)
        self.progress(f"    tuning {point['trials']} trials into {db}")
        summary = tune(self.spec.model, self.spec.target, db, point["trials"], dtype=point.get("dtype"),
                       max_context=self.spec.max_context, quantize=_scheme(point.get("quantize")),
                       progress=self._indented)
        _write_atomic(db / TUNED_MARKER, json.dumps(summary, indent=1, default=str) + "\n")
        return db

    def _indented(self, message: str) -> None:
        """A build's or tuning's progress, under the point it serves."""
        self.progress("\n".join(f"        {line}" for line in str(message).splitlines()))

    def _build_key(self, point: dict[str, Any]) -> str:
        knobs = {k: point[k] for k in BUILD_KNOBS if k in point}
        what = {"model": self.spec.model, "target": self.spec.target, "max_context": self.spec.max_context, **knobs}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]
        return "-".join([*(f"{k}{v}" if k == "trials" else str(v) for k, v in knobs.items()), digest])


def measure_point(engine: Path, threads: int | None, reference: Path | None, reference_threads: int | None,
                  spec: SweepSpec, log_dir: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """Time ``engine`` at ``threads`` with the benchmark harness, interleaved with the baseline's
    engine (``reference``, at its own threads) when given; its speeds and their ratios to it."""
    from qwen2c import engine_dir
    from qwen2c.bench.harness import Plan, System, run, summarize
    from qwen2c.bench.prepare import MIB, engine_precision

    def system(name: str, path: Path, t: int | None) -> System:
        manifest = engine_dir.read_manifest(path, verify=False)
        label, bits = engine_precision(manifest)
        size = (path / engine_dir.WEIGHTS).stat().st_size
        return System(name, "qwen2c", label, bits, {"kind": "qwen2c", "path": str(path)}, int(size * 1.2) + 400 * MIB,
                      threads=t)

    threads = threads or len(os.sched_getaffinity(0))
    plan = Plan(threads=threads, prefill=spec.prompt, decode_contexts=spec.decode_context,
                decode_steps=spec.decode_steps, rounds=spec.rounds, limits=False)
    systems = [system("point", engine, threads)]
    if reference is not None:
        systems.append(system("baseline", reference, reference_threads))
    config = engine_dir.read_manifest(engine, verify=False)["model"]["config"]
    measured = run(systems, plan, config["vocab_size"], log_dir, progress)
    rows = {r["name"]: r for r in summarize(systems, measured, config, plan)["systems"]}
    for row in rows.values():
        problems = ([row["error"]] if "error" in row else []) + row.get("errors", [])
        problems += [f"{kind} {n}: {v['skipped']}" for kind in ("prefill", "decode")
                     for n, v in row.get(kind, {}).items() if "skipped" in v]
        if problems:
            raise Qwen2cError(f"{row['name']} engine: {'; '.join(problems)[:600]} (worker logs in {log_dir})")
    ours, base = rows["point"], rows.get("baseline", rows["point"])
    decode, prefill = {}, {}
    for c in map(str, spec.decode_context):
        mine, theirs = ours["decode"][c], base["decode"][c]
        decode[c] = {"ms_per_token": mine["ms_per_token"], "tokens": mine["tokens"],
                     "ratio": mine["tok_s"] / theirs["tok_s"], "baseline_ms_per_token": theirs["ms_per_token"]}
    for n in map(str, spec.prompt):
        mine, theirs = ours["prefill"][n], base["prefill"][n]
        prefill[n] = {"tok_s": mine["tok_s"], "ratio": mine["tok_s"] / theirs["tok_s"], "baseline_tok_s": theirs["tok_s"]}
    return {"threads": threads, "decode": decode, "prefill": prefill,
            "decode_ratio": _geomean([v["ratio"] for v in decode.values()]),
            "prefill_ratio": _geomean([v["ratio"] for v in prefill.values()]),
            "build_s": engine_dir.read_manifest(engine, verify=False).get("build_seconds"),
            "peak_rss_bytes": ours.get("peak_rss_bytes")}


def plan_points(spec: SweepSpec) -> tuple[list[dict[str, Any]], list[str]]:
    """The points to run and the combinations left out (each with the reason), checked before any
    work with the same refusals the build makes (``prepare`` of each backend)."""
    from qwen2c.builder import checkpoint_dtype
    from qwen2c.checkpoint import resolve_model
    from qwen2c.quantization import weight_format
    from qwen2c.targets.backends import BACKENDS
    from qwen2c.targets.registry import TARGETS

    where = spec.path
    try:
        source = resolve_model(spec.model)
    except Qwen2cError as e:
        raise ConfigError(f"{where}: model: {e}") from None
    points, refusals, counts = [], {}, {}
    for point in spec.points():
        build = tuple((k, point[k]) for k in BUILD_KNOBS if k in point)
        if build not in refusals:
            refusals[build] = _refusal(spec, point, source, TARGETS, BACKENDS, weight_format, checkpoint_dtype)
        if refusals[build]:
            counts[build] = counts.get(build, 0) + 1
        else:
            points.append(point)
    # One line per build configuration refused, however many runtime knob values it came with.
    left_out = [f"{describe(dict(build))}" + (f" ({n} points)" if n > 1 else "") + f": {refusals[build]}"
                for build, n in counts.items()]
    if not points:
        raise ConfigError(f"{where}: grid: no combination can be built here: " + "; ".join(left_out[:4]))
    return points, left_out


def _refusal(spec, point, source, targets, backends, weight_format, checkpoint_dtype) -> str | None:
    backend = point.get("backend")
    try:
        target = targets.resolve(spec.target, None, backend)
    except Qwen2cError as e:
        if backend is None:
            raise ConfigError(f"{spec.path}: target: {e}") from None
        return str(e)
    if point.get("trials") and target.backend != "tvm":
        return f"trials {point['trials']}: `qwen2c tune` tunes TVM's kernels; the {target.backend} backend has none"
    lowering = backends.get(target.backend).load()
    if not lowering.runs_here(target):
        raise ConfigError(f"{spec.path}: target: {spec.target} engines ({target.backend}) do not run on this machine; "
                          "a sweep times every point here.")
    dtype = point.get("dtype") or (checkpoint_dtype(source) if target.default_dtype == "checkpoint"
                                   else target.default_dtype)
    try:
        lowering.prepare(target, dtype, {"moe_dispatch": "sparse", "quantize": weight_format(point.get("quantize"))})
    except Qwen2cError as e:
        return str(e)
    return None


def _scheme(quantize: str | None) -> str | None:
    return None if quantize == "none" else quantize


def point_key(knobs: dict[str, Any]) -> str:
    return json.dumps(knobs, sort_keys=True)


def describe(point: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in point.items()) or "the build's defaults"


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


@contextlib.contextmanager
def _lock(out: Path):
    """One sweep per output folder at a time: two would append the same points."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".sweep.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{out}: another sweep is running in this folder; wait for it, or -o another.") from None
        yield


def run_sweep(spec_path: str | Path, out: str | Path, restart: bool = False,
              progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Run (or resume) the sweep of ``spec_path`` in ``out``; return the results (as results.json)."""
    spec = load_spec(spec_path)
    sweep = Sweep(spec, Path(out), progress)
    with _lock(sweep.out):
        sweep.claim(restart)
        return sweep.run()


def add_arguments(p) -> None:
    p.add_argument("spec", metavar="SPEC", help="the sweep's spec file (TOML: model, target, [measure], [grid])")
    p.add_argument("-o", "--output", default=None,
                   help="folder for engines, points.jsonl and results.{csv,json,png} (default: the spec's name "
                        "without .toml, beside it)")
    p.add_argument("--restart", action="store_true",
                   help="discard the points of an earlier sweep in that folder (its engines are reused where "
                        "they match)")


def run_command(args, progress: Callable[[str], None]) -> int:
    from .sweep_report import format_summary

    out = Path(args.output) if args.output else Path(args.spec).with_suffix("")
    sweep = None
    try:
        spec = load_spec(args.spec)
        sweep = Sweep(spec, out, progress)
        with _lock(out):
            sweep.claim(args.restart)
            result = sweep.run()
    except KeyboardInterrupt:
        done = len(sweep.done()) if sweep is not None and (out / POINTS).exists() else 0
        total = len(sweep.points) if sweep is not None else "?"
        print(f"qwen2c tune sweep: interrupted; {done} of {total} points are recorded in {out / POINTS}; "
              f"`qwen2c tune sweep {args.spec} -o {out}` resumes from there.", file=sys.stderr)
        return 130
    print(format_summary(result))
    return 0
