"""What one decode step launches, read from the compiled Relax module (before it is linked).

Per-token host overhead on a GPU is one VM call plus one launch per kernel, unless a CUDA graph
replays a captured run of them as one launch. This counts, in ``decode`` and the functions it
calls: kernel launches (calls of TIR functions), KV-cache calls (each runs the cache's own
append and attention kernels), and CUDA-graph replays with the kernels they cover. The build
prints it and the manifest keeps it under ``launches``.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax, tirx

GRAPH_REPLAY = "vm.builtin.cuda_graph.run_or_capture"
_BUILTIN_WITH_CTX = tvm.ir.Op.get("relax.call_builtin_with_ctx")


def launch_report(mod: tvm.IRModule, function: str = "decode") -> dict[str, Any]:
    counts = {"kernels": 0, "kv_cache_calls": 0, "graph_replays": 0, "kernels_in_graphs": 0}
    _count(mod, mod.get_global_var(function), counts, in_graph=False, seen=set())
    launches = counts["kernels"] - counts["kernels_in_graphs"] + counts["graph_replays"]
    return {"function": function, **counts, "host_launches": launches}


def _count(mod, gvar, counts, in_graph: bool, seen: set) -> None:
    func = mod[gvar]
    calls: list[relax.Call] = []
    relax.analysis.post_order_visit(func.body, lambda e: calls.append(e) if isinstance(e, relax.Call) else None)
    for call in calls:
        op = call.op
        if isinstance(op, tvm.ir.GlobalVar) and isinstance(mod[op], tirx.PrimFunc):
            if not _is_host(mod[op]):
                counts["kernels"] += 1
                counts["kernels_in_graphs"] += int(in_graph)
        elif isinstance(op, tvm.ir.GlobalVar) and op not in seen:
            seen.add(op)
            _count(mod, op, counts, in_graph, seen)
        elif isinstance(op, relax.ExternFunc) and "attention_kv_cache" in str(op.global_symbol):
            counts["kv_cache_calls"] += 1
        elif op == _BUILTIN_WITH_CTX and str(call.args[0].global_symbol) == GRAPH_REPLAY:
            # run_or_capture(captured function, its arguments, graph index)
            counts["graph_replays"] += 1
            _count(mod, call.args[1].fields[0], counts, in_graph=True, seen=seen)


def _is_host(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_host_func", False))
