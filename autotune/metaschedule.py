"""MetaSchedule for the TIR that TVM legalizes (elementwise chains, reductions): tasks, tuning, applying.

qwen2c writes its own kernels (matmuls, norms, attention, MoE) and tunes their parameters itself
(``autotune/params.py``); the rest of an engine's TIR comes from Relax's legalization, fused, and
gets a generic schedule (``schedules/cpu_injective.py`` on CPU, DLight on GPU). Those functions are
what MetaSchedule searches schedules for:

    tir_tasks          the functions worth tuning in a module lowered up to the schedule phase
    tune_tir           measures candidates into a TVM tuning database folder (resumable), and the
                       default schedule the same way
    apply_tir_records  a pipeline pass: a function whose best record beat its default schedule
                       gets the tuned one; every other function keeps today's schedule
    tune_engine        ``qwen2c tune``'s MetaSchedule step

Only static-shape functions are tuned: MetaSchedule measures one concrete shape, and a function
with a symbolic dimension (prefill's sequence length) would be tuned for whatever size the runner
picked. A decode step's functions are all static. Records are keyed by the function's structure
(TVM's structural hash of the function as a one-function module named ``main``, so the same
elementwise chain in two engines shares a record) and the target; ``metaschedule_db.py`` adds the
TVM version.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import tvm
from tvm import relax, tirx

from qwen2c.interrupts import interrupt_guard

from . import context, metaschedule_db

log = logging.getLogger(__name__)

TUNER = "metaschedule"
# Seconds per candidate's compilation, the worker's start included: TVM's 30 s default was seen to
# fail good candidates on a busy two-core machine.
BUILD_TIMEOUT = 120.0
# Loops a function already has when someone scheduled it by hand (qwen2c's own kernels, TVM's KV
# cache): MetaSchedule's search starts from unscheduled blocks.
_SCHEDULED_LOOPS = ("T.parallel(", "T.vectorized(", "T.unroll(", "T.thread_binding(")


@dataclass(frozen=True)
class TirTask:
    """One function to tune; ``functions`` are the engine's functions with this structure."""

    name: str
    workload: tvm.IRModule  # {"main": the function}: what MetaSchedule tunes and keys its records by
    shape: dict[str, Any]
    functions: tuple[str, ...]
    target: Any
    tuner: str = TUNER
    # The function as the build schedules it without a record (``tune_engine`` fills it in from the
    # engine's lowered module): what a tuned schedule must beat. None: the unscheduled function.
    default: Any = None

    @property
    def key(self) -> str:
        return self.shape["workload"]


class TirTasks(list):
    """``tir_tasks``'s answer: the tasks, and the functions skipped for a symbolic shape."""

    def __init__(self, tasks=(), symbolic=()):
        super().__init__(tasks)
        self.symbolic: list[str] = list(symbolic)


def tir_tasks(mod: tvm.IRModule, target) -> TirTasks:
    """The static-shape, unscheduled TIR functions of ``mod`` that its Relax functions call.

    ``mod`` is an engine lowered up to the schedule phase (legalized, fused, dataflow lowered).
    Skipped: functions already scheduled (``tirx.is_scheduled``, or written with parallel /
    vector / thread loops: qwen2c's kernels and the KV cache's), loop-level TIR without blocks,
    host functions, functions no Relax function calls (reshapes turned into views) and those only
    the load-time functions call (the weight concatenations of ``transform_params``); those with a
    symbolic dimension (prefill's) are listed in ``.symbolic``.
    """
    called = _called(mod)
    by_key: dict[str, TirTask] = {}
    symbolic = []
    for gv, func in sorted(mod.functions_items(), key=lambda item: item[0].name_hint):
        if not isinstance(func, tirx.PrimFunc) or gv not in called or not _unscheduled(func):
            continue
        if not _static(func):
            symbolic.append(gv.name_hint)
            continue
        task = tir_task(gv.name_hint, func, target)
        known = by_key.get(task.key)
        by_key[task.key] = task if known is None else dataclasses.replace(
            known, functions=(*known.functions, gv.name_hint))
    return TirTasks(by_key.values(), symbolic)


