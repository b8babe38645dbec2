"""bfloat16 and float16 engines on the CPU, checked step by step against transformers.

The reference is transformers in float32 on the same (half-precision) weights; transformers run in
the half dtype measures what the dtype itself costs, and the engine is held to a small factor of it.
"""

import json

import numpy as np
import pytest
import torch

import qwen2c
from conftest import read_manifest, write_checkpoint, write_moe_checkpoint
from qwen2c.checkpoint import checkpoint_dtype, load_reference, resolve_model
from qwen2c.graphs.export import export_model
from qwen2c.graphs.pipeline import run_passes
from qwen2c.parity import _half_precision_verdict, reference_steps
from qwen2c.tolerances import HALF_ERROR_FACTOR

HALF = ["bfloat16", "float16"]


def _safetensors_dtypes(path) -> set[str]:
    header = path.read_bytes()
    size = int.from_bytes(header[:8], "little")
    meta = json.loads(header[8:8 + size])
    return {v["dtype"] for k, v in meta.items() if k != "__metadata__"}


@pytest.mark.parametrize("dtype", HALF)
def test_half_engine_matches_transformers_float32_within_the_dtypes_own_error(tmp_path, dtype):
    from transformers import Qwen2ForCausalLM

    ckpt = write_checkpoint(tmp_path / "ckpt", seed=5, dtype="bfloat16", hidden_size=96, num_attention_heads=6,
                            num_key_value_heads=2, tie_word_embeddings=False)
    manifest = qwen2c.build(str(ckpt), "llvm", tmp_path / "engine", dtype=dtype, max_context=48)
    report = manifest["parity"]
    assert manifest["dtype"] == dtype and report["passed"]
    assert report["transformers_max_abs_err"] > 0  # the dtype does cost something: the bound is not vacuous
    assert report["max_abs_err"] <= HALF_ERROR_FACTOR * report["transformers_max_abs_err"]
    assert _safetensors_dtypes(tmp_path / "engine" / "model.safetensors") == {"BF16" if dtype == "bfloat16" else "F16"}

    # Independently of the build's report: the engine against transformers float32, step by step.
    engine = qwen2c.load(tmp_path / "engine")
    ref32 = Qwen2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ref_half = Qwen2ForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype)).eval()
    prompt = [5, 17, 3, 99, 42, 7, 1, 0, 63, 300]
    expected, fed, _ = reference_steps(ref32, prompt, steps=6)
    in_dtype, _, _ = reference_steps(ref_half, prompt, steps=6, feed=fed)
    session = engine.session()
    got = [session.prefill(prompt)] + [session.decode(t) for t in fed]
    hf_err = max(float(np.abs(h - e).max()) for h, e in zip(in_dtype, expected))
    for step, (g, e) in enumerate(zip(got, expected)):
        assert float(np.abs(g - e).max()) <= HALF_ERROR_FACTOR * hf_err, f"step {step}"
        assert np.argmax(g) == np.argmax(e), f"step {step}"


def test_bfloat16_moe_engine_matches_with_routing(tmp_path):
    ckpt = write_moe_checkpoint(tmp_path / "moe", seed=2, dtype="bfloat16", num_experts=8, num_experts_per_tok=2,
                                norm_topk_prob=True)
    manifest = qwen2c.build(str(ckpt), "llvm", tmp_path / "engine", dtype="bfloat16", max_context=48)
    report = manifest["parity"]
    assert report["passed"] and report["routing"]["passed"]
    assert report["routing"]["agree"] + report["routing"]["near_ties"] == report["routing"]["choices"]


@pytest.mark.parametrize("dtype", HALF)
def test_attention_and_norm_passes_fire_in_half_precision_traces(tmp_path, dtype):
    ckpt = write_checkpoint(tmp_path / "ckpt", dtype=dtype)
    config, model = load_reference(resolve_model(str(ckpt)), dtype)
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained leaves it
    program = export_model(model, 32)
    fired = {r.name: r.fired for r in run_passes(program, config, dtype)}
    assert fired["fuse_attention"] == config.num_hidden_layers
    assert fired["fuse_rms_norm"] == 2 * config.num_hidden_layers + 1


