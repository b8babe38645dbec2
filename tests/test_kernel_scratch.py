"""The decode step's linear-layer kernels keep their per-task scratch on the stack.

TVM 0.27 lowers a buffer declared ``scope="local"`` to a TVMBackendAllocWorkspace call and a free
in every parallel task (schedules/__init__.py); a small one in the default scope stays on the stack.
This compiles each kernel (LLVM, no run: the VNNI one needs no VNNI CPU) and reads the LLVM IR of
its parallel bodies: none may call the workspace allocator.
"""

import re

import pytest
import tvm

from qwen2c.schedules import cpu_matmul, cpu_qmatmul, cpu_vnni_gemv
from qwen2c.targets.registry import TARGETS

AVX512 = TARGETS.resolve("llvm-avx512")
VNNI = TARGETS.resolve("llvm-avx512-vnni")

# qwen2-0.5b's decode layers: q/k/v, o, gate/up, down (the vocabulary projection has the first's shape).
SHAPES = [(896, 1152), (896, 896), (896, 9728), (4864, 896)]


def _parallel_bodies(func, target) -> list[str]:
    built = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target.tvm_target())
    module = built.mod if hasattr(built, "mod") else built
    ir = module.inspect_source("ll")
    bodies = [f for f in re.split(r"\ndefine ", ir)[1:] if "parallel_lambda" in re.search(r"@([\w.$]+)\(", f).group(1)]
    assert bodies, "the kernel has no parallel body: it no longer parallelizes, or TVM names it otherwise"
    return bodies


KERNELS = {
    "nt_matmul": lambda k, n: (cpu_matmul.nt_matmul_kernel(k, n, 16, 1, 4), AVX512),
    "q_matmul int4": lambda k, n: (cpu_qmatmul.q_matmul_kernel(k, n, 4, 32, 16, 1), AVX512),
    "q_matmul int8": lambda k, n: (cpu_qmatmul.q_matmul_kernel(k, n, 8, 32, 16, 1), AVX512),
    "vnni_gemv int4": lambda k, n: (cpu_vnni_gemv.vnni_gemv_kernel(k, n, 4, 32), VNNI),
    "vnni_gemv int8": lambda k, n: (cpu_vnni_gemv.vnni_gemv_kernel(k, n, 8, 32, tile_cols=8), VNNI),
}


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=lambda s: f"{s[0]}x{s[1]}")
def test_decode_kernels_allocate_no_workspace_per_task(name, shape):
    func, target = KERNELS[name](*shape)
    for body in _parallel_bodies(func, target):
        assert "AllocWorkspace" not in body, f"{name} {shape}: a parallel task allocates from TVM's workspace pool"
