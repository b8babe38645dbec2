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
