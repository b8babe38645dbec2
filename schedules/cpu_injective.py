"""Schedule the legalized elementwise TIR of an engine for the CPU.

Relax legalizes the ops that no qwen2c kernel serves (SwiGLU's silu * up, residual adds, casts)
into plain loop nests: one thread, scalar code. Measured on qwen2-0.5b prefill of 128 tokens (two
cores): silu * up took 48 ms of 740, 29 ms with this schedule. This pass gives injective functions
a parallel, vectorized loop.

Reductions (RMSNorm) are left alone: DLight's CPU reduction rule made the decode step's
RMSNorm 20x slower (0.29 ms per [1, 896] row, measured), more than it saved in prefill.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

# Elements per parallel task: large enough that a task's work outweighs its launch (a decode
# step's [1, 1, hidden] ops stay one task), small enough to spread a prompt's rows over cores.
TASK_ELEMENTS = 4096


class Injective(CPUScheduleRule):
    """All-spatial functions: inline producers, fuse the loops, parallel tasks, vector lanes."""

    def __init__(self, vector_lanes: int):
        self.lanes = vector_lanes

    def apply(self, func: tirx.PrimFunc, target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        if func.attrs is not None and func.attrs.get("tirx.is_host_func", False):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if not blocks or not all(b.is_injective() for b in blocks):
            return None
        try:
            for block in blocks[:-1]:
                sch.compute_inline(block.block_rv)
        except s_tir.ScheduleError:  # a producer that cannot be inlined: leave the function as is
            return None
        loops = sch.get_loops(blocks[-1].block_rv)
        if not loops:
            return None
        fused = sch.fuse(*loops)
        task, lane = sch.split(fused, [None, self.lanes])
        outer, _inner = sch.split(task, [None, TASK_ELEMENTS // self.lanes])
        sch.parallel(outer)
        # TVM 0.27's vectorizer rejects a Let whose value the bfloat16 legalizer rewrote ("Let cannot
        # bind the same var to two different values": the KV cache's RoPE kernel in bfloat16), so
        # functions with a Let stay parallel but scalar.
        if "T.Let(" not in func.script():
            sch.vectorize(lane)
        return sch


def schedule_cpu_injective(vector_lanes: int) -> tvm.transform.Pass:
    """DLight over the module's unscheduled TIR with qwen2c's injective rule."""
    return dlight.ApplyDefaultSchedule(Injective(vector_lanes))
