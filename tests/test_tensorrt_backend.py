"""The TensorRT backend up to its TensorRT calls (TensorRT itself cannot be installed here)."""

from __future__ import annotations

import pytest

from qwen2c.targets.tensorrt.profiles import optimization_profiles

IO = {"inputs": ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")],
      "kv_heads": 2, "head_dim": 64}


@pytest.mark.parametrize("max_context", [2, 40, 4096])
def test_profiles_cover_prefill_and_decode_up_to_max_context(max_context):
    prefill, decode = optimization_profiles(IO, max_context)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    for profile in (prefill, decode):
        assert set(profile.shapes) == set(IO["inputs"])
        for name, (lo, opt, hi) in profile.shapes.items():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (profile.name, name)
            if name != "input_ids":
                assert lo[0::3] == (1, 64) and lo[1] == 2 and hi[2] == max_context - 1
    assert prefill.shapes["input_ids"] == ((1, 1), (1, min(128, max_context)), (1, max_context))
    assert prefill.shapes["past_key_values.0.key"][0][2] == 0  # a first prompt has no past
    assert decode.shapes["input_ids"] == ((1, 1),) * 3
    assert decode.shapes["past_key_values.1.value"][1][2] == max(1, max_context // 2)
    # The longest sequence either profile admits is the engine's context.
    assert prefill.shapes["input_ids"][2][1] <= max_context
    assert decode.shapes["past_key_values.0.key"][2][2] + 1 <= max_context


def test_profiles_refuse_a_context_too_short():
    with pytest.raises(ValueError, match="max_context"):
        optimization_profiles(IO, 1)


def test_profiles_are_recorded_as_json():
    import json

    text = json.dumps([p.to_json() for p in optimization_profiles(IO, 64)])
    back = json.loads(text)
    assert back[1]["shapes"]["input_ids"] == [[1, 1], [1, 1], [1, 1]]


def test_timing_cache_is_keyed_by_tensorrt_and_gpu(tmp_path, monkeypatch):
    from qwen2c.targets.tensorrt.engine_builder import _save_atomically, timing_cache_path

    monkeypatch.setenv("QWEN2C_CACHE_DIR", str(tmp_path))
    a, b = timing_cache_path("10.15.1", "9.0"), timing_cache_path("10.15.1", "8.0")
    assert a != b and a.parent == tmp_path / "tensorrt" and "sm90" in a.name
    _save_atomically(a, b"cache")
    assert a.read_bytes() == b"cache" and sorted(p.name for p in a.parent.iterdir()) == [a.name]


def test_tensorrt_onnx_refuses_moe_naming_nodes(tmp_path):
    pytest.importorskip("onnxscript")
    from conftest import write_moe_checkpoint
    from qwen2c.checkpoint import load_reference, resolve_model
    from qwen2c.errors import UnsupportedModelError
    from qwen2c.graphs.export import export_model
    from qwen2c.graphs.pipeline import run_passes
    from qwen2c.targets.tensorrt.backend import tensorrt_onnx

    ckpt = write_moe_checkpoint(tmp_path / "moe", num_hidden_layers=2)
    config, model = load_reference(resolve_model(str(ckpt)), "float32")
    program = export_model(model, 32)
    run_passes(program, config, "float32")
    with pytest.raises(UnsupportedModelError, match=r"(?s)2 node\(s\).*com.microsoft::MoE"):
        tensorrt_onnx(program, config, "float32", 32)
