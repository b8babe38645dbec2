"""``qwen2c tune``: find an engine's tunable kernels, measure choices of their parameters, record them.

    find      lower the engine exactly as ``build`` does, inside a tuning context that collects every
              kernel asking ``params.kernel`` for its parameters (``params.py``)
    search    per kernel, its legal choices (the defaults first, then a seeded shuffle), each compiled
              alone, run on random inputs of its shape, checked against the defaults' output, and
              timed: decode kernels at their static shape, prefill kernels at each of the engine's
              prefill buckets (one kernel serves every prompt length, so a choice is scored by its
              time per row summed over the buckets)
    record    each measurement appended to the database as it is made (``database.py``): a killed
              run keeps them, and a rerun measures only what is missing
    tir       then TVM's own TIR kernels through MetaSchedule, into the database's ``metaschedule/``

``--trials N`` is the most choices measured per kernel, the defaults included.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import database
from .context import TuningContext, using
from .params import SPACES, Task
from .target_key import target_key

# Prompt lengths a prefill kernel is timed at (clipped to the engine's prefill chunk and context).
PREFILL_BUCKETS = (32, 128, 512)
MIN_REPEAT_SECONDS = 0.02  # a timed repeat runs the kernel at least this long (a decode matmul takes ~50 µs)
REPEATS = 5
# A decode step finds its weights in memory, not in cache (the model's weights are read once per step,
# far more than the last-level cache holds): decode kernels are timed one call at a time over copies of
# their inputs (all but the activations) that together hold twice the last-level cache, each call on the
# next copy, as a decode step streams one layer after another. Timed hot, a 1 MB weight stays in L3 and
# the tile choice that wins there lost 2x in the engine (int4 vocabulary projection, VNNI). Flushing the
# one copy before each call (TVM's cache_flush_cpu_non_first_arg) was not cold enough either: it picked
# 4 output rows per tile for int4 4864x896, 1.35x slower than 1 when streamed (and the decode step 4-13%
# slower, engines paired in one process), likely because a flush leaves the page translations cached.
COLD_REPEATS = 15  # timed calls at least (a rotation over fewer copies goes round again)
COLD_DEFAULT_CACHE = 512 << 20  # bytes assumed for the last-level cache where sysfs does not say


@dataclass
class Found:
    """What lowering the engine found: its tunable kernels, the module before TIR scheduling (for
    MetaSchedule) and the prefill buckets its KV cache declares."""

    tasks: list[Task]
    buckets: tuple[int, ...]
    spec: Any
    scheduled_module: Any = None


def find_tasks(model: str, target: str = "llvm", dtype: str | None = None, max_context: int | None = None,
               quantize: str | None = None, group_size: int | None = None,
               progress: Callable[[str], None] = print) -> Found:
    """Lower ``model`` for ``target`` as ``build`` would (no code generated) and collect its kernels."""
    import tvm

    from qwen2c import args
    from qwen2c.builder import SUPPORTED_DTYPES
    import torch

    from qwen2c.checkpoint import checkpoint_dtype, meta_model, resolve_model
    from qwen2c.errors import ConfigError
    from qwen2c.graphs.export import export_model
    from qwen2c.graphs.pipeline import run_passes
    from qwen2c.model_config import context_limit
    from qwen2c.quantization import weight_format, weight_formats
    from qwen2c.targets.registry import TARGETS
    from qwen2c.targets.tvm.pipelines import pipeline_for, run_pipeline
    from qwen2c.targets.tvm.pipelines.add_kv_cache_creation import kv_cache_geometry, prefill_chunk_limit
    from qwen2c.targets.tvm.relax_module import build_relax_module

    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: qwen2c builds {', '.join(SUPPORTED_DTYPES)} engines.")
    fmt = weight_format(quantize, group_size)
    spec = TARGETS.resolve(target)
    if spec.backend != "tvm":
        raise ConfigError(f"--target {target}: tuning is for TVM-built targets; {spec.name} is built by {spec.backend}.")
    source = resolve_model(model)
    if dtype is None:
        dtype = checkpoint_dtype(source) if spec.default_dtype == "checkpoint" else spec.default_dtype
    max_context = args.max_context(max_context, context_limit(source.config))
    progress(f"finding the tunable kernels of {source.name} ({dtype}) for {spec.name}")
    # Only shapes matter here: traced on meta tensors (no weights loaded), as `inspect` does, so any
    # size tunes on a machine that could not hold its weights. The build checks the passes numerically.
    config, reference = meta_model(source)
    reference = _real_buffers(reference.to(getattr(torch, dtype)), config)
    program = export_model(reference, max_context)
    run_passes(program, config, dtype, check_lengths=())
    formats = weight_formats(program, fmt) if fmt else None
    module = build_relax_module(program, config, dtype, "sparse", formats)
    chunk = prefill_chunk_limit(kv_cache_geometry(module))
    context = TuningContext(target_key(spec), tasks=[])
    with using(context), spec.tvm_target(), tvm.transform.PassContext():
        scheduled = run_pipeline(pipeline_for(spec), module)
    limit = min(chunk or max_context, max_context)  # the longest prompt one prefill call takes
    buckets = tuple(sorted({min(b, limit) for b in PREFILL_BUCKETS}))
    return Found(context.tasks, buckets, spec, scheduled)


def _real_buffers(model, config):
    """``model`` (weights on the meta device) with real buffers: the rotary embedding's inv_freq is
    computed from the config when the module is built, and the lowering bakes it into the RoPE
    kernels, so those modules are built again on the CPU."""
    for name, module in list(model.named_modules()):
        if name and any(b.is_meta for b in module.buffers(recurse=False)):
            parent_name, _, attr = name.rpartition(".")
            rebuilt = type(module)(config=config)
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, rebuilt)
    return model


def tune(model: str, target: str = "llvm", db: str | Path = "tuning-db", trials: int = 16, *,
         dtype: str | None = None, max_context: int | None = None, quantize: str | None = None,
         group_size: int | None = None, progress: Callable[[str], None] = print, rpc=None, seed: int = 0,
         tir_trials: int | None = None) -> dict[str, Any]:
    """Tune ``model``'s kernels for ``target`` into the database folder ``db``; a summary per kernel.

    ``rpc``: an ``rpc.Remote`` that times candidates on another machine (``--rpc-tracker``).
    ``tir_trials``: MetaSchedule's budget for TVM's TIR kernels (None: ``trials`` per kernel; 0: skip).
    """
    from qwen2c import args

    from qwen2c.targets.registry import TARGETS

    trials = args.count("--trials", trials)
    db = Path(db)
    spec = TARGETS.resolve(target)
    if rpc is None and not _runs_here(spec):  # before any slow step
        from qwen2c.errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"--target {spec.name}: its code does not run on this machine, so candidates cannot be timed here; "
            "measure them on one where it does with --rpc-tracker HOST:PORT --rpc-key KEY.")
    found = find_tasks(model, target, dtype, max_context, quantize, group_size, progress)
    key = target_key(found.spec)
    db.mkdir(parents=True, exist_ok=True)
    records = database.Records.load([db], key["match"], warn=lambda m: progress("warning: " + m))
    measurer = _Measurer(found.spec, rpc)
    summary = []
    started = time.monotonic()
    own = own_tasks(found)  # the rest are TVM's TIR functions, for MetaSchedule below
    for index, task in enumerate(own, 1):
        summary.append(_tune_task(task, index, len(own), found, key, records, db, trials, measurer, seed,
                                  progress, started))
    tir = None
    if tir_trials != 0:
        tir = _tune_tir(found, db, trials if tir_trials is None else tir_trials, rpc, progress)
    return {"db": str(db), "target": key, "kernels": summary, "buckets": list(found.buckets), "metaschedule": tir,
            "damaged_lines": records.damaged}


def own_tasks(found: Found) -> list[Task]:
    """qwen2c's own kernels among what lowering collected (``Task``; MetaSchedule's are ``TirTask``)."""
    return [t for t in found.tasks if isinstance(t, Task)]


def _runs_here(spec) -> bool:
    from qwen2c.targets.registry import runs_on_this_host

    return runs_on_this_host(spec)


def _tune_task(task: Task, index: int, count: int, found: Found, key: dict, records: database.Records, db: Path,
               trials: int, measurer: "_Measurer", seed: int, progress, started: float) -> dict[str, Any]:
    structure = task.structure()
    done = records.measured(task.key, structure)
    choices = SPACES[task.kernel].candidates(task.shape, task.defaults)
    rest = choices[1:]
    random.Random(f"{seed}:{task.key}").shuffle(rest)
    budget = min(trials, len(choices))
    plan = [c for c in [choices[0], *rest] if database.canonical(c) not in done][:max(0, budget - len(done))]
    title = f"[{index}/{count}] {task.title()}"
    if not plan:
        progress(f"{title}: {len(done)} choices already measured (of {len(choices)}); nothing to do")
    buckets = found.buckets if task.shape.get("rows") == "m" else (1,)
    reference = None
    task_start = time.monotonic()
    unit = "ms per row over the prefill buckets" if len(buckets) > 1 or buckets != (1,) else "ms"
    for n, choice in enumerate(plan, 1):
        if reference is None:  # the defaults' output, to check every other choice against
            reference = measurer.outputs(task, task.defaults, buckets)
        seconds, per_bucket = measurer.time(task, choice, buckets, reference)
        record = {"format": database.FORMAT, "key": task.key, "kernel": task.kernel, "shape": task.shape,
                  "structure": structure, "target": key["match"], "target_name": key["target"],
                  "versions": key["versions"], "params": choice, "seconds": seconds,
                  "buckets": {str(b): s for b, s in per_bucket.items()},
                  "default": choice == task.defaults, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        database.append(db, record)  # synced before the next measurement starts
        done[database.canonical(choice)] = record
        records.by_key.setdefault(task.key, []).append(record)
        best = records.best(task.key, structure)
        spent = time.monotonic() - task_start
        left = _left(spent, n, len(plan)) + (time.monotonic() - started) / index * (count - index)
        progress(f"{title}: trial {len(done)}/{budget}, best {best['seconds'] * 1e3:.4f} {unit}"
                 + (f" ({best['speedup']:.2f}x the defaults)" if "speedup" in best else "")
                 + f"; ~{left:.0f}s left in all")
    best = records.best(task.key, structure)
    return {"kernel": task.kernel, "shape": task.shape, "trials": len(done), "choices": len(choices),
            "best": best and best["params"], "best_seconds": best and best["seconds"],
            "speedup": best.get("speedup") if best else None}


def _left(elapsed: float, done: int, total: int) -> float:
    return elapsed / max(done, 1) * (total - done)


class _Measurer:
    """Compiles one kernel choice and times it here, or on a remote machine (``rpc.Remote``)."""

    def __init__(self, spec, remote=None):
        self.spec, self.remote = spec, remote
        self.target = spec.tvm_target()
        self._arrays: dict[tuple[str, int], list[np.ndarray]] = {}  # one kernel's inputs (a 7B vocabulary is 2 GB)

    def inputs(self, task: Task, func, rows: int) -> list[np.ndarray]:
        key = (task.key, rows)
        if key not in self._arrays:
            self._arrays = {k: v for k, v in self._arrays.items() if k[0] == task.key}
            self._arrays[key] = _inputs(func, rows)
        return self._arrays[key]

    def compile(self, task: Task, params: dict[str, int]):
        import tvm

        func = task.make(**params).with_attr("global_symbol", "main")
        return func, tvm.compile(tvm.IRModule({"main": func}), target=self.target).mod

    def outputs(self, task: Task, params: dict[str, int], buckets) -> dict[int, list[np.ndarray]]:
        func, lib = self.compile(task, params)
        return {b: self._run(lib, self.inputs(task, func, b), cold=b == 1)[1] for b in buckets}

    def time(self, task: Task, params: dict[str, int], buckets, reference, compiled=None) -> tuple[float, dict[int, float]]:
        """Seconds per row summed over the buckets (a decode kernel: its one call), and per bucket;
        raises if the choice computes something else than the defaults. ``compiled``: from ``compile``."""
        func, lib = compiled or self.compile(task, params)
        per_bucket = {}
        for b in buckets:
            seconds, outs = self._run(lib, self.inputs(task, func, b), cold=b == 1)
            for got, want in zip(outs, reference[b]):
                np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-2, atol=1e-2,
                                           err_msg=f"{task.title()} with {params} computes another result")
            per_bucket[b] = seconds
        return sum(s / b for b, s in per_bucket.items()), per_bucket

    def _run(self, lib, arrays: list[np.ndarray], cold: bool = False) -> tuple[float, list[np.ndarray]]:
        import tvm

        if self.remote is not None:
            return self.remote.run(lib, "main", arrays, MIN_REPEAT_SECONDS, REPEATS)
        dev = tvm.cpu(0)
        tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
        lib["main"](*tensors)
        if cold:  # see COLD_REPEATS
            return _time_streamed(lib["main"], arrays, tensors, dev), [tensors[-1].numpy()]
        timer = lib.time_evaluator("main", dev, number=1, repeat=REPEATS, min_repeat_ms=int(MIN_REPEAT_SECONDS * 1e3))
        seconds = float(np.median(timer(*tensors).results))
        return seconds, [tensors[-1].numpy()]


def last_level_cache_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest CPU cache of cpu0 as sysfs gives it ("32768K"), or COLD_DEFAULT_CACHE."""
    sizes = []
    for index in caches.glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text))
        except (OSError, ValueError, IndexError):
            continue
    return max(sizes, default=COLD_DEFAULT_CACHE)


