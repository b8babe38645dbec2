"""The tuning database: a folder of measured records, appended to as they are measured.

    DIR/params.jsonl        one line per measured choice of a qwen2c kernel's parameters
    DIR/metaschedule/       TVM's JSON database (MetaSchedule's records for TIR kernels)

A line is written whole and synced before the next measurement starts, so a tuning run that is
killed loses at most the measurement in flight, and a rerun skips every choice already measured.
Lines are read defensively: a damaged, truncated or foreign line is skipped with a warning and
counted, never applied and never a crash. A record applies only to a kernel of the same
structure, shape and target key (``target_key.py``); the best of a key's measurements wins.
Databases merge by concatenating their valid lines (``merge``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from qwen2c.errors import Qwen2cError

log = logging.getLogger("qwen2c.autotune")

PARAMS = "params.jsonl"
METASCHEDULE = "metaschedule"
FORMAT = 1
# A choice replaces the defaults only when it measured this much faster: closer than that is the
# noise of one timing (seen: a 1.00x "best" re-measured at 0.83x the defaults).
MIN_GAIN = 1.03
_FIELDS = {"format": int, "key": str, "kernel": str, "shape": dict, "structure": str, "target": str,
           "params": dict, "seconds": float, "default": bool}


class TuningDbError(Qwen2cError):
    """A tuning database that cannot be used at all (not a folder, unreadable)."""


def check_folder(path: str | Path, option: str = "--tuning-db") -> Path:
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise TuningDbError(f"{option} {path}: {what}. A tuning database is the folder `qwen2c tune --db` writes.")
    return path


def validate(record: Any) -> str | None:
    """Why ``record`` (a parsed line) is not a usable record, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for name, kind in _FIELDS.items():
        value = record.get(name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"field '{name}' is missing or not a {kind.__name__}"
    if record["format"] != FORMAT:
        return f"format {record['format']} (this qwen2c reads format {FORMAT})"
    if not (math.isfinite(record["seconds"]) and record["seconds"] > 0):
        return "field 'seconds' is not a positive time"
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in record["params"].items()):
        return "field 'params' holds something other than integers"
    return None


@dataclass
class Records:
    """The valid records of one or more databases, for one target (``match``: target_key's digest)."""

    match: str
    by_key: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    damaged: int = 0  # lines skipped as unreadable or invalid
    foreign: int = 0  # valid lines for another target or version
    sources: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, folders: Iterable[str | Path], match: str, warn=log.warning) -> "Records":
        records = cls(match)
        for folder in folders:
            folder = Path(folder)
            records.sources.append(str(folder))
            records._read(folder / PARAMS, warn)
        return records

    def _read(self, path: Path, warn) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            raise TuningDbError(f"tuning database {path.parent}: cannot read {path.name} ({e.strerror}).") from None
        for number, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode())
                why = validate(record)
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                why = f"not JSON ({type(e).__name__})"
            if why:
                self.damaged += 1
                warn(f"tuning database {path}: line {number} skipped: {why}")
                continue
            if record["target"] != self.match:
                self.foreign += 1
                continue
            record["seconds"] = float(record["seconds"])
            self.by_key.setdefault(record["key"], []).append(record)

    def measured(self, key: str, structure: str) -> dict[str, dict[str, Any]]:
        """The choices already measured for ``key`` at this structure: canonical params -> record."""
        return {canonical(r["params"]): r for r in self.by_key.get(key, []) if r["structure"] == structure}

    def best(self, key: str, structure: str) -> dict[str, Any] | None:
        """The fastest record of ``key`` made for a kernel of this structure, with ``speedup`` over
        the default parameters when those were measured too."""
        rows = [r for r in self.by_key.get(key, []) if r["structure"] == structure]
        if not rows:
            return None
        best = min(rows, key=lambda r: r["seconds"])
        defaults = [r for r in rows if r["default"]]
        if defaults:
            default = min(defaults, key=lambda r: r["seconds"])
            if best["seconds"] * MIN_GAIN > default["seconds"]:
                best = default  # within the noise of the defaults: keep them
            return {**best, "speedup": round(default["seconds"] / best["seconds"], 3)}
        return dict(best)


def canonical(params: dict[str, int]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def append(folder: Path, record: dict[str, Any]) -> None:
    """One record, written whole and synced: a kill after this returns cannot lose it. A line left
    unterminated by a killed writer is closed first, so this one is not glued onto it."""
    assert validate(record) is None, validate(record)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PARAMS
    line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    with open(path, "ab+") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def merge(out: Path, folders: list[Path], warn=log.warning) -> dict[str, int]:
    """Every valid line of ``folders`` (any target) into ``out``, once each; ``out``'s own lines are
    kept. Written to a temporary file and renamed, so ``out`` is whole or untouched."""
    lines: dict[str, None] = {}
    counts = {"records": 0, "damaged_lines": 0, "duplicates": 0}
    for folder in [out, *folders]:
        path = Path(folder) / PARAMS
        if not path.exists():
            continue
        for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode())
                why = validate(record)
            except (UnicodeDecodeError, ValueError, RecursionError):
                why = "not JSON"
            if why:
                counts["damaged_lines"] += 1
                warn(f"{path}: line {number} skipped: {why}")
                continue
            text = json.dumps(record, sort_keys=True, separators=(",", ":"))
            if text in lines:
                counts["duplicates"] += 1
            lines[text] = None
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (PARAMS + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out / PARAMS)
    counts["records"] = len(lines)
    return counts
