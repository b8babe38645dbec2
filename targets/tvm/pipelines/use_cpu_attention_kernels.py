"""Swap the KV cache's CPU attention kernels (prefill, decode, and for models with sliding-window
layers the sliding-window paged prefill) for qwen2c's parallel ones.

TVM's CPU attention kernels are serial and scalar; qwen2c's have the same signatures and results:
a prompt's attention over itself is ``schedules/cpu_blocked_attention.py`` (tiles of queries x
keys), over the cache's pages ``schedules/cpu_attention.py``, decode
``schedules/cpu_decode_attention.py``. Runs right after ``add_kv_cache_creation`` in the CPU
pipeline. If TVM renamed its kernels, the swap is skipped with a warning and TVM's are used.
"""

from __future__ import annotations

import logging

import tvm
from tvm import tirx

from qwen2c.autotune import params
from qwen2c.schedules.cpu_attention import (
    CACHE_PAGE_SIZE,
    PAGED_PREFILL,
    PAGED_PREFILL_SLIDING,
    RAGGED_PREFILL,
    paged_prefill_kernel,
    paged_prefill_sliding_kernel,
)
from qwen2c.schedules.cpu_blocked_attention import blocked_ragged_prefill_kernel
from qwen2c.schedules.cpu_decode_attention import DECODE, DECODE_SLIDING, SPLITS, decode_kernel

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
            kernel = blocked_ragged_prefill_kernel(*heads, dtype=g["dtype"])
        elif symbol == PAGED_PREFILL:
            kernel = paged_prefill_kernel(*heads, page_size=CACHE_PAGE_SIZE, dtype=g["dtype"])
        elif symbol == PAGED_PREFILL_SLIDING and windows:
            kernel = paged_prefill_sliding_kernel(*heads, page_size=CACHE_PAGE_SIZE, window=windows[0], dtype=g["dtype"])
        elif symbol in (DECODE, DECODE_SLIDING):
            shape = {"kv_heads": heads[0], "q_heads": heads[1], "head_dim": heads[2], "vector": vector_lanes,
                     "dtype": g["dtype"], "sliding_window": symbol == DECODE_SLIDING}
            kernel = params.kernel("decode_attention", shape, {"splits": SPLITS}, lambda splits: decode_kernel(
                *heads, page_size=CACHE_PAGE_SIZE, dtype=g["dtype"], sliding_window=symbol == DECODE_SLIDING,
                splits=splits))
        else:
            continue
        mod[gvar] = kernel.with_attr("global_symbol", symbol)
        replaced.add(symbol)
    # TVM's sliding-window kernel is wrong where a query's first key is masked: never run it.
    assert not windows or PAGED_PREFILL_SLIDING in replaced, f"no {PAGED_PREFILL_SLIDING} kernel to replace"
    expected = {RAGGED_PREFILL, PAGED_PREFILL, DECODE, DECODE_SLIDING}
    if not expected <= replaced:
        log.warning("the KV cache's attention kernels %s were not found; TVM's are used for them",
                    sorted(expected - replaced))
    return mod
