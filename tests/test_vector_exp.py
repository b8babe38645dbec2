"""float32 exp/exp2 lowered to vector arithmetic while a CPU engine compiles (targets/tvm/vector_exp.py):
against NumPy in float64 over float32's whole range, no libm call left, TVM's lowering restored after."""

import numpy as np
import tvm
from tvm.script import tirx as T

from qwen2c.targets.registry import TARGETS
from qwen2c.targets.tvm.vector_exp import vector_exp_lowering

TARGET = TARGETS.resolve("llvm")


@T.prim_func
def _exps(a: T.Buffer((4096,), "float32"), e: T.Buffer((4096,), "float32"), e2: T.Buffer((4096,), "float32"),
          silu: T.Buffer((4096,), "float32")):
    for i in T.vectorized(4096):
        e[i] = T.exp(a[i])
        e2[i] = T.exp2(a[i])
        silu[i] = a[i] / (T.float32(1) + T.exp(T.float32(0) - a[i]))


def _compile():
    return tvm.compile(tvm.IRModule({"main": _exps}), target=TARGET.tvm_target())


def _asm(lib):
    return lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm")


def test_exp_and_exp2_match_numpy_without_libm_calls():
    with vector_exp_lowering():
        lib = _compile()
    assert "expf" not in _asm(lib) and "exp2f" not in _asm(lib)
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-150, 150, 2048), rng.standard_normal(2048) * 8]).astype(np.float32)
    outs = [tvm.runtime.tensor(np.zeros(4096, np.float32)) for _ in range(3)]
    lib["main"](tvm.runtime.tensor(x), *outs)
    e, e2, silu = (o.numpy().astype(np.float64) for o in outs)
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        want_e, want_e2, want_silu = np.exp(x64), np.exp2(x64), x64 / (1 + np.exp(-x64))
    for got, want in ((e, want_e), (e2, want_e2)):
        normal = (want > 1.2e-38) & (want < 3.4e38)
        np.testing.assert_allclose(got[normal], want[normal], rtol=3e-7)  # ~2 float32 ulps
        assert np.all(got[want <= 1.2e-38] <= 1.2e-38)  # no subnormals: 0 or the smallest normal
        assert np.all(got[want >= 3.4e38] >= 3.3e38)  # overflow: inf (exp), or 2^127.99 (exp2)
    np.testing.assert_allclose(silu, want_silu, rtol=3e-7, atol=1e-35)  # x / inf = 0 where it is ~1e-37


def test_tvm_lowering_is_restored_after():
    with vector_exp_lowering():
        pass
    assert "expf" in _asm(_compile())  # TVM's own: a libm call per lane
