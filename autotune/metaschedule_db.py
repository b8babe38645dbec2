"""A MetaSchedule tuning database folder, read so that a damaged or foreign one never breaks a build.

The folder is TVM's ``JSONDatabase``: ``database_workload.json`` (one line per tuned function,
``[structural hash, IRModule]``) and ``database_tuning_record.json`` (one line per measured
candidate, ``[workload line number, [trace, run seconds, target, argument types]]``), both
appended line by line as MetaSchedule measures. Beside them qwen2c writes ``qwen2c-metaschedule.json``
with the TVM and tvm-ffi versions that tuned: MetaSchedule keys records by workload and target only,
and a trace replayed by another TVM may schedule differently or fail.

TVM's own loader raises on the first unreadable line (a run killed while appending leaves half a
line); here such a line is skipped and counted, and ``repair`` rewrites the files without it (the
damaged originals kept beside them) before tuning appends to them again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
MARKER = "qwen2c-metaschedule.json"


def versions() -> dict[str, str]:
    """The versions a tuning record depends on: the TVM that replays the trace, its FFI (serialization)."""
    import tvm
    import tvm_ffi

    return {"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__}


def target_key(target) -> str:
    """The target as MetaSchedule stores it in each record (canonical JSON of ``tvm.target.Target``)."""
    return str(target)


@dataclass
class Lines:
    """The readable lines of one database folder (JSON values, not yet TVM objects)."""

    workloads: dict[int, Any] = field(default_factory=dict)  # line number -> [shash, module]
    records: list[tuple[int, Any]] = field(default_factory=list)  # (workload line, record)
    damaged: int = 0  # unreadable lines, and records whose workload line is unreadable
    needs_rewrite: bool = False  # damaged, or a last line without its newline


def read_lines(db_dir: Path) -> Lines:
    out = Lines()
    for n, value in enumerate(_json_lines(db_dir / WORKLOADS, out)):
        if value is not None and isinstance(value, list) and len(value) == 2:
            out.workloads[n] = value
        else:
            out.damaged += value is not None  # None was already counted
    for value in _json_lines(db_dir / RECORDS, out):
        if value is None:
            continue
        if (isinstance(value, list) and len(value) == 2 and isinstance(value[0], int)
                and value[0] in out.workloads and isinstance(value[1], list)):
            out.records.append((value[0], value[1]))
        else:
            out.damaged += 1
    if out.damaged:
        out.needs_rewrite = True
    return out


def _json_lines(path: Path, out: Lines):
    """Each non-empty line's JSON value, or None (counted) for a line that is not JSON.

    Line numbers follow TVM's loader, which skips empty lines, so a record's workload index still
    names the right line when a line before it is damaged.
    """
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        out.needs_rewrite = True
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            yield json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            out.damaged += 1
            yield None


def read_marker(db_dir: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((db_dir / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def refusal(db_dir: Path) -> str | None:
    """Why the records of ``db_dir`` must not be applied by this TVM, or None when they may."""
    marker = read_marker(db_dir)
    if marker is None:
        return f"{db_dir}: no readable {MARKER} (not written by `qwen2c tune`), so the TVM version that tuned is unknown"
    mine = versions()
    theirs = marker.get("versions") or {}
    if theirs != mine:
        return (f"{db_dir} was tuned with " + ", ".join(f"{k} {theirs.get(k, '?')}" for k in mine)
                + "; this build uses " + ", ".join(f"{k} {v}" for k, v in mine.items()))
    return None


def write_marker(db_dir: Path, target) -> None:
    """Mark ``db_dir`` as tuned by this TVM; refuse (ConfigError) a folder another TVM tuned into."""
    from qwen2c.errors import ConfigError

    has_records = (db_dir / RECORDS).exists() and (db_dir / RECORDS).stat().st_size > 0
    reason = refusal(db_dir) if (db_dir / MARKER).exists() or has_records else None
    if reason:
        raise ConfigError(f"{reason}: tuning more into it would mix records of two TVMs; tune into another folder.")
    marker = read_marker(db_dir) or {"versions": versions(), "targets": []}
    if target_key(target) not in marker["targets"]:
        marker["targets"].append(target_key(target))
    _write_atomically(db_dir / MARKER, (json.dumps(marker, indent=2) + "\n").encode())


def record_default(db_dir: Path, target, workload: str, us: float | None) -> None:
    """Note the default schedule's time of ``workload`` on ``target`` (what a record must beat)."""
    marker = read_marker(db_dir) or {"versions": versions(), "targets": []}
    defaults = marker.setdefault("default_us", {}).setdefault(target_key(target), {})
    if us is None:
        defaults.pop(workload, None)
    else:
        defaults[workload] = us
    _write_atomically(db_dir / MARKER, (json.dumps(marker, indent=2) + "\n").encode())


