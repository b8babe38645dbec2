"""A sweep's spec file (TOML): what to build and measure, checked whole before any work starts.

```toml
model = "qwen2-0.5b"      # preset name, or a checkpoint folder (relative to this file)
target = "llvm"
max_context = 512         # optional: the engines' context (default: the build's)
[measure]                 # what the benchmark harness (qwen2c/bench) times at every point
prompt = [128]            # prefill lengths
decode_context = [16]     # decode after this many tokens
decode_steps = 16
rounds = 3
[grid]                    # every combination is one point
trials = [0, 16]          # 0: every kernel parameter at its default (build's no_tuning); N: `qwen2c tune`
                          # N trials into OUT/tuning/, then build with that database. Left out: the build's
                          # default (the records qwen2c ships, where they match)
threads = [1, 2]
dtype = ["float32", "bfloat16"]
quantize = ["none", "int8"]
backend = ["tvm"]
page_size = [16]
```

Every problem is one ``ConfigError`` naming the file and the field. The points are the grid's
product in a fixed knob order (``KNOBS``), threads last, so consecutive points share an engine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import tomllib
from pathlib import Path
from typing import Any

from qwen2c.errors import ConfigError

# Knobs in the order the grid is walked: those that need another engine first, runtime ones last.
KNOBS = ("trials", "backend", "dtype", "quantize", "page_size", "threads")
BUILD_KNOBS = ("trials", "backend", "dtype", "quantize")
# The TVM engine's KV cache pages hold 16 tokens: targets/tvm/runtime.py creates the cache with
# PAGE_SIZE and schedules/cpu_attention.py compiles its kernels for CACHE_PAGE_SIZE, neither of
# them a build option or recorded in the manifest. A sweep over other sizes would measure nothing.
PAGE_SIZES = (16,)
MEASURE_DEFAULTS = {"prompt": (128,), "decode_context": (16,), "decode_steps": 16, "rounds": 3}
TOP_KEYS = ("model", "target", "max_context", "measure", "grid")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    path: Path
    model: str  # as the build takes it: a preset name or an absolute checkpoint folder
    target: str
    max_context: int | None
    prompt: tuple[int, ...]
    decode_context: tuple[int, ...]
    decode_steps: int
    rounds: int
    grid: dict[str, tuple]  # knob -> values, only the knobs the spec varies, in KNOBS order

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values, as {knob: value}, in the order they are run."""
        names = list(self.grid)
        return [dict(zip(names, values)) for values in itertools.product(*(self.grid[n] for n in names))]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "target": self.target, "max_context": self.max_context,
                "measure": {"prompt": list(self.prompt), "decode_context": list(self.decode_context),
                            "decode_steps": self.decode_steps, "rounds": self.rounds},
                "grid": {k: list(v) for k, v in self.grid.items()}}

    def fingerprint(self) -> str:
        """Identifies what the points measure: two specs with the same fingerprint compare like things."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a spec file; ``ConfigError`` naming the field at fault."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such spec file.") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; give the sweep's spec file (TOML).") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}).") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; give the sweep's spec file (TOML).") from None
    return parse_spec(data, path)


def parse_spec(data: dict[str, Any], path: Path) -> SweepSpec:
    def fail(field: str, message: str):
        raise ConfigError(f"{path}: {field}: {message}")

    _unknown(data, TOP_KEYS, "", fail)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        fail("model", "required: a preset name (e.g. qwen2-0.5b) or a checkpoint folder.")
    local = path.parent / model
    if local.is_dir():  # a checkpoint folder next to the spec
        model = str(local.resolve())
    target = data.get("target", "llvm")
    if not isinstance(target, str) or not target:
        fail("target", f"expected a target name such as \"llvm\", got {target!r}.")
    max_context = data.get("max_context")
    if max_context is not None:
        _positive_int(max_context, "max_context", fail)

    measure = data.get("measure", {})
    if not isinstance(measure, dict):
        fail("measure", "expected a table ([measure]).")
    _unknown(measure, tuple(MEASURE_DEFAULTS), "measure.", fail)
    values = {**MEASURE_DEFAULTS, **measure}
    prompt = _int_list(values["prompt"], "measure.prompt", fail, minimum=1)
    decode_context = _int_list(values["decode_context"], "measure.decode_context", fail, minimum=1)
    decode_steps = _positive_int(values["decode_steps"], "measure.decode_steps", fail)
    rounds = _positive_int(values["rounds"], "measure.rounds", fail)
    if max_context is not None:
        if max(prompt) > max_context:
            fail("measure.prompt", f"{max(prompt)} tokens is longer than max_context {max_context}.")
        if max(decode_context) + decode_steps > max_context:
            fail("measure.decode_context", f"{max(decode_context)} + decode_steps {decode_steps} tokens is longer "
                                           f"than max_context {max_context}.")

    grid = data.get("grid")
    if not isinstance(grid, dict) or not grid:
        fail("grid", f"required: a table ([grid]) of knobs, each a list of values; knobs: {', '.join(KNOBS)}.")
    _unknown(grid, KNOBS, "grid.", fail)
    checked = {k: _knob(k, grid[k], fail) for k in KNOBS if k in grid}
    return SweepSpec(path, model, target, max_context, prompt, decode_context, decode_steps, rounds, checked)


def _unknown(table: dict, known: tuple[str, ...], prefix: str, fail) -> None:
    for key in table:
        if key not in known:
            fail(f"{prefix}{key}", f"unknown key; known: {', '.join(known)}.")


def _positive_int(value, field: str, fail) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(field, f"expected an integer, got {value!r}.")
    if value < 1:
        fail(field, f"{value}: must be at least 1.")
    return value


def _int_list(value, field: str, fail, minimum: int) -> tuple[int, ...]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        fail(field, "empty list; give at least one value.")
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int):
            fail(field, f"expected integers, got {v!r}.")
        if v < minimum:
            fail(field, f"{v}: must be at least {minimum}.")
    return tuple(items)


def _knob(name: str, value, fail) -> tuple:
    field = f"grid.{name}"
    if not isinstance(value, list):
        fail(field, f"expected a list of values, e.g. {name} = [{_example(name)}]; got {value!r}.")
    if not value:
        fail(field, "empty list; give at least one value (or leave the knob out for the build's default).")
    if len(set(map(repr, value))) != len(value):
        fail(field, f"{value}: a value is listed twice.")
    if name in ("trials", "threads", "page_size"):
        values = _int_list(value, field, fail, minimum=0 if name == "trials" else 1)
        cpus = len(os.sched_getaffinity(0))
        if name == "threads" and max(values) > cpus:
            fail(field, f"{max(values)}: more threads than the {cpus} CPUs this process may use; a benchmark "
                        "there would time the threads waiting for each other.")
        if name == "page_size" and set(values) - set(PAGE_SIZES):
            fail(field, f"{sorted(set(values) - set(PAGE_SIZES))}: qwen2c's engines use KV-cache pages of "
                        f"{PAGE_SIZES[0]} tokens only; the CPU attention kernels are compiled for that size and "
                        "the runtime creates the cache with it, so it is not a build option to sweep.")
        return values
    choices = _choices(name)
    for v in value:
        if not isinstance(v, str):
            fail(field, f"expected names, got {v!r}; choose from {', '.join(choices)}.")
        if v not in choices:
            fail(field, f"unknown {name} {v!r}; choose from {', '.join(choices)}.")
    return tuple(value)


def _choices(name: str) -> tuple[str, ...]:
    if name == "dtype":
        from qwen2c.builder import SUPPORTED_DTYPES

        return SUPPORTED_DTYPES
    if name == "quantize":
        from qwen2c.quantization import SCHEMES

        return SCHEMES
    from qwen2c.targets.backends import BACKENDS

    return tuple(BACKENDS.names())


def _example(name: str) -> str:
    return {"trials": "0, 64", "threads": "1, 2", "page_size": "16", "dtype": '"float32"', "quantize": '"none"',
            "backend": '"tvm"'}[name]
