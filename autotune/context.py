"""The tuning in force while one engine is lowered: which records apply, what each kernel got.

The pipelines read it (``current()``) rather than taking it as an argument, so a kernel maker deep
in a pass asks ``params.lookup`` for its parameters without every pass in between passing a
database along. ``build`` enters a context with the databases it applies; ``tune`` enters one that
also collects the kernels it meets (``tasks``), which is how an engine's tunable kernels are found:
by lowering the engine once, exactly as the build does.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


@dataclass
class TuningContext:
    target_key: dict[str, Any]  # autotune/target_key.py: the target, its features, the versions
    records: Any = None  # autotune/database.Records: the parameter records that may apply (None: defaults)
    metaschedule_dirs: list[Path] = field(default_factory=list)  # TVM tuning databases applied to TIR kernels
    shipped: bool = False  # the records are the ones qwen2c ships (no --tuning-db given)
    # What each kernel got, for the manifest: {"kernel", "shape", "params", "source": "tuned" | "default"}.
    used: list[dict[str, Any]] = field(default_factory=list)
    # Set by ``tune``: every tunable kernel met while lowering, to be measured (autotune/tasks.py).
    tasks: list[Any] | None = None


_CURRENT: contextvars.ContextVar[TuningContext | None] = contextvars.ContextVar("qwen2c_tuning", default=None)


def current() -> TuningContext | None:
    return _CURRENT.get()


@contextlib.contextmanager
def using(context: TuningContext | None) -> Iterator[TuningContext | None]:
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)
