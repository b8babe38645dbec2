"""The CPU linear-layer kernel: numbers against NumPy at decode (m=1) and prefill shapes, and dispatch."""

import numpy as np
import pytest
import tvm
from tvm import relax

from qwen2c.schedules.cpu_matmul import dispatch_cpu_matmul, nt_matmul_kernel
from qwen2c.targets.registry import TARGETS

TARGET = TARGETS.resolve("llvm")
LANES = TARGET.vector_bits // 32


@pytest.mark.parametrize("k, n", [(64, 128), (LANES * 3, 12), (256, 36)])
@pytest.mark.parametrize("m", [1, 2, 7])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_kernel_matches_numpy(k, n, m, rows):
    func = nt_matmul_kernel(k, n, LANES, rows)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET.tvm_target())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    y = tvm.runtime.tensor(np.zeros((1, m, n), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), y)
    np.testing.assert_allclose(y.numpy(), x @ w.T, rtol=1e-5, atol=1e-4)


def _linear_module(k, n, dtype="float32"):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, tvm.tirx.Var("m", "int64"), k), dtype))
    w = relax.Var("w", relax.TensorType((n, k), dtype))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.linear(x, w)))
        bb.emit_func_output(out)
    return bb.get()


def test_dispatch_rewrites_linear_and_leaves_what_it_cannot_serve():
    served = dispatch_cpu_matmul(LANES)(_linear_module(LANES * 4, 8))
    assert any(gv.name_hint.startswith("nt_matmul") for gv in served.functions)
    odd_k = dispatch_cpu_matmul(LANES)(_linear_module(LANES * 4 + 1, 8))
    assert not any(gv.name_hint.startswith("nt_matmul") for gv in odd_k.functions)
    half = dispatch_cpu_matmul(LANES)(_linear_module(LANES * 4, 8, "float16"))
    assert any(gv.name_hint.startswith("nt_matmul") and "float16" in gv.name_hint for gv in half.functions)
    double = dispatch_cpu_matmul(LANES)(_linear_module(LANES * 4, 8, "float64"))
    assert not any(gv.name_hint.startswith("nt_matmul") for gv in double.functions)


@pytest.mark.parametrize("k, n, rows, col_vectors", [
    (k, n, rows, cv) for k, n in [(64, LANES * 2), (LANES * 3, LANES * 8), (96, LANES * 4)]
    for rows, cv in [(8, 2), (3, 1), (4, 4)] if n % (cv * LANES) == 0])
@pytest.mark.parametrize("m", [1, 2, 9, 17])
def test_packed_prompt_kernel_matches_numpy(k, n, m, rows, col_vectors):
    from qwen2c.schedules.cpu_packed_matmul import packed_matmul_kernel

    func = packed_matmul_kernel(k, n, LANES, rows, col_vectors)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET.tvm_target())
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    y = tvm.runtime.tensor(np.full((1, m, n), 7, np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), y)
    np.testing.assert_allclose(y.numpy(), x @ w.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_packed_prompt_kernel_in_half_precision_accumulates_in_float32(dtype):
    import ml_dtypes

    from qwen2c.schedules.cpu_packed_matmul import packed_matmul_kernel

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    k, n, m = 512, LANES * 4, 11
    func = packed_matmul_kernel(k, n, LANES, dtype=dtype)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET.tvm_target())
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, m, k)).astype(np_dtype)
    w = rng.standard_normal((n, k)).astype(np_dtype)
    y = tvm.runtime.tensor(np.zeros((1, m, n), np_dtype))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), y)
    want = (x.astype(np.float32) @ w.astype(np.float32).T).astype(np_dtype).astype(np.float32)
    # Summed in float32, rounded once: at most one unit in the last place of the result's dtype.
    np.testing.assert_allclose(y.numpy().astype(np.float32), want, rtol=1e-2 if dtype == "bfloat16" else 2e-3, atol=1e-2)


def test_prompts_take_the_packed_kernel_and_decode_steps_nt_matmul():
    mod = _linear_module(LANES * 4, LANES * 8)
    served = dispatch_cpu_matmul(LANES)(mod)
    assert any(gv.name_hint.startswith("packed_matmul") for gv in served.functions)
    decode = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 1, LANES * 4), "float32"))
    w = relax.Var("w", relax.TensorType((LANES * 8, LANES * 4), "float32"))
    with decode.function("main", [x, w]):
        with decode.dataflow():
            out = decode.emit_output(decode.emit(relax.op.linear(x, w)))
        decode.emit_func_output(out)
    one_row = dispatch_cpu_matmul(LANES)(decode.get())
    names = [gv.name_hint for gv in one_row.functions]
    assert any(n.startswith("nt_matmul") and "decode" in n for n in names) and not any("packed" in n for n in names)
