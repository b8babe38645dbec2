"""End to end: checkpoints of several shapes -> engines, checked step by step against transformers."""

import json
import shutil

import numpy as np
import pytest
import torch

import qwen2c
from conftest import read_manifest, write_checkpoint
from qwen2c.errors import ConfigError, EngineError, MemoryBudgetError, Qwen2cError
from qwen2c.parity import reference_steps


@pytest.mark.parametrize(
    "shape",
    [
        dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=False),
        dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=1, intermediate_size=200),
        dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=3, vocab_size=1000),
    ],
    ids=["untied-gqa2", "mqa-odd-ffn", "mha-3-layers"],
)
def test_checkpoints_of_other_shapes_match_transformers_step_by_step(tmp_path, shape):
    from transformers import Qwen2ForCausalLM

    ckpt = write_checkpoint(tmp_path / "ckpt", seed=3, **shape)
    manifest = qwen2c.build(str(ckpt), "llvm", tmp_path / "engine", max_context=48)
    assert manifest["parity"]["passed"]
    engine = qwen2c.load(tmp_path / "engine")
    reference = Qwen2ForCausalLM.from_pretrained(ckpt).eval()
    prompt = [5, 17, 3, 99, 42, 7, 1, 0, 63]
    expected, fed, _ = reference_steps(reference, prompt, steps=6)
    session = engine.session()
    got = [session.prefill(prompt)] + [session.decode(t) for t in fed]
    for step, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-3, err_msg=f"step {step}")
        assert np.argmax(g) == np.argmax(e)


def test_manifest_records_what_built_the_engine(tiny_engine):
    m = read_manifest(tiny_engine)
    assert m["format_version"] == 1 and m["backend"] == "tvm" and m["dtype"] == "float32"
    assert m["target"]["name"].startswith("llvm")
    assert set(m["versions"]) == {"qwen2c", "tvm", "torch", "transformers"}
    assert {p["name"]: p["fired"] for p in m["passes"]} == {"fuse_attention": 2, "fuse_rms_norm": 5, "fuse_moe": 0}
    assert m["parity"]["passed"] and len(m["parity"]["steps"]) == 9
    files = {p.name for p in tiny_engine.iterdir()} - {"manifest.json"}
    assert set(m["files"]) == files and {"model.so", "model.safetensors", "config.json"} <= files
    # Tied embeddings are stored once.
    keys = {p["key"] for p in m["params"]}
    assert "lm_head.weight" not in keys


def test_generate_matches_reference_greedy(tiny_engine, tiny_checkpoint):
    from transformers import Qwen2ForCausalLM

    engine = qwen2c.load(tiny_engine)
    ref = Qwen2ForCausalLM.from_pretrained(tiny_checkpoint).eval()
    ids = [1, 2, 3, 4]
    out = ref.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)
    assert engine.generate(ids, max_new_tokens=10) == out[0, len(ids):].tolist()


def test_decode_does_not_recompute_the_prompt(tiny_engine):
    """Prefill in chunks, then decode: the cache carries the sequence (same logits as one prefill)."""
    engine = qwen2c.load(tiny_engine)
    whole = engine.session().prefill([9, 8, 7, 6, 5])
    s = engine.session()
    s.prefill([9, 8, 7])
    s.decode(6)
    np.testing.assert_allclose(s.decode(5), whole, atol=1e-5)
    assert s.length == 5


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: e.generate([], 4), "empty"),
        (lambda e: e.generate([1, 512], 4), "outside the vocabulary"),
        (lambda e: e.generate([-1], 4), "outside the vocabulary"),
        (lambda e: e.generate(list(range(65)), 1), "maximum context"),
        (lambda e: e.session().decode(3), "before prefill"),
        (lambda e: e.generate([1.5], 4), "integers"),
    ],
)
def test_bad_inputs_raise_value_error(tiny_engine, call, message):
    engine = qwen2c.load(tiny_engine)
    with pytest.raises(ValueError, match=message):
        call(engine)