def mark_exhausted(db_dir: Path, target, workload: str) -> None:
    """Note that MetaSchedule found no new candidate for ``workload`` before its budget ran out."""
    marker = read_marker(db_dir) or {"versions": versions(), "targets": []}
    done = marker.setdefault("exhausted", {}).setdefault(target_key(target), [])
    if workload not in done:
        done.append(workload)
        _write_atomically(db_dir / MARKER, (json.dumps(marker, indent=2) + "\n").encode())


def exhausted(db_dir: Path, target) -> set[str]:
    return set(((read_marker(db_dir) or {}).get("exhausted") or {}).get(target_key(target)) or [])


def repair(db_dir: Path) -> int:
    """Rewrite the two files without their unreadable lines; returns how many were dropped.

    The originals are kept as ``<name>.damaged`` (never lost). Workload lines are renumbered, and
    records follow their workload, so every readable record keeps its function.
    """
    lines = read_lines(db_dir)
    if not lines.needs_rewrite:
        return 0
    renumber = {old: new for new, old in enumerate(sorted(lines.workloads))}
    workloads = b"".join(json.dumps(lines.workloads[old]).encode() + b"\n" for old in sorted(lines.workloads))
    records = b"".join(json.dumps([renumber[w], r]).encode() + b"\n" for w, r in lines.records)
    for name, data in ((WORKLOADS, workloads), (RECORDS, records)):
        path = db_dir / name
        if path.exists():
            os.replace(path, path.with_name(name + ".damaged"))
        _write_atomically(path, data)
    if lines.damaged:
        log.warning("%s: %d unreadable line(s) dropped (originals kept as *.damaged)", db_dir, lines.damaged)
    return lines.damaged


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class Loaded:
    """The records of some database folders that may be applied to one target by this TVM."""

    database: Any  # tvm.s_tir.meta_schedule.database.MemoryDatabase
    records: int = 0
    damaged: int = 0  # lines skipped: unreadable, or not a record TVM can parse
    other_target: int = 0  # records measured on another target, not applied
    default_us: dict[str, float] = field(default_factory=dict)  # workload hash -> its default schedule's time
    refused: list[str] = field(default_factory=list)  # folders not applied at all, and why