def test_presets_are_drawn_directly_in_the_half_dtype():
    source = resolve_model("qwen2-tiny")
    _, model = load_reference(source, "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert checkpoint_dtype(source) == "bfloat16"


def test_checkpoint_dtype_is_read_from_config(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", dtype="float16")
    assert checkpoint_dtype(resolve_model(str(ckpt))) == "float16"


def _steps(n, scale=10.0, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(50).astype(np.float32) * scale for _ in range(n)]


def test_half_verdict_holds_the_engine_to_a_factor_of_transformers_error():
    ref = _steps(3)
    hf = [r + 0.01 for r in ref]
    close = [r + 0.02 for r in ref]
    far = [r + 0.2 for r in ref]
    for actual, expect_pass in ((close, True), (far, False)):
        steps = [{"step": str(i), "max_abs_err": float(np.abs(a - r).max()),
                  "greedy_agrees": bool(np.argmax(a) == np.argmax(r))} for i, (a, r) in enumerate(zip(actual, ref))]
        verdict = _half_precision_verdict(steps, actual, ref, hf)
        assert all(s["passed"] for s in steps) is expect_pass
        assert verdict["transformers_max_abs_err"] == pytest.approx(0.01, rel=1e-3)


def test_half_verdict_forgives_a_greedy_flip_only_at_a_near_tie():
    ref = np.zeros(10, np.float32)
    ref[3], ref[7] = 5.0, 4.999  # a near-tie between tokens 3 and 7
    hf = [ref + 0.01]
    flipped = ref.copy()
    flipped[7] = 5.001
    steps = [{"step": "prefill", "max_abs_err": 0.002, "greedy_agrees": False}]
    verdict = _half_precision_verdict(steps, [flipped], [ref], hf)
    assert steps[0]["passed"] and verdict["greedy_flips"][0]["near_tie"]
    assert verdict["greedy_flips"][0]["reference"] == 3 and verdict["greedy_flips"][0]["engine"] == 7

    ref[7] = 4.0  # a clear winner: a flip is a failure even when the logits are close elsewhere
    flipped = ref.copy()
    flipped[7] = 5.5
    steps = [{"step": "prefill", "max_abs_err": 0.002, "greedy_agrees": False}]
    verdict = _half_precision_verdict(steps, [flipped], [ref], [ref + 0.01])
    assert not steps[0]["passed"] and not verdict["greedy_flips"][0]["near_tie"]


def test_half_precision_manifest_records_both_errors(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", dtype="bfloat16")
    qwen2c.build(str(ckpt), "llvm", tmp_path / "engine", dtype="bfloat16", max_context=32, parity_steps=3)
    parity = read_manifest(tmp_path / "engine")["parity"]
    assert parity["reference"].startswith("transformers float32")
    assert all("transformers_abs_err" in s and "max_abs_err" in s for s in parity["steps"])


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_the_float32_reference_runs_without_a_float32_copy_and_equals_one(tmp_path, moe):
    from transformers import Qwen2ForCausalLM, Qwen2MoeForCausalLM

    from qwen2c.parity import running_in_float32

    model_class = Qwen2MoeForCausalLM if moe else Qwen2ForCausalLM
    ckpt = (write_moe_checkpoint if moe else write_checkpoint)(tmp_path / "ckpt", dtype="bfloat16")
    half = model_class.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    full = model_class.from_pretrained(ckpt, dtype=torch.float32).eval()
    prompt = [1, 5, 9, 33, 2, 7]
    expected, fed, _ = reference_steps(full, prompt, steps=3)
    with running_in_float32(half):
        got, fed_half, _ = reference_steps(half, prompt, steps=3)
    assert fed_half == fed
    assert all(np.array_equal(g, e) for g, e in zip(got, expected))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}  # weights put back, never duplicated


def test_float16_kv_cache_of_a_float32_engine(tmp_path, tiny_checkpoint, tiny_engine):
    """--kv-cache-dtype float16: the cache really holds float16 (logits move off the float32-cache
    engine's by about float16's rounding, not more), parity is held to float16's tolerance, and the
    manifest says so."""
    import numpy as np

    import qwen2c
    from qwen2c.tolerances import tolerance_for

    manifest = qwen2c.build(str(tiny_checkpoint), "llvm", tmp_path / "e", max_context=64, kv_cache_dtype="float16")
    assert manifest["kv_cache_dtype"] == "float16" and manifest["dtype"] == "float32"
    assert manifest["parity"]["passed"]
    assert qwen2c.load(tiny_engine).manifest["kv_cache_dtype"] == "float32"
    prompt = list(range(3, 40))
    half = qwen2c.load(tmp_path / "e").session()
    full = qwen2c.load(tiny_engine).session()
    a, b = np.asarray(half.prefill(prompt)), np.asarray(full.prefill(prompt))
    steps = [(np.asarray(half.decode(t)), np.asarray(full.decode(t))) for t in (5, 9, 11)]
    for x, y in [(a, b), *steps]:
        err = np.abs(x - y).max()
        assert 0 < err and tolerance_for("float16").allows(err, np.abs(y).max())


def test_kv_cache_dtype_options_are_checked(tmp_path, tiny_checkpoint):
    import pytest

    import qwen2c
    from qwen2c.args import kv_cache_dtype
    from qwen2c.errors import ConfigError

    assert kv_cache_dtype(None, "float32", True, "tvm") == "float16"
    assert kv_cache_dtype("auto", "float32", False, "tvm") == "float32"
    assert kv_cache_dtype("auto", "bfloat16", True, "tvm") == "bfloat16"
    with pytest.raises(ConfigError, match="--kv-cache-dtype 'int8'"):
        qwen2c.build(str(tiny_checkpoint), "llvm", tmp_path / "bad", kv_cache_dtype="int8")
    with pytest.raises(ConfigError, match="--backend onnxruntime"):
        qwen2c.build(str(tiny_checkpoint), "llvm", tmp_path / "ort", backend="onnxruntime", kv_cache_dtype="float16")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "ort").exists()
