"""Swap the KV cache's CPU prefill attention kernels for qwen2c's parallel ones (and, for models
with sliding-window layers, its sliding-window paged prefill kernel).

TVM's CPU prefill kernels are serial and scalar (see ``schedules/cpu_attention.py``); qwen2c's
have the same signatures and results. Runs right after ``add_kv_cache_creation`` in the CPU
pipeline. If TVM renamed its kernels, the swap is skipped with a warning and TVM's are used.
"""

from __future__ import annotations

import logging

import tvm
from tvm import tirx

from qwen2c.schedules.cpu_attention import (
    CACHE_PAGE_SIZE,
    PAGED_PREFILL,
    PAGED_PREFILL_SLIDING,
    RAGGED_PREFILL,
    paged_prefill_kernel,
    paged_prefill_sliding_kernel,
    ragged_prefill_kernel,
)

from .add_kv_cache_creation import kv_cache_geometry

log = logging.getLogger(__name__)


def use_cpu_attention_kernels(vector_lanes: int) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="UseCpuAttentionKernels")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _swap(mod, vector_lanes)

    return _pass


def _swap(mod: tvm.IRModule, vector_lanes: int) -> tvm.IRModule:
    g = kv_cache_geometry(mod)
    if g is None:
        return mod
    heads = (g["kv_heads"], g["q_heads"], g["head_dim"], vector_lanes)
    windows = [w for w in g["sliding_windows"] if w]
    replaced = set()
    for gvar in mod.get_global_vars():
        original = mod[gvar]
        symbol = original.attrs.get("global_symbol") if isinstance(original, tirx.PrimFunc) and original.attrs else None
        if symbol == RAGGED_PREFILL:
            kernel = ragged_prefill_kernel(*heads, dtype=g["dtype"])
        elif symbol == PAGED_PREFILL:
            kernel = paged_prefill_kernel(*heads, page_size=CACHE_PAGE_SIZE, dtype=g["dtype"])
        elif symbol == PAGED_PREFILL_SLIDING and windows:
            kernel = paged_prefill_sliding_kernel(*heads, page_size=CACHE_PAGE_SIZE, window=windows[0], dtype=g["dtype"])
        else:
            continue
        mod[gvar] = kernel.with_attr("global_symbol", symbol)
        replaced.add(symbol)
    # TVM's sliding-window kernel is wrong where a query's first key is masked: never run it.
    assert not windows or PAGED_PREFILL_SLIDING in replaced, f"no {PAGED_PREFILL_SLIDING} kernel to replace"
    if not {RAGGED_PREFILL, PAGED_PREFILL} <= replaced:
        log.warning("the KV cache's prefill kernels were not all found (%s); using TVM's", sorted(replaced))
    return mod
