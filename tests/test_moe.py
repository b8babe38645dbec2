"""Qwen2-MoE: config, presets, the fused op and its pass, engines checked against transformers
step by step (logits and routing), and the dense-experts baseline."""

import numpy as np
import pytest
import torch

import qwen2c
from conftest import moe_config, read_manifest, write_moe_checkpoint
from qwen2c.checkpoint import hf_config
from qwen2c.errors import ConfigError, MemoryBudgetError, UnsupportedModelError
from qwen2c.graphs.export import capture_routing, export_model
from qwen2c.graphs.pipeline import run_passes
from qwen2c.model_config import active_param_count, moe_layers, param_count, validate_config_dict
from qwen2c.parity import compare_routing, format_report, reference_steps
from qwen2c.presets import PRESETS

aten = torch.ops.aten
FUSED_MOE = torch.ops.qwen2c.fused_moe.default


def _model(seed=0, **overrides):
    from transformers import Qwen2MoeForCausalLM

    config = hf_config(moe_config(**overrides))
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 3.0 / config.hidden_size**0.5)
    return config, model


def _count(program, target):
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target == target)


# --- config and presets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_experts": None}, "num_experts"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
        ({"shared_expert_intermediate_size": "48"}, "shared_expert_intermediate_size"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
        ({"mlp_only_layers": [0, 3]}, "mlp_only_layers"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
    ],
)
def test_invalid_moe_configs_name_the_field(overrides, field):
    cfg = moe_config(**overrides)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(ConfigError, match=field):
        validate_config_dict(cfg, "config.json")


@pytest.mark.parametrize("step, only, sparse", [(1, [], [0, 1, 2]), (2, [], [1]), (1, [0, 2], [1]), (3, [2], [])])
def test_sparse_layers_and_param_count_follow_transformers(step, only, sparse):
    from transformers import Qwen2MoeForCausalLM

    config = hf_config(moe_config(decoder_sparse_step=step, mlp_only_layers=only))
    model = Qwen2MoeForCausalLM(config)
    assert moe_layers(config) == sparse
    assert [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate") and
            hasattr(layer.mlp, "experts")] == sparse
    assert param_count(config) == sum(p.numel() for p in model.parameters())


def test_57b_preset_has_the_published_shapes():
    cfg = PRESETS["qwen2-57b-a14b"]
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (64, 8, 2560)
    assert (cfg["shared_expert_intermediate_size"], cfg["norm_topk_prob"], cfg["hidden_size"]) == (20480, False, 3584)
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (28, 28, 4)
    config = hf_config(cfg)
    assert param_count(config) / 1e9 == pytest.approx(57.4, abs=0.05)
    assert active_param_count(config) / 1e9 == pytest.approx(14.2, abs=0.1)


def test_57b_build_fails_fast_naming_the_memory_it_needs(tmp_path, monkeypatch):
    import qwen2c.memory

    monkeypatch.setattr(qwen2c.memory, "available_bytes", lambda: 16 << 30)
    with pytest.raises(MemoryBudgetError, match=r"57\.41B parameters: 213\.9 GiB .* needs about \d+\.\d GiB") as e:
        qwen2c.build("qwen2-57b-a14b", "llvm", tmp_path / "engine")
    assert "qwen2c inspect" in str(e.value)
    assert not (tmp_path / "engine").exists()


def test_57b_graph_is_exported_and_fused_at_full_size_on_meta_tensors():
    from qwen2c.inspect_graph import format_inspect, inspect_graph

    report = inspect_graph("qwen2-57b-a14b", probe_tokens=3)
    assert report["fused_ops"] == {"qwen2c.fused_attention": 28, "qwen2c.fused_moe": 28, "qwen2c.fused_rms_norm": 57}
    assert {p["name"]: p["fired"] for p in report["passes"]}["fuse_moe"] == 28
    assert report["output_shapes"] == [(1, 1, 151936)] + [(3, 8)] * 28
    assert "14.25B active" in format_inspect(report)


# --- the fused op and its pass ------------------------------------------------------------------


