"""The VNNI kernels for quantized weights (``schedules/cpu_vnni_gemv.py`` for decode steps,
``cpu_vnni_gemm.py`` for prompts): against NumPy doing the same int8 activation rounding, and engines
built with them against transformers doing it too.

Compiling needs nothing of this CPU; running needs AVX-512 VNNI, so those tests skip elsewhere."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
import tvm

import qwen2c
from conftest import write_checkpoint
from qwen2c.quant_parity import round_activations
from qwen2c.quantization import weight_format
from qwen2c.schedules import cpu_vnni_gemm
from qwen2c.schedules.cpu_vnni_gemm import vnni_gemm_kernel
from qwen2c.schedules.cpu_vnni_gemv import ACT_GROUP, fits, vnni_gemv_kernel
from qwen2c.targets.registry import TARGETS, _cpu_flags, host_target_name

VNNI = TARGETS.resolve("llvm-avx512-vnni")
runs_here = pytest.mark.skipif("avx512_vnni" not in _cpu_flags() or "avx512bw" not in _cpu_flags(),
                               reason="this CPU has no AVX-512 VNNI")


def _compile(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=VNNI.tvm_target())


def _numpy_reference(x, fmt, q, scales):
    """y = round_q8_0(x) @ W^T, in float64, W the stored weights dequantized."""
    xr = round_activations(torch.from_numpy(x.astype(np.float32)), ACT_GROUP).double().numpy()
    return xr @ fmt.dequantize(q, scales).double().numpy().T


def test_fits_only_whole_chunks():
    assert fits(896, 151936, 8, 32) and fits(4864, 896, 4, 64) and fits(128, 3, 4, 32)
    assert not fits(160, 64, 8, 32)  # 160 inputs: not whole 64-byte chunks
    assert not fits(192, 64, 4, 32)  # int4: 128 inputs per chunk
    with pytest.raises(ValueError, match="chunks"):
        vnni_gemv_kernel(160, 64, 8, 32)


def test_the_kernel_compiles_to_vpdpbusd_for_every_format():
    for bits in (8, 4):
        for group in (32, 64):
            asm = _compile(vnni_gemv_kernel(256, 12, bits, group)).mod.inspect_source("asm")
            assert asm.count("vpdpbusd") >= 1, (bits, group)


@runs_here
@pytest.mark.parametrize("scheme, group", [("int8", 32), ("int8", 64), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("k, n, tile_cols", [(128, 7, None), (384, 48, 8), (1024, 40, 2)])
def test_vnni_kernel_matches_numpy_with_rounded_activations(scheme, group, k, n, tile_cols):
    fmt = weight_format(scheme, group)
    torch.manual_seed(k + n)
    q, scales = fmt.quantize(torch.randn(n, k) * 0.05)
    rng = np.random.default_rng(n)
    x = rng.standard_normal(k).astype(np.float32) * rng.uniform(0.1, 10)
    x[: ACT_GROUP] = 0  # a group of zeros: scale 0, no division by it
    x[ACT_GROUP + 3] = 60.0  # an outlier sets its group's scale
    lib = _compile(vnni_gemv_kernel(k, n, fmt.bits, group, tile_cols=tile_cols))
    out = tvm.runtime.tensor(np.zeros((1, 1, n), np.float32))
    lib["main"](tvm.runtime.tensor(x.reshape(1, 1, k)), tvm.runtime.tensor(q), tvm.runtime.tensor(scales), out)
    want = _numpy_reference(x, fmt, q, scales)
    np.testing.assert_allclose(out.numpy().reshape(n), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    # What the rounding costs against float activations: small, but not nothing (this test would
    # not notice a kernel that skipped the rounding otherwise).
    exact = x.astype(np.float64) @ fmt.dequantize(q, scales).double().numpy().T
    assert 0 < np.abs(want - exact).max() < 0.05 * np.abs(exact).max()


def test_the_prompt_kernel_fits_whole_blocks_and_rounds_the_layers_the_decode_kernel_does():
    assert cpu_vnni_gemm.fits(896, 151936, 4, 32) and cpu_vnni_gemm.fits(4864, 896, 8, 64)
    assert not cpu_vnni_gemm.fits(160, 64, 8, 32)  # 160 inputs: not whole 64-input blocks
    assert not cpu_vnni_gemm.fits(128, 40, 4, 32)  # 40 outputs: not whole 16-column vectors
    assert cpu_vnni_gemm.serves(896, 1152, 4, 32) and not cpu_vnni_gemm.serves(192, 64, 4, 32)  # int4 decode: 128s
    assert cpu_vnni_gemm.defaults(1152)["col_vectors"] == 2 and cpu_vnni_gemm.defaults(48)["col_vectors"] == 1
    with pytest.raises(ValueError, match="blocks"):
        vnni_gemm_kernel(160, 64, 8, 32)
    for bits in (8, 4):
        assert _compile(vnni_gemm_kernel(256, 32, bits, 32)).mod.inspect_source("asm").count("vpdpbusd") >= 1


@runs_here
@pytest.mark.parametrize("scheme, group, m, k, n, rows, col_vectors", [
    ("int8", 32, 1, 64, 16, None, None), ("int4", 64, 1, 128, 32, None, None),  # one row: a clamped tile
    ("int8", 64, 7, 128, 64, None, None), ("int4", 32, 37, 384, 96, None, None),  # rows past the last tile
    ("int4", 64, 130, 256, 48, 3, 1), ("int8", 32, 9, 192, 64, 6, 2),  # other tiles; 3 x 64-input blocks
])
def test_vnni_prompt_kernel_matches_numpy_with_rounded_activations(scheme, group, m, k, n, rows, col_vectors):
    fmt = weight_format(scheme, group)
    torch.manual_seed(k + n + m)
    q, scales = fmt.quantize(torch.randn(n, k) * 0.05)
    rng = np.random.default_rng(m)
    x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10, (m, 1))).astype(np.float32)
    x[0, :ACT_GROUP] = 0  # a group of zeros: scale 0, no division by it
    x[-1, ACT_GROUP + 3] = 60.0  # an outlier sets its group's scale
    lib = _compile(vnni_gemm_kernel(k, n, fmt.bits, group, rows=rows, col_vectors=col_vectors))
    out = tvm.runtime.tensor(np.full((1, m, n), 7, np.float32))
    lib["main"](tvm.runtime.tensor(x.reshape(1, m, k)), tvm.runtime.tensor(q), tvm.runtime.tensor(scales), out)
    want = _numpy_reference(x, fmt, q, scales)
    np.testing.assert_allclose(out.numpy().reshape(m, n), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    exact = x.astype(np.float64) @ fmt.dequantize(q, scales).double().numpy().T
    assert 0 < np.abs(want - exact).max() < 0.05 * np.abs(exact).max()  # it does round


@runs_here
def test_vnni_kernel_in_bfloat16():
    fmt = weight_format("int4", 32)
    k, n = 256, 16
    torch.manual_seed(0)
    q, scales = fmt.quantize(torch.randn(n, k) * 0.05)
    x = np.random.default_rng(1).standard_normal(k).astype(ml_dtypes.bfloat16)
    lib = _compile(vnni_gemv_kernel(k, n, 4, 32, "bfloat16"))
    out = tvm.runtime.tensor(np.zeros((1, 1, n), ml_dtypes.bfloat16))
    lib["main"](tvm.runtime.tensor(x.reshape(1, 1, k)), tvm.runtime.tensor(q), tvm.runtime.tensor(scales), out)
    want = _numpy_reference(x.astype(np.float32), fmt, q, scales)
    np.testing.assert_allclose(out.numpy().astype(np.float32).reshape(n), want, rtol=1e-2, atol=1e-2)


def test_a_vnni_cpu_builds_for_the_vnni_target():
    flags = _cpu_flags()
    if {"avx512_vnni", "avx512bw", "avx512vl", "avx512f"} <= flags:
        assert host_target_name() == "llvm-avx512-vnni"
    else:
        assert host_target_name() != "llvm-avx512-vnni"


@runs_here
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_vnni_engine_rounds_activations_and_matches_transformers_doing_so(tmp_path, scheme):
    # Widths that fit the kernel (128 hidden, 256 intermediate: whole int4 chunks) and a vocabulary
    # projection through it too (tied embeddings).
    ckpt = write_checkpoint(tmp_path / "ckpt", seed=5, hidden_size=128, intermediate_size=256,
                            num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "engine"
    # A float32 cache: the float16 one (the default) rounds at its own boundaries too, whose flips
    # this bound on the activations' rounding would also count (test_quantization checks that one).
    manifest = qwen2c.build(str(ckpt), "llvm-avx512-vnni", out, max_context=96, quantize=scheme,
                            kv_cache_dtype="float32")
    rounding = manifest["quantization"]["decode_activations"]
    assert rounding["dtype"] == "int8" and rounding["group_size"] == ACT_GROUP and rounding["prompts"]
    kernels = {k["kernel"] for k in manifest["tuning"]["kernels"]}
    assert "q_gemv_vnni" in kernels  # the decode steps' layers
    assert "q_gemm_vnni" in kernels and "packed_matmul" not in kernels  # the prompts' (the same rounding)
    parity = manifest["parity"]
    assert parity["passed"], parity["failures"]
    kernels = parity["kernels"]
    assert kernels["passed"]
    # Two layers: few flipped roundings cascade, so the decode steps and the prompts are far closer to
    # transformers rounding the same activations than rounding moves the logits.
    assert kernels["rounded_decode"]["ratio"] < 0.3 and kernels["rounded_prompts"]["ratio"] < 0.3
    assert json.loads((out / "manifest.json").read_text())["quantization"]["decode_activations"] == rounding


def test_without_vnni_the_decode_step_keeps_float_activations(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", seed=5, hidden_size=128, intermediate_size=256)
    avx512 = TARGETS.resolve("llvm-avx512")
    if not set(avx512.cpu_features) <= _cpu_flags():
        pytest.skip("this CPU has no AVX-512")
    manifest = qwen2c.build(str(ckpt), "llvm-avx512", tmp_path / "engine", max_context=64, quantize="int8")
    assert manifest["quantization"]["decode_activations"] is None
    assert "q_gemv_vnni" not in {k["kernel"] for k in manifest["tuning"]["kernels"]}
    assert manifest["parity"]["passed"]


def test_the_rounding_check_is_coarse_but_catches_a_wrong_scale():
    from qwen2c.quant_parity import rounding_check

    rng = np.random.default_rng(0)
    unrounded = rng.standard_normal((40, 50))
    rounded = unrounded + rng.standard_normal((40, 50)) * 1e-2  # what rounding moves
    cascade = rounded + rng.standard_normal((40, 50)) * 1e-2  # rounded independently: a deep model's flips
    assert rounding_check(cascade, rounded, unrounded)["passed"]
    assert rounding_check(unrounded, rounded, unrounded)["passed"]  # not rounding at all is within it too
    wrong_scale = rounded * 1.05  # a kernel that scales wrongly is far beyond it
    assert not rounding_check(wrong_scale, rounded, unrounded)["passed"]
