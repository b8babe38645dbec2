"""Weight-only quantization: formats against llama.cpp's reference code, kernels against NumPy, the
Relax rewrite that folds dequantization into kernels, and quantized engines against transformers."""

import json

import numpy as np
import pytest
import torch
import tvm
from gguf import GGMLQuantizationType, quants
from tvm import relax

import qwen2c
from conftest import write_checkpoint, write_moe_checkpoint
from qwen2c.errors import BackendUnavailableError, ConfigError, ParityError
from qwen2c.quantization import weight_format
from qwen2c.schedules.cpu_qmatmul import q_matmul_kernel
from qwen2c.schedules.dequantize import take_kernel
from qwen2c.targets.registry import TARGETS

TARGET = TARGETS.resolve("llvm")
LANES = TARGET.vector_bits // 32


def _weights(n=64, k=256, seed=0):
    torch.manual_seed(seed)
    return torch.randn(n, k) * 0.02


def test_int8_is_llama_cpp_q8_0_rounded_with_the_stored_scale():
    w = _weights()
    fmt = weight_format("int8", 32)
    ours = fmt.dequantize(*fmt.quantize(w)).numpy()
    q8_0 = GGMLQuantizationType.Q8_0
    theirs = quants.dequantize(quants.quantize(w.numpy(), q8_0), q8_0)
    # Q8_0 rounds with max|w| / 127 before storing it in float16; ours with the float16 value itself.
    assert np.mean(np.isclose(ours, theirs, rtol=0, atol=1e-7)) > 0.99
    assert ((ours - w.numpy()) ** 2).mean() <= ((theirs - w.numpy()) ** 2).mean()


@pytest.mark.parametrize("group", [32, 64])
def test_int4_errs_less_than_q4_0_and_packs_two_per_byte_in_blocks_of_32(group):
    w = _weights(k=128)
    fmt = weight_format("int4", group)
    q, scales = fmt.quantize(w)
    assert q.dtype == np.uint8 and q.shape == (64, 64) and scales.dtype == np.float16 and scales.shape == (64, 128 // group)
    # Unpacked here independently: byte j of each 16-byte block holds input j (low) and j + 16 (high).
    blocks = q.reshape(64, 4, 16).astype(np.int32)
    values = np.concatenate([(blocks & 15) - 8, (blocks >> 4) - 8], axis=2).reshape(64, 128)
    dequantized = values.reshape(64, -1, group) * scales.astype(np.float32)[..., None]
    np.testing.assert_allclose(fmt.dequantize(q, scales).numpy(), dequantized.reshape(64, 128), rtol=0, atol=0)
    q4_0 = GGMLQuantizationType.Q4_0
    theirs = quants.dequantize(quants.quantize(w.numpy(), q4_0), q4_0)
    ours_err = float(((dequantized.reshape(64, 128) - w.numpy()) ** 2).mean())
    q4_0_err = float(((theirs - w.numpy()) ** 2).mean())
    assert ours_err < (q4_0_err if group == 32 else 1.5 * q4_0_err)


def test_what_stays_float_and_bad_options():
    fmt = weight_format("int4", 64)
    assert fmt.refusal("model.layers.0.mlp.gate.weight", (8, 64)) is not None  # MoE router
    assert fmt.refusal("model.layers.0.input_layernorm.weight", (64,)) is not None
    assert "multiple" in fmt.refusal("model.layers.0.mlp.down_proj.weight", (64, 96))
    assert fmt.refusal("model.layers.0.mlp.experts.down_proj", (8, 64, 128)) is None
    assert weight_format("none") is None and weight_format(None) is None
    with pytest.raises(ConfigError, match="--quantize"):
        weight_format("int3")
    with pytest.raises(ConfigError, match="--group-size"):
        weight_format("int4", 48)
    with pytest.raises(ConfigError, match="--group-size"):
        weight_format("none", 32)


def _run(func, *arrays, out_shape, out_dtype="float32"):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET.tvm_target())
    out = tvm.runtime.tensor(np.zeros(out_shape, out_dtype))
    lib["main"](*(tvm.runtime.tensor(a) for a in arrays), out)
    return out.numpy()


