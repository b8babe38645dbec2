"""MetaSchedule for TVM's legalized TIR: tasks of a tiny engine, tuning, the pipeline pass applying records.

Tuning is slow (each candidate is compiled in a worker process), so the module tunes once, the
decode step's SwiGLU function of a tiny Qwen2 with two trials, and the tests share that database.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm.script import tirx as T

from qwen2c.autotune import context, metaschedule, metaschedule_db
from qwen2c.errors import ConfigError
from qwen2c.targets.registry import TARGETS

SWIGLU = "fused_split_silu_multiply"  # decode's silu(gate) * up, [1, 1, 2 * 160] -> [1, 1, 160]


@T.prim_func(s_tir=True)
def gemv(x: T.Buffer((1, 64), "float32"), w: T.Buffer((96, 64), "float32"), y: T.Buffer((1, 96), "float32")):
    """A decode-sized matmul: a search space large enough for many distinct candidates."""
    T.func_attr({"tirx.noalias": True})
    for i, j, k in T.grid(1, 96, 64):
        with T.sblock("y"):
            vi, vj, vk = T.axis.remap("SSR", [i, j, k])
            with T.init():
                y[vi, vj] = T.float32(0)
            y[vi, vj] = y[vi, vj] + x[vi, vk] * w[vj, vk]


def _target():
    return TARGETS.resolve("llvm").tvm_target()


@pytest.fixture(scope="module")
def lowered(tiny_checkpoint):
    """The tiny engine's module up to and including TIR scheduling: plain, and in a collecting context."""
    from qwen2c.checkpoint import load_reference, resolve_model
    from qwen2c.graphs.export import export_model
    from qwen2c.graphs.pipeline import run_passes
    from qwen2c.targets.tvm.pipelines import pipeline_for
    from qwen2c.targets.tvm.relax_module import build_relax_module

    config, model = load_reference(resolve_model(str(tiny_checkpoint)), "float32")
    program = export_model(model, 32)
    run_passes(program, config, "float32", check_lengths=())
    spec = TARGETS.resolve("llvm")
    passes = pipeline_for(spec)
    cut = [p.info.name for p in passes].index("ApplyDefaultSchedule") + 1  # schedule_cpu_injective
    module = build_relax_module(program, config, "float32")

    def lower(tuning):
        from qwen2c.targets.tvm.pipelines import run_pipeline

        with spec.tvm_target(), context.using(tuning):
            return run_pipeline(passes[:cut], module)

    collecting = context.TuningContext(target_key={}, tasks=[])
    return {"plain": lower(None), "lower": lower, "tasks": collecting.tasks, "collected": lower(collecting)}


