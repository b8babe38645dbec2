"""What ``build`` applies: the tuning databases it is given, or the records qwen2c ships.

``--tuning-db DIR`` (repeatable) names the databases; without it, the records shipped in
``autotune/records/`` (tuned for the presets on the CPUs they were measured on) apply wherever the
target key matches; ``--no-tuning`` builds with every default. Either way the manifest's ``tuning``
section lists each kernel, with its parameters and whether they came from a record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from . import database
from .context import TuningContext
from .target_key import target_key

SHIPPED = Path(__file__).parent / "records"


def context_for(spec, tuning_db: str | Path | Sequence[str | Path] | None, progress: Callable[[str], None],
                disabled: bool = False) -> TuningContext:
    """The tuning context of one build: every folder checked before any slow step."""
    key = target_key(spec)
    if disabled:
        return TuningContext(key, records=None)
    if tuning_db is None:
        folders, shipped = ([SHIPPED] if (SHIPPED / database.PARAMS).exists() else []), True
    else:
        raw = [tuning_db] if isinstance(tuning_db, (str, Path)) else list(tuning_db)
        folders, shipped = [database.check_folder(f) for f in raw], False
    records = database.Records.load(folders, key["match"], warn=lambda m: progress("warning: " + m))
    if records.damaged:
        progress(f"warning: {records.damaged} damaged line(s) in the tuning database were skipped")
    ms_dirs = [Path(f) / database.METASCHEDULE for f in folders if (Path(f) / database.METASCHEDULE).is_dir()]
    return TuningContext(key, records=records, metaschedule_dirs=ms_dirs, shipped=shipped)


def manifest_section(context: TuningContext) -> dict[str, Any]:
    """The manifest's account of the tuning: the databases, and each kernel's parameters and source."""
    records = context.records
    used = [{k: v for k, v in u.items() if k != "key"} for u in context.used]
    tuned = sum(u["source"] == "tuned" for u in used)
    return {
        "target_key": context.target_key["match"],
        "databases": records.sources if records is not None else [],
        "shipped_records": context.shipped and records is not None and bool(records.sources),
        "damaged_lines": records.damaged if records is not None else 0,
        "records_for_other_targets": records.foreign if records is not None else 0,
        "kernels_tuned": tuned,
        "kernels_default": len(used) - tuned,
        "kernels": used,
    }