@pytest.mark.parametrize("experts, k, norm", [(8, 2, False), (8, 2, True), (4, 1, False), (6, 4, True)])
@pytest.mark.parametrize("act, name", [("silu", "silu"), ("gelu_pytorch_tanh", "gelu_tanh")])
def test_fused_moe_reference_matches_the_transformers_block(experts, k, norm, act, name):
    config, model = _model(num_experts=experts, num_experts_per_tok=k, norm_topk_prob=norm, hidden_act=act)
    block = model.model.layers[0].mlp
    x = torch.randn(1, 9, config.hidden_size)
    with torch.no_grad():
        want = block(x)
        _, _, want_experts = block.gate(x.reshape(-1, config.hidden_size))
        got, got_experts = torch.ops.qwen2c.fused_moe(
            x[0], block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj,
            block.shared_expert.gate_proj.weight, block.shared_expert.up_proj.weight,
            block.shared_expert.down_proj.weight, block.shared_expert_gate.weight, k, norm, name)
    torch.testing.assert_close(got, want[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(got_experts, want_experts)


@pytest.mark.parametrize(
    "overrides, fused_layers",
    [
        ({}, [0, 1, 2]),
        ({"decoder_sparse_step": 2, "num_hidden_layers": 4}, [1, 3]),
        ({"mlp_only_layers": [0, 2]}, [1]),
        ({"norm_topk_prob": True, "num_experts_per_tok": 3}, [0, 1, 2]),
    ],
    ids=["all-sparse", "sparse-step-2", "mlp-only-layers", "norm-top3"],
)
def test_fuse_moe_replaces_each_sparse_block_and_keeps_the_numbers(overrides, fused_layers):
    config, model = _model(**overrides)
    program = export_model(model, 64)
    assert _count(program, torch.ops.transformers.grouped_mm_fallback.default) == 2 * len(fused_layers)
    reports = {r.name: r for r in run_passes(program, config, "float32")}  # checks numbers and routing
    assert reports["fuse_moe"].fired == len(fused_layers) and not reports["fuse_moe"].misses
    assert _count(program, FUSED_MOE) == len(fused_layers)
    for gone in (aten.topk.default, aten.sort.default, aten.histc.default, aten.index_put_.default,
                 torch.ops.transformers.grouped_mm_fallback.default):
        assert _count(program, gone) == 0, gone
    ids = torch.randint(0, config.vocab_size, (1, 11))
    with torch.no_grad(), capture_routing(model) as want_routing:
        want = model(ids).logits[:, -1:]
    got, *got_routing = program.module()(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert len(got_routing) == len(fused_layers)
    for g, w in zip(got_routing, want_routing):
        assert torch.equal(g, w)


def test_fuse_moe_refuses_a_block_it_does_not_recognise():
    config, model = _model()
    for layer in model.model.layers:
        layer.mlp.experts.act_fn = torch.nn.Tanh()  # not an activation the fused op computes
    program = export_model(model, 64)
    with pytest.raises(UnsupportedModelError, match=r"layer\(s\) \[0, 1, 2\].*aten\.tanh"):
        run_passes(program, config, "float32")


def test_fuse_moe_refuses_experts_whose_activation_differs_from_the_shared_experts():
    config, model = _model()
    for layer in model.model.layers:
        layer.mlp.experts.act_fn = torch.nn.GELU()  # the shared expert keeps silu
    program = export_model(model, 64)
    with pytest.raises(UnsupportedModelError, match="activation gelu differs from the shared expert's silu"):
        run_passes(program, config, "float32")


@pytest.mark.parametrize("act, name", [("gelu", "gelu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("relu", "relu")])
def test_fuse_moe_carries_the_traced_activation(act, name):
    config, model = _model(hidden_act=act)
    program = export_model(model, 64)
    run_passes(program, config, "float32")  # checked numerically against the traced program
    acts = {n.args[10] for n in program.graph.nodes if n.target == torch.ops.qwen2c.fused_moe.default}
    assert acts == {name}


def test_fuse_moe_refuses_a_graph_that_contradicts_the_config():
    config, model = _model(norm_topk_prob=False)
    program = export_model(model, 64)
    config.norm_topk_prob = True
    with pytest.raises(UnsupportedModelError, match="norm_topk_prob"):
        run_passes(program, config, "float32")


# --- engines ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    return write_moe_checkpoint(tmp_path_factory.mktemp("moe") / "ckpt", seed=1)


@pytest.fixture(scope="module")
def moe_engine(tmp_path_factory, moe_checkpoint):
    out = tmp_path_factory.mktemp("moe-engines") / "sparse"
    qwen2c.build(str(moe_checkpoint), "llvm", out, max_context=64)
    return out


@pytest.mark.parametrize(
    "shape",
    [
        dict(num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=2, num_hidden_layers=4),
        dict(num_experts=16, num_experts_per_tok=4, mlp_only_layers=[0], moe_intermediate_size=24,
             shared_expert_intermediate_size=40),
        dict(num_experts=5, num_experts_per_tok=1, moe_intermediate_size=8, shared_expert_intermediate_size=20,
             hidden_size=96, num_attention_heads=6, num_key_value_heads=2),
        dict(num_experts=4, num_experts_per_tok=4, norm_topk_prob=True, num_hidden_layers=2),
    ],
    ids=["e6-top3-norm-step2", "e16-top4-mlp-only-odd-widths", "e5-top1-wide", "e4-top4-every-expert"],
)
def test_moe_checkpoints_match_transformers_step_by_step_with_routing(tmp_path, shape):
    from transformers import Qwen2MoeForCausalLM

    ckpt = write_moe_checkpoint(tmp_path / "ckpt", seed=4, **shape)
    manifest = qwen2c.build(str(ckpt), "llvm", tmp_path / "engine", max_context=48)
    assert manifest["parity"]["passed"] and manifest["parity"]["routing"]["passed"]
    config = hf_config(moe_config(**shape))
    assert manifest["moe"]["layers"] == moe_layers(config)
    engine = qwen2c.load(tmp_path / "engine")
    reference = Qwen2MoeForCausalLM.from_pretrained(ckpt).eval()
    prompt = [5, 17, 3, 99, 42, 7, 1, 0, 63, 200, 11]
    expected, fed, ref_routing = reference_steps(reference, prompt, steps=5)
    session = engine.session()
    for step, (token, want, want_routing) in enumerate(zip([prompt] + fed, expected, ref_routing)):
        got = session.prefill(token) if step == 0 else session.decode(token)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3, err_msg=f"step {step}")
        assert len(session.routing) == len(want_routing)
        for got_experts, (_, want_experts) in zip(session.routing, want_routing):
            np.testing.assert_array_equal(np.sort(got_experts, 1), np.sort(want_experts, 1), err_msg=f"step {step}")


def test_moe_manifest_and_routing_report(moe_engine):
    m = read_manifest(moe_engine)
    assert m["moe"] == {"dispatch": "sparse", "layers": [0, 1, 2], "num_experts": 8, "num_experts_per_tok": 2,
                        "norm_topk_prob": False}
    assert {p["name"]: p["fired"] for p in m["passes"]}["fuse_moe"] == 3
    routing = m["parity"]["routing"]
    assert routing["passed"] and routing["agree"] == routing["choices"] == 3 * (12 + 8)
    assert routing["counts_equal_layers"] == "3/3"
    assert "routing: PASS" in format_report(m["parity"])


def test_routing_comparison_fails_on_a_different_choice_and_forgives_near_ties():
    probs = np.array([[0.5, 0.3, 0.2, 0.0], [0.4, 0.29999, 0.3, 0.00001]], np.float32)
    ref = [[(probs, np.array([[0, 1], [0, 2]]))]]
    ok = compare_routing([0], ref, [[np.array([[1, 0], [0, 2]])]], tie_tol=1e-4)
    assert ok["passed"] and ok["agree"] == 2
    tie = compare_routing([0], ref, [[np.array([[0, 1], [0, 1]])]], tie_tol=1e-4)  # 0.3 vs 0.29999
    assert tie["passed"] and tie["near_ties"] == 1
    bad = compare_routing([0], ref, [[np.array([[0, 2], [0, 2]])]], tie_tol=1e-4)  # 0.2 is no tie for 0.3
    assert not bad["passed"] and not bad["layers"][0]["counts_equal"]
    assert "reference [0, 1], engine [0, 2]" in bad["layers"][0]["first_mismatch"]


def test_dense_dispatch_runs_every_expert_to_the_same_result(tmp_path, moe_checkpoint, moe_engine):
    manifest = qwen2c.build(str(moe_checkpoint), "llvm", tmp_path / "dense", max_context=64, moe_dispatch="dense")
    assert manifest["moe"]["dispatch"] == "dense" and manifest["parity"]["passed"]
    sparse, dense = qwen2c.load(moe_engine).session(), qwen2c.load(tmp_path / "dense").session()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    np.testing.assert_allclose(dense.prefill(prompt), sparse.prefill(prompt), atol=1e-5, rtol=1e-5)
    for a, b in zip(dense.routing, sparse.routing):
        np.testing.assert_array_equal(a, b)


def test_unknown_moe_dispatch_is_refused(tmp_path, moe_checkpoint):
    with pytest.raises(ConfigError, match="--moe-dispatch"):
        qwen2c.build(str(moe_checkpoint), "llvm", tmp_path / "e", moe_dispatch="all")


def test_cli_verify_and_inspect_report_routing(moe_engine, moe_checkpoint, capsys):
    from qwen2c.cli import main

    assert main(["verify", str(moe_engine)]) == 0
    out = capsys.readouterr().out
    assert "routing: PASS; top-k expert sets agree for 60/60" in out
    assert main(["inspect", "--model", str(moe_checkpoint)]) == 0
    assert "pass fuse_moe: fired 3x" in capsys.readouterr().out


def _poison_unrouted_experts(engine, routed: dict[int, set[int]]) -> None:
    """Set every expert's weights to NaN except the routed ones, in the engine's uploaded params:
    any computation that touches an unrouted expert (even one weighted by 0) then yields NaN."""
    import tvm
    from safetensors.numpy import load_file

    tensors = load_file(str(engine.directory / "model.safetensors"))
    weights = {p["name"]: tensors[p["key"]].copy() for p in engine.manifest["params"]}
    for layer, keep in routed.items():
        for suffix in ("gate_up_proj", "down_proj"):
            experts = weights[f"model.layers.{layer}.mlp.experts.{suffix}"]
            for e in set(range(experts.shape[0])) - keep:
                experts[e] = np.nan
    # Upload as the engine does, through its load-time weight transform (combined linears).
    program = engine._program
    uploaded = [tvm.runtime.tensor(weights[p["name"]], program.device) for p in engine.manifest["params"]]
    program.params = list(program.vm["transform_params"](uploaded))


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_a_decode_step_reads_only_the_experts_its_token_routes_to(tmp_path, moe_checkpoint, moe_engine, dispatch):
    path = moe_engine
    if dispatch == "dense":
        path = tmp_path / "dense"
        qwen2c.build(str(moe_checkpoint), "llvm", path, max_context=64, moe_dispatch="dense", parity_steps=1)
    engine = qwen2c.load(path)
    prompt, token = [9, 8, 7, 6, 5], 4
    clean = engine.session()
    clean.prefill(prompt)
    want = clean.decode(token)
    routed = {layer: set(experts[0].tolist()) for layer, experts in zip(engine.moe_layers, clean.routing)}
    assert all(len(r) == 2 for r in routed.values())

    session = engine.session()
    session.prefill(prompt)  # with clean weights: the prompt routes to other experts too
    _poison_unrouted_experts(engine, routed)
    got = session.decode(token)
    if dispatch == "sparse":
        np.testing.assert_array_equal(got, want)  # the unrouted experts were never read
    else:
        assert np.isnan(got).all()  # the baseline computes all experts (NaN * 0 is NaN)


def test_inspect_works_for_dense_models_too(tiny_checkpoint):
    from qwen2c.inspect_graph import format_inspect, inspect_graph

    report = inspect_graph(str(tiny_checkpoint))
    assert report["moe_layers"] == [] and report["output_shapes"] == [(1, 1, 512)]
    assert report["fused_ops"] == {"qwen2c.fused_attention": 2, "qwen2c.fused_rms_norm": 5}
    assert "sparse MoE" not in format_inspect(report)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_export_uses_the_experts_form_the_pass_recognises(implementation):
    config, model = _model()
    model.set_experts_implementation(implementation)  # e.g. chosen by the user's environment
    program = export_model(model, 64)
    reports = {r.name: r for r in run_passes(program, config, "float32")}
    assert reports["fuse_moe"].fired == 3
