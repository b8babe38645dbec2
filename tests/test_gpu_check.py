"""The GPU check (qwen2c/gpu_check.py, its pieces in qwen2c/gpu_measure.py): its dry run on a pack of
tiny CUDA engines, and the pieces of the real run that run on a CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import moe_config, small_config, write_checkpoint, write_moe_checkpoint

import qwen2c
from qwen2c import engine_dir, gpu_check, gpu_measure
from qwen2c.errors import BackendUnavailableError
from qwen2c.pack import pack
from qwen2c.presets import preset_config

REPO = Path(__file__).parents[1]
# Small enough for engines built with --max-context 64; the real run uses 128 / 128 / 128,1024.
SIZES = ["--prompt-tokens", "16", "--new-tokens", "16", "--prefill-tokens", "16,48"]


# The real run's steps, from a pack of CPU engines, in a process set up by env.sh as on the GPU
# machine; only what needs CUDA is replaced: the copy bandwidth, and the torch.compile child.
CPU_RUN = """
import sys
from pathlib import Path
from qwen2c import gpu_check as g

g.measure_bandwidth = lambda nbytes: {"GB_s": 50.0, "bytes_moved": 2 * nbytes, "median_ms": 80.0}

def compile_worker(engine, sizes, out, name, timeout):
    timing = {"median_s": 0.01, "min_s": 0.01, "max_s": 0.01, "warmup": 2, "repeats": 5}
    decode = {**g.decode_rate(timing, sizes.new_tokens), "tokens": [1] * sizes.new_tokens}
    return {"mode": g.COMPILE_MODE, "decode": decode,
            **{f"prefill {n}": g.rate(timing, n) for n in sizes.prefill}, "seconds": 1.0}

g.run_compile_worker = compile_worker
check = g.GpuCheck(Path(sys.argv[1]), Path(sys.argv[2]), g.Sizes(16, 8, (16, 40)), device="cpu")
code = check.run()
print(g.format_table(check.results))
sys.exit(code)
"""


def run_check(pack_dir: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """tools/gpu_check.sh on ``pack_dir``, as the device call runs it (from the repository root)."""
    out.mkdir(parents=True)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
           "OUT": str(out), "GPU_CHECK_PACK": str(pack_dir), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)


@pytest.fixture(scope="module")
def gpu_pack(tmp_path_factory) -> Path:
    """A pack as tools/prepare_gpu_check.sh makes it (CUDA, bfloat16, no weights, no tokenizer), of
    a tiny dense and a tiny MoE engine, for this Python."""
    root = tmp_path_factory.mktemp("gpu")
    engines = []
    for name, write in (("dense", write_checkpoint), ("moe", write_moe_checkpoint)):
        checkpoint = write(root / f"{name}-checkpoint")
        try:
            qwen2c.build(str(checkpoint), "cuda", root / name, dtype="bfloat16", max_context=64)
        except BackendUnavailableError as e:  # no nvcc here
            pytest.skip(f"CUDA engines cannot be built here: {e}")
        engines.append(root / name)
    out = root / "pack"
    pack(engines, out, weights=False, tokenizer=False)
    return out


@pytest.fixture(scope="module")
def cpu_pack(tmp_path_factory) -> Path:
    """The same pack of CPU (llvm) engines, for the real run's steps."""
    root = tmp_path_factory.mktemp("cpu")
    engines = []
    for name, write in (("dense", write_checkpoint), ("moe", write_moe_checkpoint)):
        qwen2c.build(str(write(root / f"{name}-checkpoint")), "llvm", root / name, dtype="bfloat16", max_context=64)
        engines.append(root / name)
    pack(engines, root / "pack", weights=False, tokenizer=False)
    return root / "pack"


@pytest.fixture(scope="module")
def dry_run(gpu_pack, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dry") / "out"
    done = run_check(gpu_pack, out, "--dry-run", *SIZES)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / gpu_check.RESULTS).read_text())


def test_dry_run_plans_every_measurement_for_every_packed_engine(dry_run, gpu_pack):
    names = [e["name"] for e in json.loads((gpu_pack / "pack.json").read_text())["engines"]]
    assert sorted(names) == ["dense", "moe"]
    plan = dry_run["plan"]
    assert {"step": "bandwidth", "bytes": gpu_check.COPY_BYTES} in plan
    for name in names:
        steps = [s for s in plan if s.get("engine") == name]
        kinds = [s["step"] for s in steps]
        assert kinds.count("parity") == kinds.count("decode") == kinds.count("torch.compile") == 1, kinds
        assert sorted(s["tokens"] for s in steps if s["step"] == "prefill") == [16, 48]
        assert [s["routing"] for s in steps if s["step"] == "parity"] == [name == "moe"]
        decode = next(s for s in steps if s["step"] == "decode")
        assert (decode["prompt"], decode["new_tokens"]) == (16, 16)
        assert next(s for s in steps if s["step"] == "roofline")["weight_bytes_per_token"] > 0
    assert dry_run["mode"] == "dry-run" and not dry_run["errors"]
    assert dry_run["environment"]["qwen2c"] == str(gpu_pack / "site" / "qwen2c")
    assert dry_run["reference"]["passed"]


