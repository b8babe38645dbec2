"""Tuning qwen2c's own kernels: the parameter lookup, the database, `qwen2c tune`, and builds applying
records. Engines built from tuned records are held to transformers by the build's own parity check,
and must give the same tokens as the default build."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tvm

import qwen2c
from qwen2c.autotune import database, params
from qwen2c.autotune.context import TuningContext, using
from qwen2c.autotune.target_key import target_key
from qwen2c.autotune.tuner import tune
from qwen2c.errors import Qwen2cError
from qwen2c.schedules.cpu_matmul import nt_matmul_kernel
from qwen2c.targets.registry import TARGETS

SPEC = TARGETS.resolve("llvm")
LANES = SPEC.vector_bits // 32
KEY = target_key(SPEC)


def _record(**overrides):
    shape = {"k": 64, "n": 128, "rows": "m", "dtype": "float32", "vector": LANES}
    record = {"format": 1, "key": params.shape_key("nt_matmul", shape), "kernel": "nt_matmul", "shape": shape,
              "structure": _structure(shape), "target": KEY["match"], "params": {"tile_rows": 2, "tile_cols": 8},
              "seconds": 1e-5, "default": False}
    record.update(overrides)
    return record


def _structure(shape):
    from qwen2c.schedules.cpu_matmul import TILE_COLS, tile_rows

    return params.structure_of(nt_matmul_kernel(shape["k"], shape["n"], LANES, tile_rows(LANES), TILE_COLS))


def _matmul(shape, records):
    """The nt_matmul kernel for ``shape`` as the dispatch asks for it, in a context over ``records``."""
    from qwen2c.schedules.cpu_matmul import TILE_COLS, tile_rows

    context = TuningContext(KEY, records=records)
    with using(context):
        func = params.kernel("nt_matmul", shape, {"tile_rows": tile_rows(LANES), "tile_cols": TILE_COLS},
                             lambda tile_rows, tile_cols: nt_matmul_kernel(shape["k"], shape["n"], LANES, tile_rows,
                                                                           tile_cols))
    return func, context.used[0]


def _write_lines(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / database.PARAMS).write_text("".join(line + "\n" for line in lines))


def test_a_matching_record_sets_the_parameters_and_the_kernel_still_computes_x_wT(tmp_path):
    _write_lines(tmp_path / "db", [json.dumps(_record())])
    records = database.Records.load([tmp_path / "db"], KEY["match"])
    func, used = _matmul(_record()["shape"], records)
    assert used["source"] == "tuned" and used["params"] == {"tile_rows": 2, "tile_cols": 8}
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=SPEC.tvm_target())
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 5, 64), dtype=np.float32), rng.standard_normal((128, 64), dtype=np.float32)
    y = tvm.runtime.tensor(np.zeros((1, 5, 128), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), y)
    np.testing.assert_allclose(y.numpy(), x @ w.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("change, why", [
    ({"target": "0123456789abcdef"}, "another target or version"),
    ({"structure": "0000000000000000"}, "a kernel since rewritten"),
    ({"params": {"tile_rows": 5, "tile_cols": 8}}, "a value outside the space"),
    ({"params": {"tile_rows": 2, "tile_cols": 3}}, "a tile that does not divide n"),
    ({"params": {"tile_rows": 2, "threads": 4}}, "an unknown parameter"),
])
def test_a_record_that_does_not_fit_is_never_applied(tmp_path, change, why):
    _write_lines(tmp_path / "db", [json.dumps(_record(**change))])
    records = database.Records.load([tmp_path / "db"], KEY["match"])
    _, used = _matmul(_record()["shape"], records)
    assert used["source"] == "default", why


def test_damaged_lines_are_skipped_counted_and_warned(tmp_path):
    good = json.dumps(_record())
    bad = [
        "{not json", good[: len(good) // 2], "[]", "null", "\x00\xff garbage",
        json.dumps(_record(seconds=-1.0)), json.dumps(_record(seconds="fast")), json.dumps(_record(format=99)),
        json.dumps({k: v for k, v in _record().items() if k != "params"}),
        json.dumps(_record(params={"tile_rows": True})),
    ]
    _write_lines(tmp_path / "db", [bad[0], good, *bad[1:]])
    warnings = []
    records = database.Records.load([tmp_path / "db"], KEY["match"], warn=warnings.append)
    assert records.damaged == len(bad) == len(warnings)
    assert sum(len(v) for v in records.by_key.values()) == 1
    assert all("line" in w and "skipped" in w for w in warnings)


def test_an_append_after_a_torn_line_keeps_the_new_record(tmp_path):
    db = tmp_path / "db"
    db.mkdir()
    (db / database.PARAMS).write_text(json.dumps(_record())[:40])  # a writer killed mid-line
    database.append(db, _record(seconds=2e-5))
    records = database.Records.load([db], KEY["match"], warn=lambda m: None)
    assert records.damaged == 1 and len(records.by_key[_record()["key"]]) == 1


def test_databases_merge_once_each_and_skip_damage(tmp_path):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _write_lines(a, [json.dumps(_record()), "{torn"])
    _write_lines(b, [json.dumps(_record()), json.dumps(_record(params={"tile_rows": 4, "tile_cols": 2}))])
    counts = database.merge(out, [a, b], warn=lambda m: None)
    assert counts == {"records": 2, "damaged_lines": 1, "duplicates": 1}
    assert len(database.Records.load([out], KEY["match"]).by_key[_record()["key"]]) == 2


def test_the_best_record_wins_and_reports_its_speedup_over_the_defaults(tmp_path):
    lines = [_record(params={"tile_rows": 4, "tile_cols": 4}, seconds=4e-5, default=True),
             _record(params={"tile_rows": 2, "tile_cols": 8}, seconds=2e-5),
             _record(params={"tile_rows": 1, "tile_cols": 8}, seconds=3e-5)]
    _write_lines(tmp_path / "db", [json.dumps(r) for r in lines])
    records = database.Records.load([tmp_path / "db"], KEY["match"])
    best = records.best(lines[0]["key"], lines[0]["structure"])
    assert best["params"] == {"tile_rows": 2, "tile_cols": 8} and best["speedup"] == 2.0


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_checkpoint):
    db = tmp_path_factory.mktemp("tuning") / "db"
    summary = tune(str(tiny_checkpoint), "llvm", db, trials=3, max_context=64, tir_trials=0, progress=lambda m: None)
    return db, summary


def test_tune_measures_every_matmul_of_the_engine_within_its_budget(tuned):
    db, summary = tuned
    kernels = summary["kernels"]
    # Two layers' q/k/v, o, gate/up, down and the vocabulary projection: five shapes, decode and prefill.
    assert len(kernels) == 10 and {k["shape"]["rows"] for k in kernels} == {1, "m"}
    lines = (db / database.PARAMS).read_text().splitlines()
    assert len(lines) == sum(k["trials"] for k in kernels)
    assert all(k["trials"] == min(3, k["choices"]) for k in kernels)
    # Each kernel's defaults were measured first, so every best is against them.
    assert all(k["speedup"] is not None and k["speedup"] >= 1.0 for k in kernels)


def test_a_rerun_measures_only_what_is_missing(tuned, tiny_checkpoint):
    db, summary = tuned
    before = (db / database.PARAMS).read_text().splitlines()
    again = tune(str(tiny_checkpoint), "llvm", db, trials=3, max_context=64, tir_trials=0, progress=lambda m: None)
    assert (db / database.PARAMS).read_text().splitlines() == before
    assert [k["best"] for k in again["kernels"]] == [k["best"] for k in summary["kernels"]]


def test_a_build_with_the_database_applies_it_and_matches_the_default_build(tuned, tiny_checkpoint, tmp_path):
    db, summary = tuned
    default = qwen2c.build(str(tiny_checkpoint), "llvm", tmp_path / "default", max_context=64, no_tuning=True)
    tuned_manifest = qwen2c.build(str(tiny_checkpoint), "llvm", tmp_path / "tuned", max_context=64, tuning_db=db)
    section = tuned_manifest["tuning"]
    assert section["databases"] == [str(db)] and section["kernels_tuned"] == len(summary["kernels"])
    applied = {json.dumps(k["shape"], sort_keys=True): k["params"] for k in section["kernels"] if k["source"] == "tuned"}
    for k in summary["kernels"]:
        assert applied[json.dumps(k["shape"], sort_keys=True)] == k["best"]
    assert default["tuning"]["kernels_tuned"] == 0 and default["tuning"]["kernels_default"] > 0
    assert tuned_manifest["parity"]["passed"]  # the build held the tuned engine to transformers
    prompt = [5, 17, 300, 2, 9]
    assert qwen2c.load(tmp_path / "tuned").generate(prompt, 6) == qwen2c.load(tmp_path / "default").generate(prompt, 6)


def _qwen2c(*args, **kw):
    return subprocess.run([sys.executable, "-m", "qwen2c.cli", *args], capture_output=True, text=True, **kw)


def test_a_killed_tuning_run_keeps_its_records_and_resumes(tiny_checkpoint, tmp_path):
    db = tmp_path / "db"
    cmd = [sys.executable, "-m", "qwen2c.cli", "tune", "--model", str(tiny_checkpoint), "--max-context", "64",
           "--trials", "4", "--tir-trials", "0", "--db", str(db)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            path = db / database.PARAMS
            if path.exists() and len(path.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the tuning run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    kept = [json.loads(line) for line in (db / database.PARAMS).read_text().splitlines() if line.strip().endswith("}")]
    assert len(kept) >= 3
    done = _qwen2c(*cmd[3:])
    assert done.returncode == 0, done.stderr
    records = database.Records.load([db], KEY["match"], warn=lambda m: None)
    measured = [r for rows in records.by_key.values() for r in rows]
    # Nothing measured twice, nothing lost: every kernel got its budget exactly once.
    assert len({(r["key"], database.canonical(r["params"])) for r in measured}) == len(measured)
    assert all(database.canonical(r["params"]) in {database.canonical(m["params"]) for m in measured} for r in kept)
    assert len(records.by_key) == 10


@pytest.mark.parametrize("argv, message", [
    (["tune"], "tune needs --model"),
    (["tune", "--model", "qwen2-tiny", "--rpc-tracker", "127.0.0.1:9190"], "--rpc-tracker and --rpc-key go together"),
    (["tune", "--model", "qwen2-tiny", "--trials", "0"], "--trials"),
    (["tune", "--model", "qwen2-tiny", "--target", "cuda"], "--rpc-tracker HOST:PORT"),
    (["tune", "merge", "--db", "out", "missing-db"], "missing-db: does not exist"),
    (["build", "--model", "qwen2-tiny", "-o", "e", "--tuning-db", "missing-db"], "--tuning-db missing-db: does not exist"),
    (["build", "--model", "qwen2-tiny", "-o", "e", "--tuning-db", "x", "--no-tuning"], "opposite"),
])
def test_bad_tuning_arguments_fail_before_any_work(argv, message, tmp_path):
    if "x" in argv:
        (tmp_path / "x").mkdir()
    result = _qwen2c(*argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "e").exists() and not (tmp_path / "out").exists()


def test_shipped_records_are_valid_and_fit_todays_kernels_of_the_presets():
    """Every shipped record parses, is in its kernel's space, and was made for the kernel as it is
    today: lowering the preset finds a kernel of that key and structure (a kernel rewritten since
    would leave its records unused, and this fails until they are measured again)."""
    from qwen2c.autotune.apply import SHIPPED
    from qwen2c.autotune.tuner import find_tasks, own_tasks

    lines = (SHIPPED / database.PARAMS).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all(database.validate(r) is None for r in records)
    for (target, dtype, bits), group in _groups(records).items():
        found = find_tasks("qwen2-0.5b", target, dtype, progress=lambda m: None,
                           quantize={None: None, 8: "int8", 4: "int4"}[bits])
        structures = {t.key: t.structure() for t in own_tasks(found)}
        assert {r["key"] for r in group} <= set(structures)
        assert all(structures[r["key"]] == r["structure"] for r in group)
        spaces = {r["key"]: params.SPACES[r["kernel"]] for r in group}
        assert all(spaces[r["key"]].valid(r["shape"], r["params"]) for r in group)


def _groups(records):
    groups = {}
    for r in records:
        groups.setdefault((r["target_name"], r["shape"]["dtype"], r["shape"].get("bits")), []).append(r)
    return groups


def test_a_build_of_the_preset_applies_the_shipped_records_only_where_the_target_matches():
    from qwen2c.autotune.apply import SHIPPED, context_for
    from qwen2c.autotune.target_key import target_key

    for name in ("llvm-avx512-vnni", "llvm-avx512", "llvm-avx2"):
        spec = TARGETS.resolve(name)
        context = context_for(spec, None, progress=lambda m: None)
        shipped = [json.loads(line) for line in (SHIPPED / database.PARAMS).read_text().splitlines()]
        matching = [r for r in shipped if r["target"] == target_key(spec)["match"]]
        assert sum(len(v) for v in context.records.by_key.values()) == len(matching)
        assert context.records.foreign == len(shipped) - len(matching)


def test_a_choice_within_the_noise_of_the_defaults_does_not_replace_them(tmp_path):
    default = _record(params={"tile_rows": 4, "tile_cols": 4}, seconds=4.00e-5, default=True)
    lines = [default, _record(params={"tile_rows": 2, "tile_cols": 8}, seconds=3.95e-5)]
    _write_lines(tmp_path / "db", [json.dumps(r) for r in lines])
    best = database.Records.load([tmp_path / "db"], KEY["match"]).best(default["key"], default["structure"])
    assert best["params"] == default["params"] and best["speedup"] == 1.0


def test_decode_kernels_are_timed_on_a_new_copy_of_their_weights_each_call(monkeypatch):
    """A decode kernel's timed calls go round copies of every input but the activations (first) and
    the output (last) that together hold twice the last-level cache, so no call finds its weights in
    cache (as a decode step does not); the activations and the output are shared."""
    from qwen2c.autotune import tuner

    monkeypatch.setattr(tuner, "last_level_cache_bytes", lambda: 3 * 4096)  # 2x: 24 KiB of copies
    arrays = [np.ones(4, np.float32), np.zeros((1024,), np.float32), np.zeros(8, np.float32)]  # 4 KiB weight
    dev = tvm.cpu(0)
    tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
    seen = []
    tuner._time_streamed(lambda x, w, out: seen.append((x, w, out)), arrays, tensors, dev)
    weights = {id(w) for _, w, _ in seen}
    assert len(weights) == 6  # 24 KiB / 4 KiB
    assert len(seen) == 6 + max(tuner.COLD_REPEATS, 6)  # one warm-up pass, then the timed calls
    assert all(x is tensors[0] and out is tensors[-1] for x, _, out in seen)
    timed = [id(w) for _, w, _ in seen[6:]]
    assert all(a != b for a, b in zip(timed, timed[1:]))  # never the same copy twice running


def test_the_last_level_cache_is_the_largest_sysfs_gives_or_assumed_large(tmp_path):
    from qwen2c.autotune import tuner

    for index, size in (("index0", "48K"), ("index2", "1024K"), ("index3", "32768K"), ("index4", "bogus")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert tuner.last_level_cache_bytes(tmp_path) == 32 << 20
    assert tuner.last_level_cache_bytes(tmp_path / "absent") == tuner.COLD_DEFAULT_CACHE
