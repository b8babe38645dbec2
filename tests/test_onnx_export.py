"""The fused ONNX export, inspected node by node, run in ONNX Runtime against transformers, and saved safely."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript", reason="the onnx extra (pip install -e '.[onnx]') is not installed")

import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402

from conftest import write_checkpoint, write_moe_checkpoint  # noqa: E402
from qwen2c.checkpoint import load_reference, resolve_model  # noqa: E402
from qwen2c.errors import EngineError, Qwen2cError  # noqa: E402
from qwen2c.graphs.export import export_model  # noqa: E402
from qwen2c.graphs.pipeline import run_passes  # noqa: E402
from qwen2c.parity import reference_steps  # noqa: E402
from qwen2c.targets.onnx.export import export_onnx  # noqa: E402
from qwen2c.targets.onnx.external_data import check_locations, save  # noqa: E402
from qwen2c.targets.tensorrt.supported_ops import unsupported_nodes  # noqa: E402

MAX_CONTEXT = 48


def _export(ckpt, op_set="onnxruntime", dtype="float32"):
    config, model = load_reference(resolve_model(str(ckpt)), dtype)
    program = export_model(model, MAX_CONTEXT)
    run_passes(program, config, dtype)
    return config, export_onnx(program, config, dtype, MAX_CONTEXT, op_set)


def _nodes(model, op_type, domain=""):
    return [n for n in model.graph if n.op_type == op_type and n.domain == domain]


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    # head_dim 32, 3 kv groups of 2: shapes no other test uses
    return write_checkpoint(tmp_path_factory.mktemp("onnx") / "dense", seed=5, hidden_size=192,
                            num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=3,
                            tie_word_embeddings=False)


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return write_moe_checkpoint(tmp_path_factory.mktemp("onnx") / "moe", seed=6, num_experts=6, num_experts_per_tok=3,
                                norm_topk_prob=True, mlp_only_layers=[1])


def test_each_fused_op_is_one_node_and_the_cache_is_past_present(dense_ckpt):
    config, exported = _export(dense_ckpt)
    model, layers = exported.model, config.num_hidden_layers
    gqa = _nodes(model, "GroupQueryAttention", "com.microsoft")
    assert len(gqa) == layers
    for node in gqa:
        attrs = {k: v.value for k, v in node.attributes.items()}
        assert attrs["num_heads"] == 6 and attrs["kv_num_heads"] == 3 and attrs["do_rotary"] == 1
        assert attrs["scale"] == pytest.approx(32 ** -0.5)
        past_key, past_value = node.inputs[3], node.inputs[4]
        assert past_key.name.startswith("past_key_values.") and past_value.name.endswith(".value")
        assert {o.name for o in node.outputs[1:3]} <= {o.name for o in model.graph.outputs}
    assert len(_nodes(model, "RMSNormalization")) == 2 * layers + 1
    # Nothing of the unfused attention or RoPE remains.
    kinds = exported.op_counts()
    assert not {"Softmax", "Cos", "Sin", "Where", "Expand", "Trilu"} & set(kinds), kinds
    assert [i.name for i in model.graph.inputs] == exported.graph.input_names
    assert [o.name for o in model.graph.outputs][:1] == ["logits"]
    assert len(model.graph.outputs) == 1 + 2 * layers


def test_moe_blocks_become_one_moe_node_with_interleaved_gate_up(moe_ckpt):
    from safetensors.numpy import load_file

    config, exported = _export(moe_ckpt)
    moe = _nodes(exported.model, "MoE", "com.microsoft")
    assert len(moe) == 2  # layer 1 is an mlp_only layer
    weights = load_file(str(moe_ckpt / "model.safetensors"))  # transformers saves experts one by one
    for node in moe:
        attrs = {k: v.value for k, v in node.attributes.items()}
        assert attrs["k"] == 3 and attrs["normalize_routing_weights"] == 1
        assert attrs["activation_type"] == "swiglu" and attrs["swiglu_fusion"] == 1
        assert attrs["activation_alpha"] == 1.0 and attrs["activation_beta"] == 0.0
    fc1 = moe[0].inputs[2].const_value.numpy()
    for e in range(6):
        np.testing.assert_array_equal(fc1[e, 0::2], weights[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"])
        np.testing.assert_array_equal(fc1[e, 1::2], weights[f"model.layers.0.mlp.experts.{e}.up_proj.weight"])
    assert [o.name for o in exported.model.graph.outputs][1:3] == ["routing.0", "routing.1"]


def _run_steps(path, prompt, fed, kv_heads, head_dim, layers):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    past = {n: np.zeros((1, kv_heads, 0, head_dim), np.float32) for n in names[1:]}
    got = []
    # The prompt in two chunks: the second prefill runs with a past.
    for ids in [prompt[:5], prompt[5:]] + [[t] for t in fed]:
        out = session.run(None, {"input_ids": np.array([ids]), **past})
        got.append(out[0].reshape(-1))
        past = dict(zip(names[1:], out[-2 * layers:]))
    return [got[1]] + got[2:]


@pytest.mark.parametrize("op_set", ["onnxruntime", "standard"])
def test_exported_graph_matches_transformers_step_by_step(tmp_path, dense_ckpt, op_set):
    from transformers import Qwen2ForCausalLM

    config, exported = _export(dense_ckpt, op_set)
    save(exported.model, tmp_path, "model.onnx")
    reference = Qwen2ForCausalLM.from_pretrained(dense_ckpt).eval()
    prompt = [3, 77, 12, 500, 9, 41, 8, 230, 1]
    expected, fed, _ = reference_steps(reference, prompt, steps=5)
    got = _run_steps(tmp_path / "model.onnx", prompt, fed, 3, 32, config.num_hidden_layers)
    for step, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-3, err_msg=f"{op_set} step {step}")


def test_standard_op_set_is_what_tensorrt_parses(dense_ckpt, moe_ckpt):
    config, standard = _export(dense_ckpt, "standard")
    assert unsupported_nodes(standard.model) == []
    layers = config.num_hidden_layers
    assert len(_nodes(standard.model, "RotaryEmbedding")) == 2 * layers
    for node in _nodes(standard.model, "Attention"):
        assert len(node.inputs) == 4 and len(node.outputs) == 1  # no past/present on the node itself
    _, ort_flavour = _export(dense_ckpt, "onnxruntime")
    refused = unsupported_nodes(ort_flavour.model)
    assert len(refused) == layers and all("com.microsoft::GroupQueryAttention" in r for r in refused)
    _, moe = _export(moe_ckpt, "standard")
    refused = unsupported_nodes(moe.model)
    assert len(refused) == 2 and all("com.microsoft::MoE" in r for r in refused)


def test_attention_with_past_inputs_is_flagged_for_tensorrt():
    x = ir.Value(name="x", shape=ir.Shape([1, 2, 3, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("Attention", [x, x, x, None, x, x], num_outputs=3, name="attn")
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 23})
    refused = unsupported_nodes(ir.Model(graph, ir_version=10))
    assert len(refused) == 1 and "past_key" in refused[0]


def test_external_data_is_written_beside_the_model_and_checked(tmp_path, dense_ckpt):
    _, exported = _export(dense_ckpt)
    out = tmp_path / "ext"
    out.mkdir()
    files = save(exported.model, out, "model.onnx", threshold=0)
    assert files == ["model.onnx", "model.onnx.data"]
    assert check_locations(out / "model.onnx") == ["model.onnx.data"]
    onnx.checker.check_model(str(out / "model.onnx"))
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size / 10

    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    for location in ("../model.onnx.data", str(out / "model.onnx.data"), "sub/model.onnx.data"):
        bad = onnx.ModelProto()
        bad.CopyFrom(proto)
        tensor = next(t for t in bad.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        next(e for e in tensor.external_data if e.key == "location").value = location
        onnx.save(bad, str(out / "bad.onnx"))
        with pytest.raises(EngineError, match="outside the engine directory"):
            check_locations(out / "bad.onnx")


def test_export_onnx_cli_writes_a_checked_folder(tmp_path, dense_ckpt, capsys):
    from qwen2c.cli import main

    out = tmp_path / "export"
    assert main(["export-onnx", "--model", str(dense_ckpt), "-o", str(out), "--max-context", "32"]) == 0
    info = json.loads((out / "onnx.json").read_text())
    assert info["nodes"]["com.microsoft::GroupQueryAttention"] == 3 and info["max_context"] == 32
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx", "onnx.json"]
    onnx.checker.check_model(str(out / "model.onnx"))
    assert main(["export-onnx", "--model", str(dense_ckpt), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_missing_package_names_the_extra():
    from qwen2c.targets.onnx.requirements import require

    with pytest.raises(Qwen2cError, match=r"qwen2c\[onnx\]"):
        require("onnx", "qwen2c_no_such_package_xyz")


def test_kv_cache_graph_runs_in_pytorch_like_the_program(dense_ckpt):
    """The rewrite that adds past/present is checked in PyTorch before export (check_against)."""
    from qwen2c.targets.onnx.kv_cache_graph import check_against, with_kv_cache

    config, model = load_reference(resolve_model(str(dense_ckpt)), "float32")
    program = export_model(model, MAX_CONTEXT)
    run_passes(program, config, "float32")
    cached = with_kv_cache(program, config, "float32", MAX_CONTEXT)
    assert check_against(cached, program, config.vocab_size, "float32") < 1e-5
    out = cached.module(torch.tensor([[1, 2, 3]]), *cached.empty_past(torch.float32))
    assert out[-1].shape == (1, 3, 3, 32)