def tir_task(name: str, func: tirx.PrimFunc, target) -> TirTask:
    """The task of one static-shape function (``tir_tasks`` finds an engine's; tests make their own)."""
    workload = _workload(func)
    shape = {"args": [f"{p.ty.dtype}{[int(d) for d in p.ty.shape]}" for p in func.params],
             "workload": f"{_hash(workload)}"}
    return TirTask(name, workload, shape, (name,), target)


# Relax functions an engine runs once, when it loads: their kernels are not worth a search.
_RUN_ONCE = ("transform_params", "create_kv_cache")


def _called(mod: tvm.IRModule) -> set:
    called = set()
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function) and gv.name_hint not in _RUN_ONCE:
            called.update(relax.analysis.all_global_vars(func))
    return called


def _unscheduled(func: tirx.PrimFunc) -> bool:
    """Mirrors what DLight (``schedule_cpu_injective``, the GPU rules) takes as still to schedule."""
    attrs = func.attrs or {}
    if bool(attrs.get("tirx.is_scheduled", False)) or bool(attrs.get("tirx.is_host_func", False)):
        return False
    if not bool(attrs.get("s_tir", False)):  # no blocks: nothing for MetaSchedule's rules to work on
        return False
    script = func.script()
    return not any(loop in script for loop in _SCHEDULED_LOOPS)


def _static(func: tirx.PrimFunc) -> bool:
    """Every parameter a buffer of constant shape (a scalar parameter is a dimension passed in)."""
    for param in func.params:
        shape = getattr(param.ty, "shape", None)
        if shape is None or not all(isinstance(d, tirx.IntImm) for d in shape):
            return False
    return True


def _workload(func: tirx.PrimFunc) -> tvm.IRModule:
    # Named "main" whatever the engine calls it: the name is part of the structural hash.
    return tvm.IRModule({"main": func.without_attr("global_symbol").with_attr("global_symbol", "main")})


def _hash(mod: tvm.IRModule) -> int:
    import tvm_ffi

    return tvm_ffi.structural_hash(mod)  # what TVM's JSONDatabase writes as the workload's hash


def apply_tir_records(target, db_dirs: list[Path] | None = None) -> tvm.transform.Pass:
    """A pass: each static TIR function with a record for ``target`` gets the tuned schedule.

    The databases are ``db_dirs``, or else the tuning context's ``metaschedule_dirs``
    (``autotune/context.py``); with neither, or no context, the pass returns the module unchanged.
    Each tunable function is reported in the context's ``used`` (tuned or default); when the
    context collects ``tasks`` (``qwen2c tune``), the tasks are added there. A tuned function is
    marked ``tirx.is_scheduled``, so the schedules that follow (``schedule_cpu_injective``, DLight)
    leave it alone. Place it after legalization and fusion, before those schedules.
    """

    @tvm.transform.module_pass(opt_level=0, name="ApplyTirRecords")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        tuning = context.current()
        dirs = list(db_dirs) if db_dirs is not None else list(tuning.metaschedule_dirs) if tuning else []
        collecting = tuning is not None and tuning.tasks is not None
        if not dirs and not collecting:
            return mod
        tasks = tir_tasks(mod, target)
        if collecting:
            tuning.tasks.extend(tasks)
            log.info("MetaSchedule: %d static-shape TIR functions to tune; %d with a symbolic shape (%s) are not "
                     "tuned", len(tasks), len(tasks.symbolic), ", ".join(tasks.symbolic[:4]) or "none")
        if not dirs:
            return mod
        return _apply(mod, tasks, metaschedule_db.load(dirs, target), target, tuning)

    return _pass