@pytest.mark.parametrize("scheme, group", [("int8", 32), ("int8", 64), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("m, rows", [(1, 1), (7, 2), (5, 4)])
@pytest.mark.parametrize("n", [44, 7])  # 7: output tiles narrower than 4
def test_cpu_quantized_matmul_matches_numpy(scheme, group, m, rows, n):
    k = 192
    fmt = weight_format(scheme, group)
    q, scales = fmt.quantize(_weights(n, k, seed=1))
    x = np.random.default_rng(0).standard_normal((1, m, k), dtype=np.float32)
    y = _run(q_matmul_kernel(k, n, fmt.bits, group, LANES, rows), x, q, scales, out_shape=(1, m, n))
    np.testing.assert_allclose(y, x @ fmt.dequantize(q, scales).numpy().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme, group", [("int8", 32), ("int8", 64), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("m", [2, 9, 19])
def test_packed_quantized_prompt_kernel_matches_numpy(scheme, group, m):
    from qwen2c.schedules.cpu_packed_matmul import packed_matmul_kernel

    k, n = 192, LANES * 6
    fmt = weight_format(scheme, group)
    q, scales = fmt.quantize(_weights(n, k, seed=3))
    x = np.random.default_rng(1).standard_normal((1, m, k), dtype=np.float32)
    y = _run(packed_matmul_kernel(k, n, LANES, 8, 2, quant=(fmt.bits, group)), x, q, scales, out_shape=(1, m, n))
    np.testing.assert_allclose(y, x @ fmt.dequantize(q, scales).numpy().T, rtol=1e-5, atol=1e-5)


def test_quantized_embedding_gather_matches_numpy():
    fmt = weight_format("int4", 32)
    q, scales = fmt.quantize(_weights(100, 64))
    ids = np.array([3, 99, 0, 3], np.int32)
    rows = _run(take_kernel(100, 64, 4, 32, "float32"), q, scales, ids, out_shape=(4, 64))
    np.testing.assert_allclose(rows, fmt.dequantize(q, scales).numpy()[ids], rtol=0, atol=0)


def _module(reader):
    """A function whose weight (an int4 [64, 64]) is read by ``reader(bb, x, W)``."""
    from qwen2c.targets.tvm.quantized_params import quantize_params

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 64), "float32"))
    kv = relax.Var("kv", relax.ObjectType())
    w = relax.Var("w", relax.TensorType((64, 64), "float32"))
    with bb.function("main", [x, kv, w]):
        with bb.dataflow():
            out = bb.emit_output(reader(bb, x, w))
        bb.emit_func_output(out)
    func = bb.get()["main"].with_attr("num_input", 2)
    return tvm.IRModule({"main": quantize_params(func, [weight_format("int4", 32)])})


def _calls(mod):
    found = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call):
                found.append(str(v.args[0].global_symbol) if isinstance(v.args[0], relax.ExternFunc) else v.op.name)
    return found


def test_fuse_dequantize_folds_linears_and_combined_linears():
    from qwen2c.targets.tvm.pipelines.combine_parallel_linears import combine_parallel_linears
    from qwen2c.targets.tvm.pipelines.fuse_dequantize import fuse_dequantize

    def two_linears(bb, x, w):
        a = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w))))
        b = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w))))
        return bb.emit(relax.op.add(a, b))

    before = _module(two_linears)
    assert "qwen2c.kernel.dequantize" in _calls(before)
    after = fuse_dequantize()(tvm.transform.Sequential(combine_parallel_linears())(before))
    calls = _calls(after)
    assert calls.count("qwen2c.kernel.q_matmul") == 1  # combined, then read packed
    assert "qwen2c.kernel.dequantize" not in calls and "relax.matmul" not in calls
    assert "relax.concat" in calls  # of the packed bytes and the scales, lifted to load time later


def test_fuse_dequantize_refuses_a_reader_without_a_kernel():
    from qwen2c.targets.tvm.pipelines import run_pipeline
    from qwen2c.targets.tvm.pipelines.fuse_dequantize import fuse_dequantize

    def elementwise(bb, x, w):
        return bb.emit(relax.op.add(x, bb.emit(relax.op.sum(w, axis=[0]))))

    with pytest.raises(BackendUnavailableError, match="weight w is read by relax.sum"):
        run_pipeline([fuse_dequantize()], _module(elementwise))


def _manifest(engine):
    return json.loads((engine / "manifest.json").read_text())


def test_int4_engine_stores_packed_weights_and_reports_what_it_costs(tmp_path, tiny_checkpoint, tiny_engine):
    from safetensors.numpy import load_file

    out = tmp_path / "int4"
    manifest = qwen2c.build(str(tiny_checkpoint), "llvm", out, max_context=160, quantize="int4", group_size=32)
    q = manifest["quantization"]
    assert q["scheme"] == "int4" and q["group_size"] == 32 and q["scale_dtype"] == "float16"
    assert q["float_reference"] == str(tiny_checkpoint.resolve())
    assert manifest["kv_cache_dtype"] == "float16"  # auto: as llama.cpp keeps its cache
    tensors = load_file(str(out / "model.safetensors"))
    packed = tensors["model.layers.0.mlp.down_proj.weight.qweight"]
    assert packed.dtype == np.uint8 and packed.shape == (64, 80)
    assert tensors["model.layers.0.mlp.down_proj.weight.scales"].shape == (64, 5)
    assert "model.embed_tokens.weight.qweight" in tensors and "lm_head.weight.qweight" not in tensors  # tied: once
    assert "model.norm.weight" in tensors
    parity = manifest["parity"]
    assert parity["passed"] and parity["positions"] == 159 and parity["llama_cpp"]["format"] == "Q4_0"
    # The kernels compute what transformers computes on the same dequantized weights (rounding what the
    # float16 cache rounds: quant_parity.cache_rounded), to float error.
    assert parity["kernels"]["max_abs_err_vs_transformers_on_dequantized_weights"] < 1e-4
    assert 0 < parity["engine"]["kl"] < 0.01
    assert (out / "model.safetensors").stat().st_size < 0.4 * (tiny_engine / "model.safetensors").stat().st_size

    # The same engine, verified again from its own files; without its float reference, a clear error.
    from qwen2c.verify import verify

    report = verify(out, record=False)
    assert report["kind"] == "quantized" and report["engine"] == parity["engine"]
    with pytest.raises(ConfigError, match="--reference"):
        verify(out, record=False, reference=str(tmp_path / "gone"))


