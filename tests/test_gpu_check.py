"""The GPU check (qwen2c/gpu_check.py): its dry run on a pack of tiny CUDA engines, and the pieces of
the real run that run on a CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import moe_config, small_config, write_checkpoint, write_moe_checkpoint

import qwen2c
from qwen2c import engine_dir, gpu_check
from qwen2c.errors import BackendUnavailableError
from qwen2c.pack import pack
from qwen2c.presets import preset_config

# Small enough for engines built with --max-context 64; the real run uses 128 / 128 / 128,1024.
SIZES = ["--prompt-tokens", "16", "--new-tokens", "16", "--prefill-tokens", "16,48"]


@pytest.fixture(scope="module")
def gpu_pack(tmp_path_factory) -> Path:
    """A pack as tools/prepare_gpu_check.sh makes it (CUDA, bfloat16, no weights, no tokenizer), of
    a tiny dense and a tiny MoE engine, for this Python."""
    root = tmp_path_factory.mktemp("gpu")
    engines = []
    for name, write in (("dense", write_checkpoint),):
        checkpoint = write(root / f"{name}-checkpoint")
        try:
            qwen2c.build(str(checkpoint), "cuda", root / name, dtype="bfloat16", max_context=64)
        except BackendUnavailableError as e:  # no nvcc here
            pytest.skip(f"CUDA engines cannot be built here: {e}")
        engines.append(root / name)
    out = root / "pack"
    pack(engines, out, weights=False, tokenizer=False)
    return out


def run_check(pack_dir: Path, out: Path, *args: str, source_env: bool = True) -> subprocess.CompletedProcess:
    """``python -m qwen2c.gpu_check`` as tools/gpu_check.sh runs it: after ``. env.sh``, outside the repository."""
    command = f'exec "{sys.executable}" -m qwen2c.gpu_check "$@"'
    if source_env:
        command = f'. "{pack_dir}/env.sh" && {command}'
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(["bash", "-c", command, "gpu_check", "--pack", str(pack_dir), "--out", str(out), *args],
                          capture_output=True, text=True, cwd=out.parent, env=env, timeout=600)


@pytest.fixture(scope="module")
def dry_run(gpu_pack, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dry") / "out"
    done = run_check(gpu_pack, out, "--dry-run", *SIZES)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / gpu_check.RESULTS).read_text())


def test_dry_run_plans_every_measurement_for_every_packed_engine(dry_run, gpu_pack):
    names = [e["name"] for e in json.loads((gpu_pack / "pack.json").read_text())["engines"]]
    assert sorted(names) == ["dense"]
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


def test_dry_run_loads_each_engine_up_to_its_first_cuda_call_with_tvm_runtime_only(dry_run, gpu_pack):
    for result in dry_run["engines"].values():
        assert result["load"]["stopped"].startswith("at the first CUDA call")
        tvm = result["load"]["tvm"]
        assert tvm["passed"] and tvm["from_pack"] and tvm["compiler_unmapped"] and tvm["cuda_runtime_present"], tvm


def test_sizes_beyond_an_engine_context_are_refused_before_anything_runs(gpu_pack, tmp_path):
    done = run_check(gpu_pack, tmp_path / "out", "--dry-run", "--prefill-tokens", "16,1024")
    assert done.returncode == 2
    assert "needs 1024 tokens of context" in done.stderr and "--max-context 1024" in done.stderr
    assert not (tmp_path / "out").exists()


def test_refuses_to_check_a_qwen2c_other_than_the_packed_one(gpu_pack, tmp_path):
    done = run_check(gpu_pack, tmp_path / "out", "--dry-run", *SIZES, source_env=False)
    assert done.returncode == 2 and "env.sh" in done.stderr


def test_decode_weight_bytes_tied_dense_and_untied_moe():
    dense = preset_config("qwen2-0.5b")  # tied: the output projection is the embedding, read once
    assert gpu_check.decode_weight_bytes(dense, "bfloat16") == 2 * 494_032_768
    moe = preset_config("qwen2-moe-tiny")
    hf = qwen2c.checkpoint.hf_config(moe)
    active = qwen2c.model_config.active_param_count(hf)
    assert gpu_check.decode_weight_bytes(moe, "bfloat16") == 2 * (active - hf.vocab_size * hf.hidden_size)
    roof = gpu_check.roofline(dense, "bfloat16", 4000.0, {"engine": 1.0})
    assert roof["floor_ms_per_token"] == pytest.approx(2 * 494_032_768 / 4e12 * 1e3)
    assert roof["percent_of_roofline"]["engine"] == pytest.approx(100 * roof["floor_ms_per_token"])


def test_seeded_model_perturbs_biases_and_makes_routing_decisive():
    model = gpu_check.seeded_model(moe_config(), "bfloat16", "cpu", seed=3)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    assert params["model.layers.0.self_attn.q_proj.bias"].abs().max() > 0
    assert params["model.layers.0.mlp.gate.weight"].float().std() > 2.0 / 64**0.5
    again = gpu_check.seeded_model(moe_config(), "bfloat16", "cpu", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(params.values(), again.parameters()))


def test_reference_decode_through_the_cache_matches_a_full_forward():
    assert gpu_check.check_reference_cache("cpu")["passed"]


def test_torch_decode_timing_feeds_the_greedy_tokens_generate_picks():
    model = gpu_check.seeded_model(small_config(), "float32", "cpu", seed=1)
    prompt = [3, 14, 15, 92, 65]
    timing, tokens = gpu_check.time_torch_decode(model, model, gpu_check._dynamic_cache(model), prompt, 6, (0, 2))
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=7, do_sample=False)[0, len(prompt) + 1:]
    assert tokens == expected.tolist()
    assert timing["repeats"] == 2 and timing["median_s"] > 0