def _apply(mod: tvm.IRModule, tasks: TirTasks, loaded, target, tuning) -> tvm.IRModule:
    """Each task's best record, where it was measured faster than the default schedule.

    MetaSchedule's best is only the best of what it sampled: for a decode step's small elementwise
    functions its one candidate (a parallel loop) ran 30x slower than qwen2c's single vector task
    (2.3 vs 0.07 us, [1, 896] on two cores). So ``tune_tir`` times the default too, and a record is
    applied only when it beat that.
    """
    mod = mod.clone()
    tuned = 0
    for task in tasks:
        best, default = _best_us(loaded.database, task.workload), loaded.default_us.get(task.key)
        sch = None
        if best is not None and default is not None and best < default:
            sch = loaded.database.query_schedule(task.workload, target, workload_name="main")
        for name in task.functions:
            gv = mod.get_global_var(name)
            if sch is not None:
                mod.update_func(gv, _as_engine_function(sch.mod["main"], mod[gv]))
                tuned += 1
            if tuning is not None:
                tuning.used.append({"kernel": name, "shape": task.shape, "params": None,
                                    "source": "tuned" if sch is not None else "default", "tuner": TUNER,
                                    "tuned_us": best, "default_us": default})
    log.info("MetaSchedule: %d of %d static TIR functions tuned (%d records); %d with a symbolic shape "
             "keep their default schedule", tuned, sum(len(t.functions) for t in tasks), loaded.records,
             len(tasks.symbolic))
    return mod


def _best_us(database, workload: tvm.IRModule) -> float | None:
    if not database.has_workload(workload):
        return None
    top = database.get_top_k(database.commit_workload(workload), 1)
    return _mean_us(list(top[0].run_secs)) if top and top[0].run_secs else None


def _as_engine_function(tuned: tirx.PrimFunc, original: tirx.PrimFunc) -> tirx.PrimFunc:
    """The tuned body with the engine function's own attributes (its symbol, or none), marked scheduled."""
    func = tuned.without_attr("global_symbol")
    for key, value in (original.attrs or {}).items():
        func = func.with_attr(key, value)
    return func.with_attr("tirx.is_scheduled", True)


# Tuning ---------------------------------------------------------------------------------------