def test_quantized_moe_engine_in_bfloat16(tmp_path):
    ckpt = write_moe_checkpoint(tmp_path / "moe", dtype="bfloat16", shared_expert_intermediate_size=64)
    manifest = qwen2c.build(str(ckpt), "llvm", tmp_path / "engine", dtype="bfloat16", max_context=96, quantize="int8")
    parity = manifest["parity"]
    assert parity["passed"] and parity["dtype"] == "bfloat16"
    kept = {k["name"] for k in manifest["quantization"]["kept_float"]}
    assert all(name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) for name in kept) and kept
    lib = (tmp_path / "engine" / "model.so").read_bytes()
    assert b"moe_grouped_swiglu_q" in lib and b"moe_grouped_down_q" in lib


def test_a_quantized_engine_over_its_limits_is_not_written(tmp_path, tiny_checkpoint, monkeypatch):
    from qwen2c import tolerances

    strict = tolerances.QuantLimit(kl_factor=1.0, kl_floor=0.0, kl_cap=1e-12, top1_margin=0.0)
    monkeypatch.setitem(tolerances.QUANT_LIMITS, "int4", strict)
    with pytest.raises(ParityError, match="KL .* exceeds the cap"):
        qwen2c.build(str(tiny_checkpoint), "llvm", tmp_path / "e", max_context=64, quantize="int4")
    assert not (tmp_path / "e").exists()


def test_cuda_quantized_engine_never_materializes_dequantized_weights(tmp_path):
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    from qwen2c.checkpoint import load_reference, resolve_model
    from qwen2c.graphs.export import export_model
    from qwen2c.graphs.pipeline import run_passes
    from qwen2c.quantization import weight_formats
    from qwen2c.targets.tvm.pipelines import pipeline_for, run_pipeline
    from qwen2c.targets.tvm.relax_module import build_relax_module

    ckpt = write_checkpoint(tmp_path / "ckpt", dtype="bfloat16", hidden_size=96, num_attention_heads=6)
    config, model = load_reference(resolve_model(str(ckpt)), "bfloat16")
    program = export_model(model, 32)
    run_passes(program, config, "bfloat16", check_lengths=())
    spec = TARGETS.resolve("cuda")
    formats = weight_formats(program, weight_format("int4"))
    with spec.tvm_target():
        mod = run_pipeline(pipeline_for(spec), build_relax_module(program, config, "bfloat16", "sparse", formats))
    kernels = {gv.name_hint: f for gv, f in mod.functions_items() if gv.name_hint.startswith("q_")}
    assert any(name.startswith("q_matmul") for name in kernels) and "q_take" in kernels
    for name, func in kernels.items():
        script = func.script()
        assert "threadIdx" in script, name  # scheduled by DLight
        assert 'sblock("dequantize")' not in script, name  # inlined into the weight loads: no [N, K] buffer
    load_time = mod["transform_params"].script()
    assert "dequantize" not in load_time and "uint8" in load_time  # only packed bytes are combined at load
    manifest = qwen2c.build(str(ckpt), "cuda", tmp_path / "engine", max_context=64, quantize="int4")
    assert manifest["device_code"]["arches"] == ["sm_90"] and manifest["quantization"]["scheme"] == "int4"


def test_bench_compares_decode_against_the_roofline(tmp_path, tiny_checkpoint, tiny_engine):
    from qwen2c.bench_decode import bench_decode, decode_bytes_per_token

    qwen2c.build(str(tiny_checkpoint), "llvm", tmp_path / "int8", max_context=64, quantize="int8")
    result = bench_decode([tiny_engine, tmp_path / "int8"], decode_tokens=4, repeats=1)
    f32, int8 = result["engines"]
    assert f32["weights"] == "float32" and int8["weights"] == "int8 g32"
    # 8.5 bits per quantized weight against 32 (norms and biases stay float32).
    assert 0.25 < int8["bytes_per_token"] / f32["bytes_per_token"] < 0.3
    assert f32["bytes_per_token"] == decode_bytes_per_token(tiny_engine, _manifest(tiny_engine))
    assert all(e["decode_ms_per_token"] > 0 and e["roofline_fraction"] > 0 for e in result["engines"])