def load(db_dirs: list[Path], target) -> Loaded:
    """The applicable records of ``db_dirs`` in one in-memory database (the files are only read).

    A folder tuned by another TVM is refused whole; a record for another target is left out; an
    unreadable line is skipped. Each is logged as a warning and counted, never raised.
    """
    from tvm.s_tir.meta_schedule.database import MemoryDatabase, TuningRecord, Workload

    out = Loaded(MemoryDatabase(module_equality="structural"))
    key = target_key(target)
    for db_dir in map(Path, db_dirs):
        reason = refusal(db_dir)
        if reason:
            log.warning("MetaSchedule records not applied: %s", reason)
            out.refused.append(reason)
            continue
        for workload, us in ((read_marker(db_dir) or {}).get("default_us", {}).get(key) or {}).items():
            if isinstance(us, (int, float)):  # the fastest default known: a record must beat every one
                out.default_us[workload] = min(us, out.default_us.get(workload, us))
        lines = read_lines(db_dir)
        out.damaged += lines.damaged
        committed: dict[int, Any] = {}
        unparsable = 0
        for w, record in lines.records:
            try:
                if record_target(record) != key:
                    out.other_target += 1
                    continue
                if w not in committed:
                    committed[w] = out.database.commit_workload(Workload.from_json(lines.workloads[w]).mod)
                out.database.commit_tuning_record(TuningRecord.from_json(record, committed[w]))
                out.records += 1
            except Exception as e:  # noqa: BLE001  (TVM raises its own error types for a malformed value)
                unparsable += 1
                log.debug("%s: unparsable tuning record skipped: %s", db_dir, str(e).splitlines()[0][:200])
        out.damaged += unparsable
        if lines.damaged or unparsable:
            log.warning("%s: %d damaged line(s) skipped", db_dir, lines.damaged + unparsable)
    if out.other_target:
        log.warning("%d tuning record(s) for another target than %s not applied", out.other_target, key)
    return out


def record_target(record: list) -> str:
    import tvm

    return target_key(tvm.target.Target(record[2]))


def merge(out_dir: Path, db_dirs: list[Path]) -> str:
    """``out_dir`` (kept if it holds records) plus ``db_dirs`` in one database; returns a one-line summary.

    Workloads are matched by structural hash and records deduplicated; damaged lines are skipped
    and folders tuned by another TVM left out, each counted. The files are replaced atomically.
    """
    out_dir = Path(out_dir)
    sources = ([out_dir] if (out_dir / WORKLOADS).exists() else []) + [Path(d) for d in db_dirs]
    workloads: dict[str, Any] = {}  # structural hash -> workload line
    records: dict[str, tuple[str, Any]] = {}  # the record's JSON -> (hash, record)
    targets: list[str] = []
    defaults: dict[str, dict[str, float]] = {}
    dry: dict[str, list[str]] = {}  # target -> workloads whose search ran dry
    damaged = duplicates = 0
    refused = []
    for db_dir in sources:
        reason = refusal(db_dir)
        if reason:
            log.warning("not merged: %s", reason)
            refused.append(reason)
            continue
        lines = read_lines(db_dir)
        damaged += lines.damaged
        marker = read_marker(db_dir) or {}
        targets += [t for t in marker.get("targets", []) if t not in targets]
        for target, ran_dry in (marker.get("exhausted") or {}).items():
            dry.setdefault(target, [])
            dry[target] += [w for w in ran_dry if w not in dry[target]]
        for target, times in (marker.get("default_us") or {}).items():
            for workload, us in times.items():
                known = defaults.setdefault(target, {}).get(workload, us)
                defaults[target][workload] = min(known, us)
        for w, record in lines.records:
            shash = str(lines.workloads[w][0])
            workloads.setdefault(shash, lines.workloads[w])
            text = json.dumps([shash, record], sort_keys=True)
            if text in records:
                duplicates += 1
            records[text] = (shash, record)
    out_dir.mkdir(parents=True, exist_ok=True)
    order = {shash: n for n, shash in enumerate(workloads)}
    _write_atomically(out_dir / WORKLOADS, b"".join(json.dumps(w).encode() + b"\n" for w in workloads.values()))
    _write_atomically(out_dir / RECORDS, b"".join(json.dumps([order[s], r]).encode() + b"\n"
                                                  for s, r in records.values()))
    _write_atomically(out_dir / MARKER, (json.dumps({"versions": versions(), "targets": targets,
                                                                "default_us": defaults, "exhausted": dry}, indent=2)
                                         + "\n").encode())
    return (f"{len(records)} records of {len(workloads)} functions ({duplicates} duplicates dropped, "
            f"{damaged} damaged lines skipped, {len(refused)} folders refused)")