def tune_engine(found, db_dir: Path, trials: int, rpc=None, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """``qwen2c tune``'s MetaSchedule step: the TIR tasks the engine's lowering collected (``found.tasks``
    entries whose ``tuner`` is "metaschedule", added by ``apply_tir_records``), tuned into ``db_dir``.
    ``rpc``: an ``rpc.Remote`` whose tracker and key measure the candidates."""
    from .rpc import metaschedule_runner

    scheduled = found.scheduled_module  # lowered without records: each function's default schedule
    names = {gv.name_hint for gv in scheduled.get_global_vars()} if scheduled is not None else set()
    tasks = [dataclasses.replace(t, default=scheduled[t.name] if t.name in names else None)
             for t in found.tasks if getattr(t, "tuner", None) == TUNER]
    if not tasks:
        progress("MetaSchedule: no static-shape TIR functions to tune")
        return {"db": str(db_dir), "tasks": []}
    progress(f"MetaSchedule: {len(tasks)} static-shape TIR functions, up to {trials} trials each, into {db_dir}")
    runner = None if rpc is None else metaschedule_runner(rpc.tracker, rpc.key, rpc.timeout)
    results = tune_tir(tasks, found.spec.tvm_target(), db_dir, trials, runner, progress)
    return {"db": str(db_dir), "tasks": [vars(r) for r in results]}


@dataclass
class TaskResult:
    name: str
    trials: int = 0  # measured candidates in the database, earlier runs included
    best_us: float | None = None
    new: int = 0  # measured by this run
    default_us: float | None = None  # the default schedule, timed the same way in this run


def tune_tir(mod: tvm.IRModule | list[TirTask], target, db_dir: Path, trials: int, runner=None,
             progress: Callable[[str], None] = print, *, cost_model: str | None = None,
             batch: int = 16, seed: int | None = None, strategy: str = "evolutionary") -> list[TaskResult]:
    """Tune each task (or ``tir_tasks(mod, target)``) to ``trials`` measured candidates into ``db_dir``.

    Resumable: MetaSchedule appends each batch of measurements to the JSON files as it goes, so a
    run that is interrupted or killed loses at most its current batch (``batch`` candidates); a
    rerun counts what ``db_dir`` holds for each task and measures only the rest, its search seeded
    with the best candidates found before. ``runner``: where candidates run (None: this machine;
    ``rpc.metaschedule_runner`` for a remote one). ``cost_model``: "xgb" (needs xgboost), "random";
    None picks xgb when xgboost is importable. ``strategy``: MetaSchedule's search ("evolutionary":
    mutates the best candidates, guided by the cost model; "replay-trace": independent random
    samples, far cheaper per batch on a small machine, no guidance). Raises ConfigError for a
    ``db_dir`` another TVM tuned into.
    """
    from tvm.s_tir import meta_schedule as ms

    tasks = list(mod) if isinstance(mod, list) else tir_tasks(mod, target)
    db_dir = Path(db_dir)
    db_dir.mkdir(parents=True, exist_ok=True)
    metaschedule_db.write_marker(db_dir, target)
    dropped = metaschedule_db.repair(db_dir)
    if dropped:
        progress(f"  {db_dir}: {dropped} damaged line(s) dropped (originals kept as *.damaged)")
    measured = _measured(db_dir, target)
    defaults = ((metaschedule_db.read_marker(db_dir) or {}).get("default_us") or {}).get(
        metaschedule_db.target_key(target)) or {}
    results = [TaskResult(t.name, *measured.get(t.key, (0, None)), default_us=defaults.get(t.key)) for t in tasks]
    # A task whose search ran dry before its budget (a small elementwise function has a handful of
    # distinct schedules) would only measure the same candidates again.
    dry = metaschedule_db.exhausted(db_dir, target)
    todo = [(t, r) for t, r in zip(tasks, results) if r.trials < trials and t.key not in dry]
    for task, result in zip(tasks, results):
        if result.trials >= trials or task.key in dry:
            why = "every distinct candidate" if task.key in dry else f"{result.trials} trials"
            progress(f"  {task.name}: {why} measured already, best {_us(result.best_us)}")
    if not todo:
        return results
    model = cost_model or ("xgb" if _importable("xgboost") else "random")
    if model == "random" and cost_model is None:
        progress("  xgboost is not installed: candidates are picked at random (no cost model)")
    database = ms.database.JSONDatabase(work_dir=str(db_dir), module_equality="structural")
    builder = ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT, f_build=build_candidate)
    runner = runner or ms.runner.LocalRunner()
    shared_model = ms.cost_model.CostModel.create(model)
    # A KeyboardInterrupt raised wherever Ctrl-C lands inside MetaSchedule's loop (a Python function
    # its C++ calls where it cannot unwind) was seen to end the process in std::terminate. So
    # interrupts are only recorded while it runs; the progress callback, called after each batch's
    # records are written, raises it there, and it leaves here as KeyboardInterrupt.
    with interrupt_guard() as guard, guard.deferred():
        for i, (task, result) in enumerate(todo):
            left = trials - result.trials
            progress(f"  [{i + 1}/{len(todo)}] {task.name} {', '.join(task.shape['args'])}: "
                     f"{result.trials} measured, {left} to go")
            _quiet_console()
            (logger,) = ms.logging.get_loggers_from_work_dir(str(db_dir), [task.name])
            result.default_us = _time_default(task, target, builder, runner)
            metaschedule_db.record_default(db_dir, target, task.key, result.default_us)
            progress(f"    {task.name}: default schedule {_us(result.default_us)}")
            context_ = ms.TuneContext(mod=task.workload, target=target, space_generator="post-order-apply",
                                      search_strategy=strategy, task_name=task.name, logger=logger,
                                      rand_state=-1 if seed is None else seed + i, num_threads="physical").clone()
            ms.tune.tune_tasks(
                tasks=[context_], task_weights=[1.0], work_dir=str(db_dir), max_trials_global=left,
                num_trials_per_iter=min(batch, left), builder=builder, runner=runner, database=database,
                cost_model=shared_model, task_scheduler="round-robin",
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                                   _progress_callback(result, trials, progress, guard)],
            )
            guard.checkpoint()
            if result.trials < trials:  # MetaSchedule stopped early: no new candidate left to try
                metaschedule_db.mark_exhausted(db_dir, target, task.key)
                progress(f"    {task.name}: search space exhausted after {result.trials} candidates")
    return results


