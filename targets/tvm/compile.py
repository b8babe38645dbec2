"""Compile an engine's Relax module for a target: its device kind's pipeline, then the build."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import tvm
from tvm import relax

from ..registry import TargetSpec
from .device_code import device_codegen
from .launch_report import launch_report
from .pipelines import pipeline_for, run_pipeline, surfacing_user_errors
from .pipelines.record_weight_layout import WEIGHT_LAYOUT_ATTR
from .vector_exp import vector_exp_lowering

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Compiled:
    executable: relax.VMExecutable
    launches: dict[str, Any] | None  # GPU: what one decode step launches (launch_report.py)
    # What transform_params makes of the weights (pipelines/record_weight_layout.py); None: run it.
    weight_layout: list[list[int]] | None = None


def compile_module(mod: tvm.IRModule, spec: TargetSpec) -> Compiled:
    target = spec.tvm_target()
    # CUDA graphs: RewriteCUDAGraph (in the GPU pipeline) only acts when this is set.
    config = {"relax.backend.use_cuda_graph": True} if spec.device == "cuda" else {}
    with target, tvm.transform.PassContext(config=config):
        mod = run_pipeline(pipeline_for(spec), mod)
    layout = _weight_layout(mod)
    if spec.device == "cpu":
        with vector_exp_lowering():  # vector_exp.py: no libm call per lane
            return Compiled(_link(mod, target), None, layout)
    launches = launch_report(mod) if "decode" in [gv.name_hint for gv in mod.get_global_vars()] else None
    with surfacing_user_errors(), device_codegen(spec):
        return Compiled(relax.build(mod, target=target, relax_pipeline=None), launches, layout)


def _weight_layout(mod: tvm.IRModule) -> list[list[int]] | None:
    layout = (mod.attrs or {}).get(WEIGHT_LAYOUT_ATTR)
    return None if layout is None else [[int(i) for i in out] for out in layout]


def _link(mod: tvm.IRModule, target: tvm.target.Target) -> relax.VMExecutable:
    """``relax.build`` without its pipeline, with the kernels compiled as their own LLVM module.

    Why (measured, TVM 0.27, two cores): built in one module with the rest of the engine's TIR (the
    VM's shape functions, the KV cache's functions, which are not ``tirx.noalias``), the grouped
    MoE kernel ran at 38 ms where the same TIR built on its own ran at 15.6 ms (128 tokens x 8
    experts, 1024 x 1024); every nt_matmul was about 2x slower too. Building the kernels that
    declare ``tirx.noalias`` as a separate module and importing it restores the standalone speed
    (MoE prefill 367 -> 172 ms, qwen2-0.5b prefill 0.38x -> 0.56x of eager). The VM finds imported
    functions by name, as before. What in TVM's LLVM path causes the slowdown is not pinned down.
    """
    from tvm.relax import vm_build
    from tvm.tirx import PrimFunc

    builder = relax.ExecBuilder()
    mod = vm_build._vmcodegen(builder, mod, "bytecode")
    prims = {gv: f for gv, f in mod.functions_items() if isinstance(f, PrimFunc)}
    restricted = {gv: f for gv, f in prims.items() if f.attrs is not None and bool(f.attrs.get("tirx.noalias", False))}
    others = {gv: f for gv, f in prims.items() if gv not in restricted}
    kernels = tvm.tirx.build(tvm.IRModule(restricted, attrs=mod.attrs), target=target)
    log.info("linking %d noalias kernels and %d other TIR functions", len(restricted), len(others))
    return vm_build._vmlink(builder, target, tvm.IRModule(others, attrs=mod.attrs), ext_libs=[kernels])