def _gemv_module() -> tvm.IRModule:
    """A Relax function calling ``gemv``: what the pass sees of an engine, reduced to one kernel."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x, w = relax.Var("x", relax.TensorType((1, 64), "float32")), relax.Var("w", relax.TensorType((96, 64), "float32"))
    with bb.function("main", [x, w]):
        gv = bb.add_func(gemv, "gemv")
        out = bb.emit(relax.call_tir(gv, [x, w], relax.TensorType((1, 96), "float32")))
        bb.emit_func_output(out)
    return bb.get()


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    """``gemv`` tuned against its unscheduled self (a scalar loop nest), four candidates."""
    db = tmp_path_factory.mktemp("ms") / "db"
    (task,) = metaschedule.tir_tasks(_gemv_module(), _target())
    lines = []
    results = metaschedule.tune_tir([task], _target(), db, trials=4, progress=lines.append, cost_model="random",
                                    batch=2, seed=1, strategy="replay-trace")
    return {"db": db, "task": task, "results": results, "progress": lines}


def _ms(tasks):
    """MetaSchedule's tasks among what lowering collects (qwen2c's own kernels are collected too)."""
    return [t for t in tasks if getattr(t, "tuner", None) == "metaschedule"]


def test_tasks_are_the_static_legalized_functions(lowered):
    tasks = lowered["tasks"]
    names = {n for t in tasks if getattr(t, "tuner", None) == "metaschedule" for n in t.functions}
    assert SWIGLU in names and "take" in names  # decode's SwiGLU and embedding lookup
    # Prefill's versions have a symbolic sequence length; qwen2c's own kernels are never tasks.
    assert "fused_split1_silu1_multiply1" not in names
    assert not any(n.startswith(("nt_matmul", "rms_norm", "batch_decode")) for n in names)
    assert not any(n.startswith("concatenate") for n in names)  # transform_params: once per load
    plain = lowered["plain"]
    for name in names:
        assert all(int(d) >= 0 for p in plain[name].params for d in p.ty.shape)  # static


def test_collecting_tasks_leaves_the_module_unchanged(lowered):
    tvm.ir.assert_structural_equal(lowered["collected"], lowered["plain"])


def test_no_context_or_no_databases_build_the_same_module(lowered):
    empty = context.TuningContext(target_key={}, metaschedule_dirs=[])
    tvm.ir.assert_structural_equal(lowered["lower"](empty), lowered["plain"])
    assert [u for u in empty.used if u["tuner"] == "metaschedule"] == []  # qwen2c's own kernels note theirs


def test_tuning_writes_records_progress_and_the_default_to_beat(tuned_db):
    db = tuned_db["db"]
    (result,) = tuned_db["results"]
    assert result.trials == 4 and result.best_us is not None and result.default_us is not None
    records = (db / metaschedule_db.RECORDS).read_text().splitlines()
    assert len(records) == result.trials
    marker = json.loads((db / metaschedule_db.MARKER).read_text())
    assert marker["versions"]["tvm"] == tvm.__version__ and str(_target()) in marker["targets"]
    assert marker["default_us"][str(_target())][tuned_db["task"].key] == result.default_us
    assert any("gemv: 4/4 trials, best" in line for line in tuned_db["progress"])


def _with_default(tuned_db, tmp_path, us) -> Path:
    """A copy of the tuned database whose recorded default schedule took ``us``."""
    db = tmp_path / "db"
    shutil.copytree(tuned_db["db"], db)
    metaschedule_db.record_default(db, _target(), tuned_db["task"].key, us)
    return db


def _apply(module: tvm.IRModule, dirs):
    tuning = context.TuningContext(target_key={}, metaschedule_dirs=list(dirs))
    with context.using(tuning):
        return metaschedule.apply_tir_records(_target())(module), tuning


def _run(func, *arrays):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=_target())
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def test_a_record_is_applied_where_it_beat_the_default(tuned_db):
    module = _gemv_module()
    mod, tuning = _apply(module, [tuned_db["db"]])
    (used,) = tuning.used
    (result,) = tuned_db["results"]
    assert used["tuned_us"] == pytest.approx(result.best_us) and used["default_us"] == result.default_us
    assert used["source"] == ("tuned" if result.best_us < result.default_us else "default")
    assert tvm_ffi.structural_equal(mod["gemv"], module["gemv"]) == (used["source"] == "default")


def test_a_tuned_function_replaces_the_default_and_computes_numpys_result(tuned_db, tmp_path):
    module = _gemv_module()
    mod, tuning = _apply(module, [_with_default(tuned_db, tmp_path, 1e9)])
    (used,) = tuning.used
    assert used == {"kernel": "gemv", "shape": tuned_db["task"].shape, "params": None, "source": "tuned",
                    "tuner": "metaschedule", "tuned_us": pytest.approx(tuned_db["results"][0].best_us),
                    "default_us": 1e9}
    tuned = mod["gemv"]
    assert not tvm_ffi.structural_equal(tuned, module["gemv"])
    assert bool(tuned.attrs["tirx.is_scheduled"])
    assert tuned.attrs.get("global_symbol") == module["gemv"].attrs.get("global_symbol")  # not the tuned "main"
    tvm.ir.assert_structural_equal(mod["main"], module["main"])  # the Relax function is left alone
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 64)).astype("float32"), rng.standard_normal((96, 64)).astype("float32")
    np.testing.assert_allclose(_run(tuned, x, w, np.zeros((1, 96), "float32")), x @ w.T, rtol=1e-4, atol=1e-4)


def test_a_record_slower_than_the_default_is_not_applied(tuned_db, tmp_path):
    module = _gemv_module()
    mod, tuning = _apply(module, [_with_default(tuned_db, tmp_path, 1e-6)])
    assert tuning.used[0]["source"] == "default"
    tvm.ir.assert_structural_equal(mod, module)


def test_schedule_cpu_injective_leaves_a_tuned_function_alone(tuned_db, tmp_path):
    from qwen2c.schedules.cpu_injective import schedule_cpu_injective

    mod, _ = _apply(_gemv_module(), [_with_default(tuned_db, tmp_path, 1e9)])
    with _target():
        after = schedule_cpu_injective(vector_lanes=16)(mod)
    tvm.ir.assert_structural_equal(after["gemv"], mod["gemv"])


@pytest.fixture(scope="module")
def swiglu_db(lowered, tmp_path_factory):
    """The tiny engine's SwiGLU tuned as `qwen2c tune` does (``tune_engine``), one candidate."""
    from types import SimpleNamespace

    # What `qwen2c tune` hands over: the collected tasks (here only the SwiGLU's, to keep it short) and
    # the module lowered without records, whose functions carry the default schedules to beat.
    found = SimpleNamespace(tasks=[t for t in _ms(lowered["tasks"]) if SWIGLU in t.functions],
                            spec=TARGETS.resolve("llvm"), scheduled_module=lowered["plain"])
    db = tmp_path_factory.mktemp("swiglu") / "db"
    summary = metaschedule.tune_engine(found, db, trials=1, progress=lambda _: None)
    (result,) = [SimpleNamespace(**r) for r in summary["tasks"]]
    return {"db": db, "result": result, "task": found.tasks[0]}