def _time_streamed(func, arrays: list[np.ndarray], tensors: list, dev) -> float:
    """Median seconds of one call, each call on the next of enough copies of the inputs after the first
    (the activations) and before the last (the output) that none is still in cache when it comes round."""
    import tvm

    weights = sum(a.nbytes for a in arrays[1:-1]) or 1
    copies = max(1, min(-(-2 * last_level_cache_bytes() // weights), 4096))
    sets = [tensors] + [[tensors[0], *(tvm.runtime.tensor(a, dev) for a in arrays[1:-1]), tensors[-1]]
                        for _ in range(copies - 1)]
    for args in sets:  # every copy touched once: its pages mapped, and the caches left full of others
        func(*args)
    times = []
    for i in range(max(COLD_REPEATS, copies)):
        args = sets[(i + 1) % copies]
        start = time.perf_counter()
        func(*args)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _inputs(func, rows: int) -> list[np.ndarray]:
    """Random arguments for ``func``, its symbolic extent (the prompt's rows) bound to ``rows``; the
    last is the output. Seeded: every choice of a kernel sees the same numbers."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    out = []
    for param in func.params:  # TVM 0.27: a PrimFunc's parameters are its buffers
        shape = [int(d) if hasattr(d, "value") else rows for d in param.shape]
        dtype = str(param.dtype)
        if dtype.startswith("int") or dtype.startswith("uint"):
            info = np.iinfo(np.dtype(dtype))
            out.append(rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=np.dtype(dtype)))
        else:
            np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
            out.append((rng.standard_normal(shape, dtype=np.float32) * 0.5).astype(np_dtype))
    return out


def _tune_tir(found: Found, db: Path, trials: int, rpc, progress) -> dict[str, Any] | None:
    """TVM's TIR kernels through MetaSchedule (``metaschedule.py``)."""
    from . import metaschedule

    return metaschedule.tune_engine(found, db / database.METASCHEDULE, trials, rpc, progress)
