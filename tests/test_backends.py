"""One engine test for every backend that runs here (TVM, ONNX Runtime), plus each backend's own refusals.

The same checks run against an engine of each backend: built with parity, loaded through
``qwen2c.load``, compared step by step with transformers (dense and MoE checkpoints of shapes no
other test uses, prompts in chunks), guarded inputs, checksums.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import qwen2c
from conftest import read_manifest, write_checkpoint, write_moe_checkpoint
from qwen2c.errors import BackendUnavailableError, ConfigError, EngineError, Qwen2cError
from qwen2c.parity import reference_steps

try:
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401
    RUNNABLE = ["tvm", "onnxruntime"]
except ImportError:  # the onnx extra is not installed: the TVM half still runs
    RUNNABLE = ["tvm"]

MAIN_FILE = {"tvm": "model.so", "onnxruntime": "model.onnx"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("backend-ckpts")
    return {
        # head_dim 16, 5 query heads over 1 kv head (MQA), untied embeddings, 3 layers
        "dense": write_checkpoint(root / "dense", seed=11, hidden_size=80, num_attention_heads=5,
                                  num_key_value_heads=1, num_hidden_layers=3, intermediate_size=120,
                                  tie_word_embeddings=False, vocab_size=700),
        # 10 experts, 4 per token, renormalised, a dense layer in the middle
        "moe": write_moe_checkpoint(root / "moe", seed=12, num_experts=10, num_experts_per_tok=4,
                                    norm_topk_prob=True, mlp_only_layers=[1]),
    }


@pytest.fixture(scope="module")
def engines(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("backend-engines")
    built = {}
    for backend in RUNNABLE:
        for kind, ckpt in checkpoints.items():
            out = root / f"{backend}-{kind}"
            qwen2c.build(str(ckpt), "llvm", out, max_context=40, backend=backend)
            built[backend, kind] = out
    return built


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("backend", RUNNABLE)
def test_engine_matches_transformers_step_by_step(engines, checkpoints, backend, kind):
    from transformers import AutoModelForCausalLM

    engine = qwen2c.load(engines[backend, kind])
    manifest = read_manifest(engines[backend, kind])
    assert engine.backend == backend == manifest["backend"] and manifest["parity"]["passed"]
    assert MAIN_FILE[backend] in manifest["files"]
    reference = AutoModelForCausalLM.from_pretrained(checkpoints[kind]).eval()
    prompt = [4, 99, 17, 301, 8, 56, 2, 111, 43, 5, 9]
    expected, fed, ref_routing = reference_steps(reference, prompt, steps=6)
    session = engine.session()
    session.prefill(prompt[:4])  # a prompt in two chunks: the second runs over a cache
    got = [session.prefill(prompt[4:])]
    routing = [session.routing]
    for t in fed:
        got.append(session.decode(t))
        routing.append(session.routing)
    for step, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-3, err_msg=f"{backend} {kind} step {step}")
        assert np.argmax(g) == np.argmax(e)
    if kind == "moe":
        assert engine.moe_layers == [0, 2]
        for step in range(1, len(routing)):  # decode steps: one token each
            for layer, (probs, experts) in enumerate(ref_routing[step]):
                assert set(routing[step][layer][0]) == set(experts[0]), (backend, step, layer)
    else:
        assert session.routing == []


@pytest.mark.parametrize("backend", RUNNABLE)
def test_generate_and_input_guards(engines, backend):
    engine = qwen2c.load(engines[backend, "dense"])
    first = engine.generate([1, 2, 3], max_new_tokens=5)
    assert len(first) == 5 and first == engine.generate([1, 2, 3], max_new_tokens=5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([700], 2)
    with pytest.raises(ValueError, match="maximum context"):
        engine.generate(list(range(41)), 1)
    with pytest.raises(ValueError, match="before prefill"):
        engine.session().decode(3)


@pytest.mark.parametrize("backend", RUNNABLE)
def test_corrupt_main_file_is_refused(tmp_path, engines, backend):
    copy = tmp_path / "copy"
    shutil.copytree(engines[backend, "dense"], copy)
    victim = copy / MAIN_FILE[backend]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="checksum"):
        qwen2c.load(copy)


def test_unknown_backend_in_a_manifest_is_refused(tmp_path, engines):
    copy = tmp_path / "copy"
    shutil.copytree(engines["tvm", "dense"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["backend"] = "openvino"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="backend 'openvino'.*onnxruntime, tensorrt, tvm"):
        qwen2c.load(copy)


@pytest.mark.skipif("onnxruntime" not in RUNNABLE, reason="the onnx extra is not installed")
def test_onnxruntime_manifest_and_fusions(engines):
    m = read_manifest(engines["onnxruntime", "moe"])
    assert m["execution_provider"] == "CPUExecutionProvider"
    assert {"onnx", "onnxscript", "onnxruntime"} <= set(m["versions"]) and "tvm" not in m["versions"]
    nodes = m["onnx"]["nodes"]
    assert nodes["com.microsoft::GroupQueryAttention"] == 3 and nodes["com.microsoft::MoE"] == 2
    assert nodes["com.microsoft::SkipSimplifiedLayerNormalization"] == m["onnx"]["ort_fusions"]["skip_simplified_layer_norm"] > 0
    assert m["onnx"]["files"] == ["model.onnx"]


@pytest.mark.skipif("onnxruntime" not in RUNNABLE, reason="the onnx extra is not installed")
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_onnxruntime_float16_engine_passes_derived_parity(tmp_path, checkpoints, kind):
    manifest = qwen2c.build(str(checkpoints[kind]), "llvm", tmp_path / "fp16", dtype="float16", max_context=32,
                            backend="onnxruntime")
    parity = manifest["parity"]
    assert parity["passed"] and parity["dtype"] == "float16"
    assert parity["max_abs_err"] <= parity["error_budget"]


@pytest.mark.skipif("onnxruntime" not in RUNNABLE, reason="the onnx extra is not installed")
def test_onnxruntime_refuses_what_it_cannot_run(tmp_path, checkpoints):
    ckpt = str(checkpoints["dense"])
    with pytest.raises(ConfigError, match="bfloat16"):
        qwen2c.build(ckpt, "llvm", tmp_path / "a", dtype="bfloat16", backend="onnxruntime")
    with pytest.raises(ConfigError, match="moe-dispatch dense"):
        qwen2c.build(ckpt, "llvm", tmp_path / "b", moe_dispatch="dense", backend="onnxruntime")
    with pytest.raises(Qwen2cError, match="target rocm is built by tvm"):
        qwen2c.build(ckpt, "rocm", tmp_path / "c", backend="onnxruntime")
    assert list(tmp_path.iterdir()) == []


def test_unknown_backend_name_lists_the_known_ones(tmp_path, checkpoints):
    with pytest.raises(Qwen2cError, match="unknown backend 'trt'. Known backends: onnxruntime, tensorrt, tvm"):
        qwen2c.build(str(checkpoints["dense"]), "llvm", tmp_path / "x", backend="trt")


def test_backend_registry_rejects_duplicates():
    from qwen2c.targets.backends import BACKENDS, Backend

    with pytest.raises(ValueError, match="registered twice"):
        BACKENDS.register(Backend("tvm", "x", "y", "z"))


def test_tensorrt_without_tensorrt_says_so_and_writes_nothing(tmp_path, checkpoints, capsys):
    from qwen2c.cli import main
    from qwen2c.targets.tensorrt.backend import tensorrt_installed

    if tensorrt_installed():
        pytest.skip("TensorRT is installed here")
    out = tmp_path / "trt"
    rc = main(["build", "--backend", "tensorrt", "--target", "cuda", "--model", str(checkpoints["dense"]), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "TensorRT's Python package" in err and "nothing was written" in err
    assert err.count("\n") == 0 and err.rstrip(".").count(". ") == 0  # one sentence, one line
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_engine_without_tensorrt_is_refused_on_load(tmp_path, engines):
    from qwen2c.targets.tensorrt.backend import tensorrt_installed

    if tensorrt_installed():
        pytest.skip("TensorRT is installed here")
    copy = tmp_path / "copy"
    shutil.copytree(engines["tvm", "dense"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "model.plan").write_bytes(b"not an engine")
    manifest["backend"] = "tensorrt"
    manifest["files"]["model.plan"] = {"sha256": qwen2c.engine_dir.sha256(copy / "model.plan"), "size": 13}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendUnavailableError, match="TensorRT's Python package"):
        qwen2c.load(copy)


@pytest.mark.skipif("onnxruntime" not in RUNNABLE, reason="the onnx extra is not installed")
def test_verify_and_bench_two_engines_side_by_side(engines, capsys, tmp_path):
    from qwen2c.cli import main
    from qwen2c.bench import Plan, run_bench
    from qwen2c.compare import verify_pair

    tvm_engine, ort_engine = engines["tvm", "moe"], engines["onnxruntime", "moe"]
    result = verify_pair(tvm_engine, ort_engine, decode_steps=3)
    assert result["passed"] and [r["passed"] for r in result["parity"]] == [True, True]
    between = result["between"]
    assert between["greedy_agreement"] == "4/4" and len(between["steps"]) == 4
    # Both are within 1e-4 of transformers, so within 2e-4 of each other; and not bit-identical.
    assert 0 < between["max_abs_diff"] < 2e-4
    # Speed side by side: the bench harness times both engines (each opened with qwen2c.load) in one run.
    plan = Plan(threads=1, prefill=(16,), decode_contexts=(8,), decode_steps=4, rounds=1, settle_s=0.0)
    speed = run_bench([tvm_engine, ort_engine], plan, tmp_path / "bench")
    rows = {r["name"]: r for r in speed["systems"]}
    assert set(rows) == {"qwen2c float32", "qwen2c-onnxruntime float32"}
    for row in rows.values():
        assert "error" not in row and not row["errors"], row
        assert row["prefill"]["16"]["tok_s"] > 0 and row["decode"]["8"]["ms_per_token"] > 0
    # Same weights and prompt, float32: the same greedy continuation from both backends.
    assert rows["qwen2c float32"]["decode"]["8"]["tokens"] == rows["qwen2c-onnxruntime float32"]["decode"]["8"]["tokens"]
    assert main(["verify", str(engines["tvm", "dense"]), str(ort_engine)]) == 2
    assert "different models" in capsys.readouterr().err


@pytest.mark.skipif("onnxruntime" not in RUNNABLE, reason="the onnx extra is not installed")
def test_onnx_backends_refuse_quantization_before_loading(tmp_path, checkpoints):
    ckpt = str(checkpoints["dense"])
    with pytest.raises(ConfigError, match="--quantize int8 with --backend onnxruntime: quantized weights are a TVM"):
        qwen2c.build(ckpt, "llvm", tmp_path / "a", quantize="int8", backend="onnxruntime")
    from qwen2c.quantization import weight_format
    from qwen2c.targets.registry import TARGETS
    from qwen2c.targets.tensorrt import backend as tensorrt

    # Refused before TensorRT itself is looked for (it is not installed here).
    with pytest.raises(ConfigError, match="--quantize int4 with --backend tensorrt"):
        tensorrt.prepare(TARGETS.resolve("cuda", backend="tensorrt"), "float16", {"quantize": weight_format("int4")})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif("onnxruntime" not in RUNNABLE, reason="the onnx extra is not installed")
def test_onnxruntime_engine_refuses_an_edited_manifest_by_its_fingerprint(tmp_path, engines):
    """model.onnx carries what it was built for: a manifest claiming a longer context than its RoPE
    tables hold (re-checksummed, so only the fingerprint can tell) is refused naming the field."""
    copy = tmp_path / "copy"
    shutil.copytree(engines["onnxruntime", "dense"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["max_context"] = 4000
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="max_context disagrees with what the ONNX model was built for"):
        qwen2c.load(copy)
    # A model.onnx from another build (the MoE engine's) is refused too, though its checksum is listed.
    shutil.copy(engines["onnxruntime", "moe"] / "model.onnx", copy / "model.onnx")
    manifest = json.loads((engines["onnxruntime", "dense"] / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {"sha256": qwen2c.engine_dir.sha256(copy / "model.onnx"),
                                       "size": (copy / "model.onnx").stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="ONNX model"):
        qwen2c.load(copy)


@pytest.mark.skipif("onnxruntime" not in RUNNABLE, reason="the onnx extra is not installed")
def test_onnxruntime_engine_of_a_yarn_model_matches_transformers_and_sliding_windows_are_refused(tmp_path):
    """The export's RoPE tables come from the model's inv_freq and attention factor (YaRN here);
    sliding-window layers have no ONNX translation and are refused by name, nothing written."""
    from qwen2c.errors import UnsupportedModelError

    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    ckpt = write_checkpoint(tmp_path / "yarn", seed=5, rope_scaling=yarn, max_position_embeddings=16)
    manifest = qwen2c.build(str(ckpt), "llvm", tmp_path / "yarn-ort", max_context=48, backend="onnxruntime")
    assert manifest["parity"]["passed"]  # against transformers, past the original 16 positions
    windowed = write_checkpoint(tmp_path / "sw", seed=6, use_sliding_window=True, sliding_window=8,
                                max_window_layers=1)
    with pytest.raises(UnsupportedModelError, match="sliding-window attention.*--backend tvm"):
        qwen2c.build(str(windowed), "llvm", tmp_path / "sw-ort", max_context=32, backend="onnxruntime")
    assert not (tmp_path / "sw-ort").exists()


@pytest.mark.skipif("onnxruntime" not in RUNNABLE, reason="the onnx extra is not installed")
def test_bench_dense_experts_takes_a_tvm_engine_only(engines, capsys):
    from qwen2c.cli import main

    assert main(["bench", str(engines["onnxruntime", "moe"]), "--dense-experts"]) == 2
    assert "--dense-experts rebuilds the engine with TVM's dense MoE dispatch" in capsys.readouterr().err


@pytest.mark.skipif("onnxruntime" not in RUNNABLE, reason="needs the onnx extra")
def test_onnxruntime_engines_take_the_thread_count_tvm_engines_take(monkeypatch):
    # The benchmark's workers (and so a sweep's threads knob) set TVM_NUM_THREADS and OMP_NUM_THREADS.
    from qwen2c.targets.onnxruntime.runtime import session_options

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert session_options().intra_op_num_threads == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert session_options().intra_op_num_threads == 1
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    assert session_options().intra_op_num_threads == 3