def test_context_limit_counts_decoded_tokens(tiny_engine):
    s = qwen2c.load(tiny_engine).session()
    s.prefill(list(range(63)))
    s.decode(1)
    with pytest.raises(ValueError, match="maximum context"):
        s.decode(2)


@pytest.mark.parametrize("victim", ["model.so", "model.safetensors", "manifest.json", "config.json"])
def test_corrupted_engine_is_refused_on_load(tmp_path, tiny_engine, victim):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_engine, copy)
    data = bytearray((copy / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / victim).write_bytes(bytes(data))
    with pytest.raises(EngineError):
        qwen2c.load(copy)


def test_missing_file_is_refused(tmp_path, tiny_engine):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_engine, copy)
    (copy / "model.so").unlink()
    with pytest.raises(EngineError, match="missing"):
        qwen2c.load(copy)


def test_existing_engine_is_not_overwritten_without_force(tmp_path, tiny_checkpoint):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Qwen2cError, match="already exists"):
        qwen2c.build(str(tiny_checkpoint), "llvm", out)
    with pytest.raises(Qwen2cError, match="not a qwen2c engine"):
        qwen2c.build(str(tiny_checkpoint), "llvm", out, force=True)
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_build_leaves_nothing_and_keeps_the_old_engine(tmp_path, tiny_engine, monkeypatch):
    out = tmp_path / "engine"
    shutil.copytree(tiny_engine, out)
    before = read_manifest(out)

    def broken_parity(*args, **kwargs):
        raise qwen2c.errors.ParityError("injected parity failure")

    monkeypatch.setattr("qwen2c.builder.check_parity", broken_parity)
    with pytest.raises(qwen2c.errors.ParityError):
        qwen2c.build(str(tiny_engine), "llvm", out, force=True, max_context=64)
    assert read_manifest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", ckpt)
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="pickle"):
        qwen2c.build(str(ckpt), "llvm", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_model_type_is_refused(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "llama"
    shutil.copytree(tiny_checkpoint, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        qwen2c.build(str(ckpt), "llvm", tmp_path / "out")


def test_weights_that_do_not_match_the_config_are_refused(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "mismatch"
    shutil.copytree(tiny_checkpoint, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="layer_types"):  # transformers' own check, named
        qwen2c.build(str(ckpt), "llvm", tmp_path / "out")
    del cfg["layer_types"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="weights"):
        qwen2c.build(str(ckpt), "llvm", tmp_path / "out")


def test_too_large_preset_fails_before_allocating(tmp_path):
    with pytest.raises(MemoryBudgetError, match="GiB"):
        qwen2c.build("qwen2-72b", "llvm", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_preset_and_target_list_the_valid_ones(tmp_path):
    with pytest.raises(Qwen2cError, match="qwen2-0.5b"):
        qwen2c.build("qwen2-3b", "llvm", tmp_path / "out")
    with pytest.raises(Qwen2cError, match="llvm-avx2"):
        qwen2c.build("qwen2-tiny", "tpu", tmp_path / "out")


def test_an_unknown_dtype_is_refused_naming_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="bfloat16"):
        qwen2c.build("qwen2-tiny", "llvm", tmp_path / "out", dtype="int3")
    assert not (tmp_path / "out").exists()


def test_cross_target_without_its_linker_fails_before_building(tmp_path, tiny_checkpoint, monkeypatch):
    import shutil as _shutil

    from qwen2c.errors import BackendUnavailableError

    monkeypatch.setattr(_shutil, "which", lambda name, *a, **k: None)  # no cross compiler on PATH
    import qwen2c.targets.registry as registry

    if registry.host_arch() == "aarch64":
        pytest.skip("needs a host that is not aarch64")
    with pytest.raises(BackendUnavailableError, match="aarch64-linux-gnu-gcc.*Nothing was written"):
        qwen2c.build(str(tiny_checkpoint), "llvm-aarch64", tmp_path / "arm")
    assert not (tmp_path / "arm").exists()
