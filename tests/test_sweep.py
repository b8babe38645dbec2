"""`qwen2c tune sweep SPEC`: spec checks, a small sweep's outputs, and a sweep killed and resumed.

Speed is never asserted: what is checked is that every point was timed (ratios present and computed
from the same run's numbers), that each point's engine continued the prompt as transformers does,
that bad specs are refused before any work with the field named, and that a killed or interrupted
sweep resumes without redoing or losing a point.
"""

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qwen2c import engine_dir
from qwen2c.autotune.sweep import plan_points, run_sweep
from qwen2c.autotune.sweep_spec import load_spec
from qwen2c.bench.harness import prompt_ids
from qwen2c.cli import main

MEASURE = """
[measure]
prompt = [12]
decode_context = [6]
decode_steps = 3
rounds = 1
"""


def write_spec(folder: Path, model: Path, grid: str, measure: str = MEASURE, extra: str = "") -> Path:
    spec = folder / "spec.toml"
    spec.write_text(f'model = "{model}"\ntarget = "llvm"\nmax_context = 32\n{extra}{measure}\n[grid]\n{grid}\n')
    return spec


CPUS = len(os.sched_getaffinity(0))


@pytest.mark.parametrize("body, field", [
    ('target = "llvm"\n[grid]\nthreads = [1]\n', "model: required"),
    ('model = "qwen2-tiny"\n[grid]\nthreads = [1]\ncolour = ["red"]\n', "grid.colour: unknown key"),
    ('model = "qwen2-tiny"\nspeed = 3\n[grid]\nthreads = [1]\n', "speed: unknown key"),
    ('model = "qwen2-tiny"\n[grid]\nthreads = []\n', "grid.threads: empty list"),
    ('model = "qwen2-tiny"\n[grid]\nthreads = 2\n', "grid.threads: expected a list"),
    ('model = "qwen2-tiny"\n[grid]\nthreads = ["two"]\n', "grid.threads: expected integers"),
    (f'model = "qwen2-tiny"\n[grid]\nthreads = [{CPUS + 1}]\n', f"grid.threads: {CPUS + 1}: more threads than"),
    ('model = "qwen2-tiny"\n[grid]\ndtype = ["float64"]\n', "grid.dtype: unknown dtype 'float64'"),
    ('model = "qwen2-tiny"\n[grid]\nbackend = ["tflite"]\n', "grid.backend: unknown backend 'tflite'"),
    ('model = "qwen2-tiny"\n[grid]\nquantize = ["int3"]\n', "grid.quantize: unknown quantize 'int3'"),
    ('model = "qwen2-tiny"\n[grid]\ntrials = [0, -1]\n', "grid.trials: -1: must be at least 0"),
    ('model = "qwen2-tiny"\n[grid]\npage_size = [16, 32]\n', "grid.page_size: [32]: qwen2c's engines use KV-cache pages of 16"),
    ('model = "qwen2-tiny"\n[measure]\nrounds = 0\n[grid]\nthreads = [1]\n', "measure.rounds: 0: must be at least 1"),
    ('model = "qwen2-tiny"\n[measure]\nwarmup = 1\n[grid]\nthreads = [1]\n', "measure.warmup: unknown key"),
    ('model = "qwen2-tiny"\nmax_context = 16\n[measure]\nprompt = [64]\n[grid]\nthreads = [1]\n',
     "measure.prompt: 64 tokens is longer than max_context 16"),
    ('model = "qwen2-tiny"\n', "grid: required"),
    ('model = "qwen2-tiny"\n[grid\n', "not valid TOML"),
    ('model = "no-such-preset"\n[grid]\nthreads = [1]\n', "model: "),
    ('model = "qwen2-tiny"\ntarget = "z80"\n[grid]\nthreads = [1]\n', "target: unknown target 'z80'"),
    pytest.param('model = "qwen2-tiny"\ntarget = "cuda"\n[grid]\nthreads = [1]\n', "do not run on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU here runs CUDA engines")),
])
def test_bad_specs_are_refused_naming_the_field(tmp_path, capsys, body, field):
    spec = tmp_path / "bad.toml"
    spec.write_text(body)
    assert main(["tune", "sweep", str(spec), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert field in err and str(spec) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "engines").exists()  # refused before any work


HAVE_ORT = all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxscript"))


@pytest.mark.skipif(not HAVE_ORT, reason="the onnxruntime backend needs onnx, onnxscript, onnxruntime")
def test_combinations_a_backend_refuses_are_left_out_with_its_reason(tmp_path, tiny_checkpoint):
    spec = load_spec(write_spec(tmp_path, tiny_checkpoint, 'backend = ["tvm", "onnxruntime"]\n'
                                                           'quantize = ["none", "int8"]\ndtype = ["float32", "bfloat16"]'))
    points, left_out = plan_points(spec)
    runs = [(p["backend"], p["quantize"], p["dtype"]) for p in points]
    assert runs == [("tvm", q, d) for d in ("float32", "bfloat16") for q in ("none", "int8")] + \
        [("onnxruntime", "none", "float32")]
    assert len(left_out) == 3
    assert sum("quantized weights are a TVM-engine format" in line for line in left_out) == 2
    assert any(line.startswith("backend onnxruntime, dtype bfloat16, quantize none: ") and "no bfloat16 kernels" in line
               for line in left_out)
    # With a runtime knob too, still one line per build configuration refused.
    threads = "[1, 2]" if CPUS > 1 else "[1]"
    spec = load_spec(write_spec(tmp_path, tiny_checkpoint,
                                f'backend = ["tvm", "onnxruntime"]\nquantize = ["int8"]\nthreads = {threads}'))
    points, left_out = plan_points(spec)
    assert [p["backend"] for p in points] == ["tvm"] * len(spec.grid["threads"])
    assert len(left_out) == 1 and left_out[0].startswith("backend onnxruntime, quantize int8" +
                                                         (" (2 points): " if CPUS > 1 else ": "))


@pytest.mark.skipif(not HAVE_ORT or importlib.util.find_spec("qwen2c.autotune.tuner") is None,
                    reason="needs the onnxruntime backend and qwen2c.autotune.tuner")
def test_tuned_points_of_an_untuned_backend_are_left_out(tmp_path, tiny_checkpoint):
    spec = load_spec(write_spec(tmp_path, tiny_checkpoint, 'trials = [0, 8]\nbackend = ["tvm", "onnxruntime"]'))
    points, left_out = plan_points(spec)
    assert points == [{"trials": 0, "backend": "tvm"}, {"trials": 0, "backend": "onnxruntime"},
                      {"trials": 8, "backend": "tvm"}]
    assert left_out == ["trials 8, backend onnxruntime: trials 8: `qwen2c tune` tunes TVM's kernels; the onnxruntime "
                        "backend has none"]


def _greedy(checkpoint: Path, context: int, steps: int) -> list[int]:
    """What transformers continues the benchmark's decode prompt with: the tokens after the first."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = torch.tensor([prompt_ids(model.config.vocab_size, context)])
    out = model.generate(ids, max_new_tokens=steps + 1, do_sample=False, min_new_tokens=steps + 1)
    return out[0, context + 1:].tolist()


@pytest.fixture(scope="module")
def two_points(tmp_path_factory, tiny_checkpoint):
    folder = tmp_path_factory.mktemp("sweep")
    spec = write_spec(folder, tiny_checkpoint, "threads = [1, 2]" if CPUS > 1 else "dtype = [\"float32\", \"bfloat16\"]")
    lines: list[str] = []
    result = run_sweep(spec, folder / "out", progress=lines.append)
    return spec, folder / "out", result, lines


def test_a_sweep_writes_csv_json_and_plot_naming_the_best(two_points, tiny_checkpoint):
    spec, out, result, _ = two_points
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] and len(saved["points"]) == 2 and saved["fingerprint"] == load_spec(spec).fingerprint()
    base, other = saved["points"]
    assert base["baseline"] and base["decode_ratio"] == 1.0 and base["prefill_ratio"] == 1.0
    # The other point's ratio is its speed over the baseline engine's, both timed in its own run.
    d = other["decode"]["6"]
    assert d["ratio"] == pytest.approx(d["baseline_ms_per_token"] / d["ms_per_token"])
    p = other["prefill"]["12"]
    assert p["ratio"] == pytest.approx(p["tok_s"] / p["baseline_tok_s"]) and p["tok_s"] > 0
    # Every point is the model transformers runs: the same greedy continuation of the same prompt.
    expected = _greedy(tiny_checkpoint, 6, 3)
    for r in saved["points"]:
        if r["knobs"].get("dtype", "float32") == "float32":
            assert r["decode"]["6"]["tokens"] == expected, r["knobs"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [int(r["point"]) for r in rows] == [1, 2]
    assert float(rows[1]["decode_ratio@6"]) == pytest.approx(other["decode"]["6"]["ratio"], rel=1e-3)
    best = saved["best"]["decode"]
    assert best["ratio"] == max(r["decode_ratio"] for r in saved["points"])
    if importlib.util.find_spec("matplotlib"):
        import matplotlib.image

        assert matplotlib.image.imread(out / "results.png").shape[2] in (3, 4)
    # One engine serves both thread counts: built once.
    assert len([e for e in (out / "engines").iterdir() if not e.name.startswith(".")]) == (1 if CPUS > 1 else 2)


def test_the_summary_names_the_best_configuration(two_points):
    from qwen2c.autotune.sweep_report import format_summary

    _, _, result, _ = two_points
    text = format_summary(result)
    best = result["best"]["prefill"]
    assert f"best for prefill: point {best['point']}" in text and "best for decode: point" in text


def test_a_changed_spec_is_refused_unless_restarted(two_points, tiny_checkpoint, capsys):
    spec, out, result, _ = two_points
    before = (out / "points.jsonl").read_text()
    changed = spec.with_name("changed.toml")
    changed.write_text(spec.read_text().replace("rounds = 1", "rounds = 2"))
    assert main(["tune", "sweep", str(changed), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a sweep of another spec (changed: measure)" in err and "--restart" in err
    assert (out / "points.jsonl").read_text() == before  # nothing of the earlier sweep was touched
    # A rerun of the same spec has nothing left to do.
    assert main(["tune", "sweep", str(spec), "-o", str(out)]) == 0
    assert "resuming: 2 of 2 points already measured; 0 to go" in capsys.readouterr().err
    assert (out / "points.jsonl").read_text() == before
    # --restart: the old points go, the new spec's are measured, on the engines already built.
    assert main(["tune", "sweep", str(changed), "-o", str(out), "--restart"]) == 0
    assert "building" not in capsys.readouterr().err
    points = _points(out)
    assert len(points) == 2 and {p["fingerprint"] for p in points} == {load_spec(changed).fingerprint()}
    assert json.loads((out / "results.json").read_text())["spec"]["measure"]["rounds"] == 2


def _points(out: Path) -> list[dict]:
    path = out / "points.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _start(spec: Path, out: Path, log: Path) -> subprocess.Popen:
    """The sweep as a user runs it, its output (progress on stderr) into ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "qwen2c.cli", "tune", "sweep", str(spec), "-o", str(out)],
                                stdout=f, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the sweep ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_killed_sweep_resumes_where_it_stopped(tmp_path, tiny_checkpoint):
    # Two dtypes: the second point needs an engine of its own, so the kill lands in its build.
    spec = write_spec(tmp_path, tiny_checkpoint, 'dtype = ["float32", "bfloat16"]')
    out, log = tmp_path / "out", tmp_path / "log"
    proc = _start(spec, out, log)
    _wait_for(proc, lambda: len(_points(out)) == 1, "the first point was recorded")
    _wait_for(proc, lambda: "building bfloat16" in log.read_text(), "the second engine's build started")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = _points(out)
    assert len(first) == 1 and first[0]["knobs"] == {"dtype": "float32"}
    published = [p.name for p in (out / "engines").iterdir() if not p.name.startswith(".")]
    assert len(published) == 1 and published[0].startswith("float32")  # no half-written engine

    # Ctrl-C in the resumed run's build: exit 130 and one line saying what is done and how to resume.
    proc = _start(spec, out, log)
    _wait_for(proc, lambda: "building bfloat16" in log.read_text(), "the second build started again")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()
    last = log.read_text().strip().splitlines()[-1]
    assert "interrupted; 1 of 2 points are recorded" in last and f"-o {out}` resumes" in last, last
    assert "resuming: 1 of 2 points already measured; 1 to go" in log.read_text()
    assert len(_points(out)) == 1

    # Killed again while the second point is being timed (its engine is built by then).
    proc = _start(spec, out, log)
    _wait_for(proc, lambda: "loading baseline" in log.read_text(), "the second point's benchmark started")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_points(out)) == 1
    deadline = time.monotonic() + 60  # its benchmark workers see their pipe close and end
    while _processes_naming(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_naming(out)

    proc = _start(spec, out, log)
    assert proc.wait(timeout=600) == 0, log.read_text()
    text = log.read_text()
    assert "resuming: 1 of 2 points already measured; 1 to go" in text and "best for decode: point" in text
    assert "building" not in text  # the engine built before the last kill was kept
    points = _points(out)
    assert len(points) == 2 and points[0] == first[0]  # the finished point was kept, not measured again
    assert points[1]["knobs"] == {"dtype": "bfloat16"} and points[1]["decode_ratio"] > 0
    engines = sorted(p for p in (out / "engines").iterdir())
    assert [p.name.split("-")[0] for p in engines] == ["bfloat16", "float32"]  # no staging left behind
    for e in engines:
        engine_dir.read_manifest(e, verify=True)  # complete, every checksum right
    assert json.loads((out / "results.json").read_text())["complete"]


@pytest.mark.skipif(importlib.util.find_spec("qwen2c.autotune.tuner") is None, reason="needs qwen2c.autotune.tuner")
def test_tuned_points_build_with_their_tuning_database(tmp_path, tiny_checkpoint):
    spec = write_spec(tmp_path, tiny_checkpoint, "trials = [0, 2]", measure=MEASURE)
    result = run_sweep(spec, tmp_path / "out", progress=lambda m: None)
    assert [r["knobs"] for r in result["points"]] == [{"trials": 0}, {"trials": 2}]
    tuning = {r["knobs"]["trials"]: json.loads((tmp_path / "out" / r["engine"] / "manifest.json").read_text())["tuning"]
              for r in result["points"]}
    # trials 0: every kernel at its default (not even the shipped records); trials 2: this sweep's database.
    assert tuning[0]["kernels_tuned"] == 0 and tuning[0]["databases"] == []
    assert tuning[2]["kernels_tuned"] > 0 and tuning[2]["databases"] == [str(tmp_path / "out" / "tuning" /
                                                                            Path(result["points"][1]["engine"]).name)]
    assert (tmp_path / "out" / "tuning" / Path(result["points"][1]["engine"]).name / "sweep-tuned.json").exists()
    assert result["points"][1]["decode_ratio"] > 0 and result["complete"]


def _processes_naming(path: Path) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if str(path).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:  # ended meanwhile
            pass
    return found
