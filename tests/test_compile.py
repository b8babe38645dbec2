"""The TVM compile pipeline: what it does to an engine's TIR, checked on small modules."""

import re

import numpy as np
import tvm
from tvm import relax

from qwen2c.targets.registry import TARGETS
from qwen2c.targets.tvm.compile import compile_module

SPEC = TARGETS.resolve("llvm")
LANES = SPEC.vector_bits // 32


def _module(k=LANES * 4, n=8):
    """linear(x, w) (qwen2c's kernel) then silu (legalized); the symbolic m gives the VM a shape function."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, tvm.tirx.Var("m", "int64"), k), "float32"))
    w = relax.Var("w", relax.TensorType((n, k), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.silu(bb.emit(relax.op.linear(x, w)))))
        bb.emit_func_output(out)
    return bb.get()


def _llvm_sources(executable) -> list[str]:
    todo, sources = [executable.mod], []
    while todo:
        m = todo.pop()
        if m.kind == "llvm":
            sources.append(m.inspect_source("ll"))
        todo.extend(m.imports)
    return sources


def test_noalias_kernels_are_built_apart_from_the_other_tir():
    executable = compile_module(_module(), SPEC).executable
    sources = _llvm_sources(executable)
    kernels = [s for s in sources if re.search(r"@__tvm_ffi_nt_matmul\w*\(", s)]
    assert len(kernels) == 1 and len(sources) >= 2
    assert re.search(r"@__tvm_ffi_silu\w*\(", kernels[0])  # scheduled legalized ops are noalias too
    assert not re.search(r"@__tvm_ffi_shape_func", kernels[0])  # the VM's shape functions are not


def test_compiled_module_computes_linear_silu():
    vm = relax.VirtualMachine(compile_module(_module(), SPEC).executable, tvm.cpu())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, LANES * 4), dtype=np.float32)
    w = rng.standard_normal((8, LANES * 4), dtype=np.float32)
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w))
    y = x @ w.T
    np.testing.assert_allclose(got.numpy(), y / (1 + np.exp(-y)), rtol=1e-5, atol=1e-5)


def test_elementwise_functions_are_scheduled_parallel_and_vectorized():
    from qwen2c.targets.tvm.pipelines import pipeline_for

    with SPEC.tvm_target():
        mod = tvm.transform.Sequential(pipeline_for(SPEC))(_module())
    silu = [f for gv, f in mod.functions_items() if "silu" in gv.name_hint]
    assert silu and silu[0].attrs.get("tirx.is_scheduled")
    script = silu[0].script()
    assert "T.parallel" in script and "T.vectorized" in script
