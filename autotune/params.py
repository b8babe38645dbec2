"""The one home of the project's kernel parameters: tile sizes, blocks, unrolling, parallel grain.

Every kernel qwen2c writes itself asks ``kernel(name, shape, defaults, make)`` for its PrimFunc
instead of reading module constants. ``defaults`` are the values the kernel was hand-tuned with
(the constants that used to live in ``schedules/``); a record of the tuning database in force
(``context.current()``) for the same kernel, shape and target replaces them. ``SPACES`` says which
values each parameter may take and whether the tuner can time the kernel on its own
(``measurable``: its inputs are plain tensors made from the shape; kernels reading index tensors
or a KV cache take their defaults or a record written for them). TVM's own TIR kernels (the
legalized elementwise and reduction functions) are not here: MetaSchedule tunes those, into its
own database (``metaschedule.py``).

A shape is a small JSON object: static extents as ints, the prompt's symbolic row count as
``"m"`` (one kernel serves every prompt length; the tuner times it at the engine's prefill
buckets).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from typing import Any, Callable

from .context import current


@dataclasses.dataclass(frozen=True)
class Space:
    knobs: dict[str, tuple[int, ...]]  # each parameter's candidate values
    measurable: bool = False  # the tuner can time it alone, on random inputs of its shape
    # Whether a choice is legal for a shape (divisibility, register budget); illegal ones are never built.
    valid: Callable[[dict[str, Any], dict[str, int]], bool] = lambda shape, params: True

    def candidates(self, shape: dict[str, Any], defaults: dict[str, int]) -> list[dict[str, int]]:
        """Every legal choice for ``shape``, the defaults first; knobs the defaults fix (a decode
        kernel's one row) are not varied."""
        names = list(self.knobs)
        values = [self.knobs[n] if _varies(n, shape) else (defaults[n],) for n in names]
        out = [dict(defaults)]
        for combo in itertools.product(*values):
            choice = {**defaults, **dict(zip(names, combo))}
            if choice not in out and self.valid(shape, choice):
                out.append(choice)
        return out


def _varies(knob: str, shape: dict[str, Any]) -> bool:
    # A one-row (decode) kernel has one row tile: more rows would compute clamped copies of it.
    return not (knob == "tile_rows" and shape.get("rows") == 1)


def _matmul_valid(shape: dict[str, Any], p: dict[str, int]) -> bool:
    # TI x TJ vector accumulators (plus a weight vector per column) must fit 32 registers: beyond,
    # LLVM spills them to the stack in the inner loop.
    return shape["n"] % p["tile_cols"] == 0 and p["tile_rows"] * p["tile_cols"] + p["tile_cols"] <= 32


SPACES: dict[str, Space] = {
    # schedules/cpu_matmul.py: a linear layer, y = x @ W^T.
    "nt_matmul": Space({"tile_rows": (1, 2, 3, 4, 6, 8), "tile_cols": (1, 2, 4, 8)}, measurable=True,
                       valid=_matmul_valid),
    # schedules/cpu_packed_matmul.py: a prompt's linear layer over a packed weight panel (outer products).
    "packed_matmul": Space({"rows": (2, 4, 6, 8, 12), "col_vectors": (1, 2, 4)}, measurable=True,
                           valid=lambda shape, p: shape["n"] % (p["col_vectors"] * shape["vector"]) == 0
                           and p["rows"] * p["col_vectors"] + p["col_vectors"] + 1 <= (32 if shape["vector"] >= 16 else 16)),
    # schedules/cpu_qmatmul.py: the same over int8/int4 weights dequantized in registers.
    "q_matmul": Space({"tile_rows": (1, 2, 3, 4, 6), "tile_cols": (1, 2, 4, 8), "unroll": (1, 2, 4, 8, 16)},
                      measurable=True, valid=_matmul_valid),
    # schedules/cpu_vnni_gemv.py: the decode step's quantized layers with VNNI (outputs per tile).
    "q_gemv_vnni": Space({"tile_cols": (1, 2, 4, 8)}, measurable=True,
                         valid=lambda shape, p: shape["n"] % p["tile_cols"] == 0),
    # schedules/cpu_vnni_gemm.py: the prompt's quantized layers with VNNI (rows per tile, panel vectors):
    # integer and float accumulators for every row and vector, the weight vectors and a broadcast in 32 zmm.
    "q_gemm_vnni": Space({"rows": (2, 3, 4, 6), "col_vectors": (1, 2)}, measurable=True,
                         valid=lambda shape, p: shape["n"] % (16 * p["col_vectors"]) == 0
                         and 2 * p["rows"] * p["col_vectors"] + p["col_vectors"] + 1 <= 32),
    # schedules/cpu_moe.py: the experts' grouped matmuls (index tensors: timed through the engine).
    "moe_grouped": Space({"tile_rows": (1, 2, 4), "col_block": (4, 8, 16, 32)}),
    # schedules/cpu_decode_attention.py: most key ranges a sequence's decode attention is cut into.
    "decode_attention": Space({"splits": (4, 8, 16, 32)}),
    # schedules/gpu_norm.py: threads per row of the GPU RMSNorm (a power of two: a tree reduction).
    "gpu_rms_norm": Space({"threads": (64, 128, 256, 512, 1024)}),
    # schedules/gpu_moe.py: warps (output columns) per block and rows per pass of the grouped matmuls.
    "gpu_moe_grouped": Space({"cols": (1, 2, 4, 8, 16), "rows": (1, 2, 4, 8)}),
}


@dataclasses.dataclass
class Task:
    """One kernel instance of an engine, as ``tune`` finds it: everything needed to rebuild it with
    other parameters and to look its records up."""

    kernel: str
    shape: dict[str, Any]
    defaults: dict[str, int]
    make: Callable[..., Any]  # make(**params) -> PrimFunc

    @property
    def key(self) -> str:
        return shape_key(self.kernel, self.shape)

    def structure(self) -> str:
        return structure_of(self.make(**self.defaults))

    def title(self) -> str:
        return f"{self.kernel} " + " ".join(f"{k}={v}" for k, v in self.shape.items())


def shape_key(kernel: str, shape: dict[str, Any]) -> str:
    return kernel + ":" + json.dumps(shape, sort_keys=True, separators=(",", ":"))


def structure_of(func) -> str:
    """The kernel's structure at its default parameters: a record made for other code (the kernel
    was rewritten since) has another and is never applied."""
    return hashlib.sha256(func.script(show_meta=False).encode()).hexdigest()[:16]


def kernel(name: str, shape: dict[str, Any], defaults: dict[str, int], make: Callable[..., Any]):
    """The PrimFunc of kernel ``name`` for ``shape``: ``make(**params)`` with the tuned parameters
    when a record applies, else ``defaults``. What was chosen is noted for the manifest."""
    space = SPACES[name]
    unknown = set(defaults) - set(space.knobs)
    assert not unknown, f"{name}: parameters {unknown} are not in its space"
    ctx = current()
    if ctx is None:
        return make(**defaults)
    task = Task(name, _plain(shape), dict(defaults), make)
    shape = task.shape
    if ctx.tasks is not None and space.measurable and all(t.key != task.key for t in ctx.tasks):
        ctx.tasks.append(task)
    params, source, speedup = dict(defaults), "default", None
    if ctx.records is not None and task.key in ctx.records.by_key:  # the structure (a script hash) only then
        record = ctx.records.best(task.key, task.structure())
        if record is not None and _legal(space, shape, defaults, record):
            params, source = {**defaults, **record["params"]}, "tuned"
            speedup = record.get("speedup")
    if all(u.get("key") != task.key for u in ctx.used):
        ctx.used.append({"key": task.key, "kernel": name, "shape": dict(shape), "params": params, "source": source,
                         "tuner": "qwen2c", **({"speedup": speedup} if speedup else {})})
    return make(**params)


def _plain(value):
    """``value`` with TVM's ints and dtypes as JSON's (a shape is a record's key)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "value"):  # tirx.IntImm
        return int(value.value)
    return str(value)  # a dtype


def _legal(space: Space, shape: dict[str, Any], defaults: dict[str, int], record: dict[str, Any]) -> bool:
    """A record's choice is one the space allows for this shape (a hand-edited or stale line that
    asks for something else is ignored, not built)."""
    params = record.get("params")
    if not isinstance(params, dict) or set(params) - set(space.knobs):
        return False
    if not all(isinstance(v, int) and v in space.knobs[k] for k, v in params.items()):
        return False
    return space.valid(shape, {**defaults, **params})

