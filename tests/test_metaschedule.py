"""MetaSchedule for TVM's legalized TIR: tasks of a tiny engine, tuning, the pipeline pass applying records.

Tuning is slow (each candidate is compiled in a worker process), so the module tunes once, the
decode step's SwiGLU function of a tiny Qwen2 with two trials, and the tests share that database.
"""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def tuned_db(lowered, tmp_path_factory):
    db = tmp_path_factory.mktemp("ms") / "db"
    (task,) = [t for t in lowered["tasks"] if SWIGLU in t.functions]
    lines = []
    results = metaschedule.tune_tir([task], _target(), db, trials=2, progress=lines.append, cost_model="random",
                                    batch=2, seed=1)
    return {"db": db, "task": task, "results": results, "progress": lines}


def test_tasks_are_the_static_legalized_functions(lowered):
    tasks = lowered["tasks"]
    names = {n for t in tasks if getattr(t, "tuner", None) == "metaschedule" for n in t.functions}
    assert SWIGLU in names and "take" in names  # decode's SwiGLU and embedding lookup
    # Prefill's versions have a symbolic sequence length; qwen2c's own kernels are never tasks.
    assert "fused_split1_silu1_multiply1" not in names
    assert not any(n.startswith(("nt_matmul", "rms_norm", "batch_decode")) for n in names)
    plain = lowered["plain"]
    for name in names:
        assert all(int(d) >= 0 for p in plain[name].params for d in p.ty.shape)  # static


def test_collecting_tasks_leaves_the_module_unchanged(lowered):
    tvm.ir.assert_structural_equal(lowered["collected"], lowered["plain"])


def test_no_context_or_no_databases_build_the_same_module(lowered):
    empty = context.TuningContext(target_key={}, metaschedule_dirs=[])
    tvm.ir.assert_structural_equal(lowered["lower"](empty), lowered["plain"])
    assert empty.used == []


def test_tuning_writes_records_and_progress(tuned_db):
    db = tuned_db["db"]
    (result,) = tuned_db["results"]
    assert result.trials >= 1 and result.best_us is not None and result.best_us > 0
    records = (db / metaschedule_db.RECORDS).read_text().splitlines()
    assert len(records) == result.trials
    marker = json.loads((db / metaschedule_db.MARKER).read_text())
    assert marker["versions"]["tvm"] == tvm.__version__ and str(_target()) in marker["targets"]
    assert any(SWIGLU in line and "best" in line for line in tuned_db["progress"])


def _applied(lowered, dirs):
    tuning = context.TuningContext(target_key={}, metaschedule_dirs=list(dirs))
    return lowered["lower"](tuning), tuning


def _run(func, *arrays):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=_target())
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*tensors)
    return tensors[-1].numpy()


def test_records_replace_the_default_schedule_and_compute_the_same(lowered, tuned_db):
    mod, tuning = _applied(lowered, [tuned_db["db"]])
    tuned, default = mod[SWIGLU], lowered["plain"][SWIGLU]
    assert not tvm_ffi.structural_equal(tuned, default)
    assert bool(tuned.attrs["tirx.is_scheduled"]) and "global_symbol" not in tuned.attrs
    used = {u["kernel"]: u for u in tuning.used}
    assert used[SWIGLU]["source"] == "tuned" and used[SWIGLU]["tuner"] == "metaschedule"
    assert used["take"]["source"] == "default"  # no record: today's schedule
    tvm.ir.assert_structural_equal(mod["take"], lowered["plain"]["take"])
    x = np.random.default_rng(0).standard_normal((1, 1, 320)).astype("float32")
    gate, up = x[..., :160], x[..., 160:]
    want = gate / (1 + np.exp(-gate)) * up
    out = _run(tuned, x, np.zeros((1, 1, 160), "float32"))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_a_damaged_line_is_skipped_and_counted(lowered, tuned_db, tmp_path, caplog):
    db = tmp_path / "db"
    shutil.copytree(tuned_db["db"], db)
    with open(db / metaschedule_db.RECORDS, "a") as f:
        f.write('[0, [[[["GetSBlock", [], ["T_spl')  # a run killed while appending
    with open(db / metaschedule_db.WORKLOADS, "a") as f:
        f.write("not json\n")
    with caplog.at_level(logging.WARNING):
        loaded = metaschedule_db.load([db], _target())
        mod, tuning = _applied(lowered, [db])
    assert loaded.damaged == 2 and loaded.records == tuned_db["results"][0].trials
    assert "2 damaged line(s) skipped" in caplog.text
    assert {u["kernel"]: u["source"] for u in tuning.used}[SWIGLU] == "tuned"
    # Before tuning appends to it again, the files are rewritten without the damaged lines.
    assert metaschedule_db.repair(db) == 2
    assert (db / (metaschedule_db.RECORDS + ".damaged")).exists()
    assert metaschedule_db.read_lines(db).damaged == 0
    assert metaschedule_db.load([db], _target()).records == loaded.records


def test_records_of_another_tvm_or_target_are_never_applied(lowered, tuned_db, tmp_path, caplog):
    db = tmp_path / "db"
    shutil.copytree(tuned_db["db"], db)
    marker = json.loads((db / metaschedule_db.MARKER).read_text())
    marker["versions"]["tvm"] = "0.26.0"
    (db / metaschedule_db.MARKER).write_text(json.dumps(marker))
    with caplog.at_level(logging.WARNING):
        mod, tuning = _applied(lowered, [db])
    assert "tvm 0.26.0" in caplog.text
    assert {u["kernel"]: u["source"] for u in tuning.used}[SWIGLU] == "default"
    tvm.ir.assert_structural_equal(mod, lowered["plain"])
    with pytest.raises(ConfigError, match="0.26.0"):  # nor tuned into
        metaschedule.tune_tir([tuned_db["task"]], _target(), db, trials=4)

    other = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64", "num-cores": 2})
    loaded = metaschedule_db.load([tuned_db["db"]], other)
    assert loaded.records == 0 and loaded.other_target == tuned_db["results"][0].trials
    assert loaded.database.query_schedule(tuned_db["task"].workload, other, workload_name="main") is None


def test_merge_keeps_every_record_once(tuned_db, tmp_path):
    out = tmp_path / "merged"
    summary = metaschedule_db.merge(out, [tuned_db["db"], tuned_db["db"]])
    n = tuned_db["results"][0].trials
    assert summary.startswith(f"{n} records of 1 functions ({n} duplicates dropped")
    assert metaschedule_db.load([out], _target()).records == n


_TUNE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_metaschedule import gemv, _target
from qwen2c.autotune import metaschedule
task = metaschedule.tir_task("gemv", gemv, _target())
metaschedule.tune_tir([task], _target(), {db!r}, trials=64, cost_model="random", batch=2, seed=3,
                      progress=lambda line: print(line, flush=True))
"""


def test_a_killed_run_keeps_its_records_and_a_rerun_continues(tmp_path):
    db = tmp_path / "db"
    records = db / metaschedule_db.RECORDS
    script = _TUNE_SCRIPT.format(tests=str(Path(__file__).parent), db=str(db))
    log_file = (tmp_path / "tune.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if records.exists() and len(records.read_bytes().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "tune.log").read_text()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the tuner and its builder/runner workers
        proc.wait()
        log_file.close()
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