def test_the_engine_pipeline_applies_records_in_a_tuning_context(lowered, swiglu_db):
    """The SwiGLU, tuned against its real default schedule, through the CPU pipeline."""
    result = swiglu_db["result"]
    assert result.default_us is not None and result.best_us is not None
    tuning = context.TuningContext(target_key={}, metaschedule_dirs=[swiglu_db["db"]])
    mod = lowered["lower"](tuning)
    used = {u["kernel"]: u for u in tuning.used if u["tuner"] == "metaschedule"}
    assert set(used) == {n for t in _ms(lowered["tasks"]) for n in t.functions}
    assert used["take"]["source"] == "default" and used["take"]["tuned_us"] is None  # no record
    swiglu = used[SWIGLU]
    assert swiglu["source"] == ("tuned" if result.best_us < result.default_us else "default")
    if swiglu["source"] == "default":
        tvm.ir.assert_structural_equal(mod, lowered["plain"])
    x = np.random.default_rng(0).standard_normal((1, 1, 320)).astype("float32")
    gate, up = x[..., :160], x[..., 160:]
    out = _run(mod[SWIGLU], x, np.zeros((1, 1, 160), "float32"))
    np.testing.assert_allclose(out, gate / (1 + np.exp(-gate)) * up, rtol=1e-5, atol=1e-6)


def test_an_engine_built_with_a_tuned_function_matches_transformers(tiny_checkpoint, swiglu_db, tmp_path):
    import qwen2c

    tuning_db = tmp_path / "tuning-db"  # what `qwen2c tune --db` writes: MetaSchedule's records in metaschedule/
    db = tuning_db / "metaschedule"
    shutil.copytree(swiglu_db["db"], db)
    metaschedule_db.record_default(db, _target(), swiglu_db["task"].key, 1e9)  # applied whatever the timing
    manifest = qwen2c.build(str(tiny_checkpoint), "llvm", tmp_path / "engine", max_context=64, tuning_db=tuning_db)
    used = {u["kernel"]: u for u in manifest["tuning"]["kernels"]}
    assert used[SWIGLU]["source"] == "tuned" and used[SWIGLU]["tuner"] == "metaschedule"
    assert manifest["parity"]["passed"]  # the build's own check: logits against transformers


def test_a_damaged_line_is_skipped_and_counted(tuned_db, tmp_path, caplog):
    db = _with_default(tuned_db, tmp_path, 1e9)
    with open(db / metaschedule_db.RECORDS, "a") as f:
        f.write('[0, [[[["GetSBlock", [], ["T_spl')  # a run killed while appending
    with open(db / metaschedule_db.WORKLOADS, "a") as f:
        f.write("not json\n")
    with caplog.at_level(logging.WARNING):
        loaded = metaschedule_db.load([db], _target())
        _, tuning = _apply(_gemv_module(), [db])
    assert loaded.damaged == 2 and loaded.records == tuned_db["results"][0].trials
    assert "2 damaged line(s) skipped" in caplog.text
    assert tuning.used[0]["source"] == "tuned"
    # Before tuning appends to it again, the files are rewritten without the damaged lines.
    assert metaschedule_db.repair(db) == 2
    assert (db / (metaschedule_db.RECORDS + ".damaged")).exists()
    assert metaschedule_db.read_lines(db).damaged == 0
    assert metaschedule_db.load([db], _target()).records == loaded.records


def test_records_of_another_tvm_or_target_are_never_applied(tuned_db, tmp_path, caplog):
    db = _with_default(tuned_db, tmp_path, 1e9)
    marker = json.loads((db / metaschedule_db.MARKER).read_text())
    marker["versions"]["tvm"] = "0.26.0"
    (db / metaschedule_db.MARKER).write_text(json.dumps(marker))
    module = _gemv_module()
    with caplog.at_level(logging.WARNING):
        mod, tuning = _apply(module, [db])
    assert "tvm 0.26.0" in caplog.text
    assert tuning.used[0]["source"] == "default"
    tvm.ir.assert_structural_equal(mod, module)
    with pytest.raises(ConfigError, match="0.26.0"):  # nor tuned into
        metaschedule.tune_tir([tuned_db["task"]], _target(), db, trials=8)

    other = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64", "num-cores": 2})
    loaded = metaschedule_db.load([tuned_db["db"]], other)
    assert loaded.records == 0 and loaded.other_target == tuned_db["results"][0].trials
    assert loaded.database.query_schedule(tuned_db["task"].workload, other, workload_name="main") is None