def _time_default(task: TirTask, target, builder, runner) -> float | None:
    """The task's default schedule (or the unscheduled function), built and run as a candidate is."""
    import shutil

    from tvm.s_tir import meta_schedule as ms

    mod = _workload(task.default) if task.default is not None else task.workload
    (built,) = builder.build([ms.builder.BuilderInput(mod, target)])
    if built.error_msg:
        log.warning("%s: the default schedule failed to build: %s", task.name, built.error_msg.splitlines()[0])
        return None
    try:
        device = {"llvm": "cpu"}.get(target.kind.name, target.kind.name)
        (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, device,
                                                      ms.arg_info.ArgInfo.from_prim_func(mod["main"]))])
        result = future.result()
    finally:
        shutil.rmtree(os.path.dirname(built.artifact_path), ignore_errors=True)
    if result.error_msg:
        log.warning("%s: the default schedule failed to run: %s", task.name, result.error_msg.splitlines()[0])
        return None
    return _mean_us(list(result.run_secs))


def build_candidate(mod: tvm.IRModule, target, _params=None):
    """MetaSchedule's builder function (run in its worker processes), minus one import.

    TVM's default build imports ``tvm.s_tir.tensor_intrin`` first, which parses some 500 TVMScript
    functions: 16 s on two busy cores, in every worker of every batch (the builder starts fresh
    workers per batch), where the compile itself takes a second. A candidate arrives scheduled,
    its tensorized blocks already replaced by the intrinsics' bodies, so the build needs none of them.
    """
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _measured(db_dir: Path, target) -> dict[str, tuple[int, float | None]]:
    """Per workload hash: candidates measured for ``target`` in ``db_dir``, and the best (us)."""
    lines = metaschedule_db.read_lines(db_dir)
    key = metaschedule_db.target_key(target)
    out: dict[str, tuple[int, float | None]] = {}
    for w, record in lines.records:
        try:
            if metaschedule_db.record_target(record) != key:
                continue
        except Exception:  # noqa: BLE001  (a target TVM cannot parse: not this one)
            continue
        shash = str(lines.workloads[w][0])
        count, best = out.get(shash, (0, None))
        us = _mean_us(record[1])
        out[shash] = (count + 1, us if best is None or (us is not None and us < best) else best)
    return out


def _mean_us(run_secs) -> float | None:
    # MetaSchedule stores 1e10 s for a candidate that failed to build or run.
    if not run_secs or any(float(s) >= 1e9 for s in run_secs):
        return None
    return 1e6 * sum(float(s) for s in run_secs) / len(run_secs)


def _us(value: float | None) -> str:
    return "none valid" if value is None else f"{value:.2f} us"


def _progress_callback(result: TaskResult, trials: int, progress: Callable[[str], None], guard):
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, _scheduler, _task_id, candidates, _builds, runs) -> None:
            guard.checkpoint()  # after MetaSchedule's own callbacks wrote this batch's records
            if not candidates:  # the search found nothing new this round (a small space runs dry)
                return
            for run in runs:
                us = None if run.error_msg else _mean_us(list(run.run_secs or []))
                if us is not None and (result.best_us is None or us < result.best_us):
                    result.best_us = us
            result.trials += len(candidates)
            result.new += len(candidates)
            progress(f"    {result.name}: {result.trials}/{trials} trials, best {_us(result.best_us)}")

    return _Progress()


def _quiet_console() -> None:
    """MetaSchedule logs every scheduling round to the console at INFO; keep that in its log files."""
    # Its console handler takes the level this logger has when a task's loggers are configured,
    # which also resets the logger to DEBUG: so before each task.
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    logger.setLevel(logging.WARNING)
    # MetaSchedule reconfigures this logger by handler name, and a handler someone attached without
    # one (seen in a full test run) makes its configuration fail ("'NoneType' has no attribute
    # 'format'"): such handlers are dropped, its own are configured again anyway.
    for handler in [h for h in logger.handlers if not h.get_name()]:
        logger.removeHandler(handler)


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False