def test_dry_run_writes_weights_the_manifest_accepts_and_leaves_the_pack_alone(dry_run, gpu_pack):
    for name, result in dry_run["engines"].items():
        weights = Path(result["weights"]["file"])
        manifest = json.loads((gpu_pack / "engines" / name / engine_dir.MANIFEST).read_text())
        assert engine_dir.weights_spec(weights) == manifest["expected_weights"]
        keys = {p["key"] for p in manifest["params"]}
        assert result["weights"]["tensors"] == len(keys)
        assert not (gpu_pack / "engines" / name / engine_dir.WEIGHTS).exists()


def test_dry_run_loads_each_engine_up_to_its_first_cuda_call_with_tvm_runtime_only(dry_run):
    for result in dry_run["engines"].values():
        assert result["load"]["stopped"].startswith("at the first CUDA call")
        tvm = result["load"]["tvm"]
        assert tvm["passed"] and tvm["from_pack"] and tvm["compiler_unmapped"] and tvm["cuda_runtime_present"], tvm


def test_sizes_beyond_an_engine_context_are_refused_before_anything_runs(gpu_pack, tmp_path):
    done = run_check(gpu_pack, tmp_path / "out", "--dry-run", "--prefill-tokens", "16,1024")
    assert done.returncode == 2
    assert "needs 1024 tokens of context" in done.stdout and "--max-context 1024" in done.stdout
    assert not (tmp_path / "out" / gpu_check.RESULTS).exists()


def test_refuses_to_check_a_qwen2c_other_than_the_packed_one(gpu_pack, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no env.sh: the installed qwen2c
    done = subprocess.run([sys.executable, "-m", "qwen2c.gpu_check", "--pack", str(gpu_pack), "--out", str(tmp_path),
                           "--dry-run"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 2 and "env.sh" in done.stderr


def test_decode_weight_bytes_tied_dense_and_untied_moe():
    dense = preset_config("qwen2-0.5b")  # tied: the output projection is the embedding, read once
    assert gpu_measure.decode_weight_bytes(dense, "bfloat16") == 2 * 494_032_768
    moe = preset_config("qwen2-moe-tiny")
    hf = qwen2c.checkpoint.hf_config(moe)
    active = qwen2c.model_config.active_param_count(hf)
    assert gpu_measure.decode_weight_bytes(moe, "bfloat16") == 2 * (active - hf.vocab_size * hf.hidden_size)
    roof = gpu_measure.roofline(dense, "bfloat16", 4000.0, {"engine": 1.0})
    assert roof["floor_ms_per_token"] == pytest.approx(2 * 494_032_768 / 4e12 * 1e3)
    assert roof["percent_of_roofline"]["engine"] == pytest.approx(100 * roof["floor_ms_per_token"])


def test_seeded_model_perturbs_biases_and_makes_routing_decisive():
    model = gpu_measure.seeded_model(moe_config(), "bfloat16", "cpu", seed=3)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    assert params["model.layers.0.self_attn.q_proj.bias"].abs().max() > 0
    assert params["model.layers.0.mlp.gate.weight"].float().std() > 2.0 / 64**0.5
    again = gpu_measure.seeded_model(moe_config(), "bfloat16", "cpu", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(params.values(), again.parameters()))


def test_reference_decode_through_the_cache_matches_a_full_forward():
    assert gpu_measure.check_reference_cache("cpu")["passed"]


def test_torch_decode_timing_feeds_the_greedy_tokens_generate_picks():
    model = gpu_measure.seeded_model(small_config(), "float32", "cpu", seed=1)
    prompt = [3, 14, 15, 92, 65]
    timing, tokens = gpu_measure.time_torch_decode(model, model, gpu_measure.dynamic_cache(model), prompt, 6, (0, 2))
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=7, do_sample=False)[0, len(prompt) + 1:]
    assert tokens == expected.tolist()
    assert timing["repeats"] == 2 and timing["median_s"] > 0


def test_real_run_steps_on_cpu_engines(cpu_pack, tmp_path):
    script = f'. "{cpu_pack}/env.sh" && exec "{sys.executable}" -c "$0" "$@"'
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(["bash", "-c", script, CPU_RUN, str(cpu_pack), str(tmp_path / "out")], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "out" / gpu_check.RESULTS).read_text())
    assert not results["errors"] and not results["skipped"] and results["reference"]["passed"]
    for name, r in results["engines"].items():
        assert (cpu_pack / "engines" / name / engine_dir.WEIGHTS).is_file()  # the real run writes into the pack
        assert r["load"]["tvm"]["passed"]
        assert r["parity"]["passed"] and (r["parity"]["routing"] is not None) == (name == "moe")
        assert set(r["prefill"]) == {"16", "40"}
        assert all(set(t) == {"engine", "eager", "torch.compile"} for t in r["prefill"].values())
        assert set(r["decode"]) == {"engine", "eager", "torch.compile"}
        assert 0 <= r["decode"]["engine"]["agrees_with_eager_for"] <= 8
        floor = r["roofline"]["floor_ms_per_token"]
        assert floor == pytest.approx(r["roofline"]["weight_bytes_per_token"] / 50e9 * 1e3)
        for contender, percent in r["roofline"]["percent_of_roofline"].items():
            assert percent == pytest.approx(100 * floor / r["decode"][contender]["ms_per_token"])
        assert f"{name} (bfloat16" in done.stdout