def test_a_search_that_ran_dry_is_not_repeated(tuned_db, tmp_path):
    db = _with_default(tuned_db, tmp_path, 1e9)
    metaschedule_db.mark_exhausted(db, _target(), tuned_db["task"].key)
    before = (db / metaschedule_db.RECORDS).read_text()
    lines = []
    (result,) = metaschedule.tune_tir([tuned_db["task"]], _target(), db, trials=100, progress=lines.append)
    assert result.new == 0 and result.trials == tuned_db["results"][0].trials and result.default_us == 1e9
    assert lines == ["  gemv: every distinct candidate measured already, best " + f"{result.best_us:.2f} us"]
    assert (db / metaschedule_db.RECORDS).read_text() == before


def test_merge_keeps_every_record_once(tuned_db, tmp_path):
    out = tmp_path / "merged"
    summary = metaschedule_db.merge(out, [tuned_db["db"], tuned_db["db"]])
    n = tuned_db["results"][0].trials
    assert summary.startswith(f"{n} records of 1 functions ({n} duplicates dropped")
    loaded = metaschedule_db.load([out], _target())
    assert loaded.records == n and loaded.default_us == {tuned_db["task"].key: tuned_db["results"][0].default_us}


_TUNE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_metaschedule import gemv, _target
from qwen2c.autotune import metaschedule
task = metaschedule.tir_task("gemv", gemv, _target())
try:
    metaschedule.tune_tir([task], _target(), {db!r}, trials=64, cost_model="random", batch=2, seed=3,
                          progress=lambda line: print(line, flush=True))
except KeyboardInterrupt:
    sys.exit(130)  # as `qwen2c tune` does
"""


def _start_tuning(tmp_path: Path):
    """A tuning subprocess, once its first records are on disk; and the records file."""
    db = tmp_path / "db"
    records = db / metaschedule_db.RECORDS
    script = _TUNE_SCRIPT.format(tests=str(Path(__file__).parent), db=str(db))
    log_file = tmp_path / "tune.log"
    with log_file.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and len(records.read_bytes().splitlines()) >= 2:
            break
        time.sleep(0.2)
    if proc.poll() is not None or time.monotonic() >= deadline:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the tuning subprocess wrote no records: {log_file.read_text()[-2000:]}")
    return proc, records


def test_ctrl_c_stops_tuning_promptly_and_keeps_the_records(tmp_path):
    proc, records = _start_tuning(tmp_path)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the tuner and its worker processes
        assert proc.wait(timeout=120) == 130, (tmp_path / "tune.log").read_text()[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):  # workers left behind, if any
            os.killpg(proc.pid, signal.SIGKILL)
    kept = _readable(records)
    assert len(kept) >= 2 and len(kept) == len(records.read_text().splitlines())  # whole lines only


def test_a_killed_run_keeps_its_records_and_a_rerun_continues(tmp_path):
    proc, records = _start_tuning(tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)  # the tuner and its builder/runner workers, wherever they are
    proc.wait()
    db = records.parent
    kept = _readable(records)
    assert len(kept) >= 2
    task = metaschedule.tir_task("gemv", gemv, _target())
    lines = []
    (result,) = metaschedule.tune_tir([task], _target(), db, trials=len(kept) + 2, progress=lines.append,
                                      cost_model="random", batch=2, seed=4)
    assert any(f"{len(kept)} measured, 2 to go" in line for line in lines)
    after = _readable(records)
    assert after[:len(kept)] == kept  # nothing measured before the kill was lost or rewritten...
    assert result.trials == len(after) == len(kept) + 2 and result.new == 2  # ...nor measured again
    (again,) = metaschedule.tune_tir([task], _target(), db, trials=len(kept), progress=lines.append)
    assert again.new == 0 and "measured already" in lines[-1]


def _readable(path: Path) -> list:
    """The JSON lines of ``path`` (a kill can leave half a line, which the rerun drops)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_merge_keeps_the_marks_of_searches_that_ran_dry(tuned_db, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(tuned_db["db"], source)
    metaschedule_db.mark_exhausted(source, _target(), tuned_db["task"].key)
    out = tmp_path / "merged"
    summary = metaschedule_db.merge(out, [source])
    assert summary.startswith(f"{tuned_db['results'][0].trials} records of 1 functions")
    assert metaschedule_db.read_marker(out)["exhausted"] == metaschedule_db.read_marker(source)["exhausted"]
