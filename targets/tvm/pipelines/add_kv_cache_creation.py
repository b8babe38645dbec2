"""Add ``create_kv_cache`` to the engine module: TVM's paged KV cache, built for the target.

The traced program lowers attention to calls into a cache object it receives as an argument;
which cache, and which attention kernels it carries, depends on the target (TVM's
``TIRPagedKVCache`` generates CPU or GPU kernels by the target it is given). The model's cache
geometry travels on the module as the attribute ``qwen2c.kv_cache`` (set in ``relax_module.py``).

RoPE: the cache rotates q and k (``RopeMode.NORMAL``) with qwen2c's kernel and the model's own
frequency table (``schedules/rope.py``), carried as the cache's RoPE extension factors.

Sliding windows: layers transformers makes sliding-window layers are the cache's ``mha_sliding``
layers, with the window as its per-layer window size. For those layers the cache attends a decode
step over the window's pages, and a prefill chunk over the cached keys within each query's window
(TVM's sliding-window paged kernels) plus the chunk's own keys, causally: so a chunk must not be
longer than the window (the runtime splits longer prompts; ``prefill_chunk`` in the manifest).

The function: ``create_kv_cache(max_batch, max_total_seq_len, prefill_chunk, page_size, sliding)``;
``sliding`` is TVM's per-sequence window (0: qwen2c's engines do not use it).
Runs first in every pipeline.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx

from qwen2c.schedules.rope import SPLIT_ROTARY, split_rotary_kernel

KV_CACHE_ATTR = "qwen2c.kv_cache"
KV_CACHE_ARGS = ("max_batch_size", "max_total_seq_len", "prefill_chunk_size", "page_size", "support_sliding_window")


def kv_cache_geometry(mod: tvm.IRModule) -> dict | None:
    """The module's cache geometry; None for a module without attention (no attribute)."""
    attrs = mod.attrs or {}
    if KV_CACHE_ATTR not in attrs:
        return None
    g = attrs[KV_CACHE_ATTR]
    return {"layers": int(g["layers"]), "q_heads": int(g["q_heads"]), "kv_heads": int(g["kv_heads"]),
            "head_dim": int(g["head_dim"]), "dtype": str(g["dtype"]),
            "rope_inv_freq": [float(f) for f in g["rope_inv_freq"]], "rope_scaling": float(g["rope_scaling"]),
            "sliding_windows": [int(w) for w in g["sliding_windows"]]}


def prefill_chunk_limit(geometry: dict) -> int | None:
    """The longest prefill chunk the cache attends exactly: the sliding window, if any layer slides."""
    windows = [w for w in geometry["sliding_windows"] if w]
    return min(windows) if windows else None


def add_kv_cache_creation(target: tvm.target.Target) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="AddKVCacheCreation")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _add(mod, target)

    return _pass


def _add(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache

    g = kv_cache_geometry(mod)
    if g is None:
        return mod
    windows = g["sliding_windows"]
    sliding = sorted({w for w in windows if w})
    # transformers' Qwen2 has one sliding_window for every sliding layer, and so has TVM's cache.
    assert len(sliding) <= 1, f"layers slide over different windows {sliding}"
    # The table the RoPE kernel reads: transformers' inv_freq, then its cos/sin scaling.
    table = np.array([*g["rope_inv_freq"], g["rope_scaling"]], dtype="float32")
    bb = relax.BlockBuilder(mod)
    sizes = {name: tirx.Var(name, "int64") for name in KV_CACHE_ARGS}
    params = [relax.Var(f"{name}_", relax.ShapeType([v])) for name, v in sizes.items()]
    with bb.function("create_kv_cache", params):
        cache = TIRPagedKVCache(
            attn_kind=["mha_sliding" if w else "mha" for w in windows],
            max_batch_size=sizes["max_batch_size"],
            max_total_seq_len=sizes["max_total_seq_len"],
            prefill_chunk_size=sizes["prefill_chunk_size"],
            page_size=sizes["page_size"],
            support_sliding_window=sizes["support_sliding_window"],
            layer_partition=relax.ShapeExpr([0, g["layers"]]),
            num_hidden_layers=g["layers"],
            num_attention_heads=g["q_heads"],
            num_key_value_heads=g["kv_heads"],
            qk_head_dim=g["head_dim"],
            v_head_dim=g["head_dim"],
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=0,  # unused: the RoPE kernel reads its table
            rope_scaling={},
            rope_ext_factors=relax.const(table),
            rotary_dim=g["head_dim"],
            enable_disaggregation=False,
            dtype=g["dtype"],
            target=target,
            layer_sliding_window_size=sliding[0] if sliding else 1,  # must be positive, unused without sliding layers
        )
        bb.emit_func_output(bb.emit(cache._expr))
    mod = bb.finalize()
    rope = split_rotary_kernel(g["q_heads"], g["kv_heads"], g["head_dim"], g["dtype"], cpu=target.kind.name == "llvm")
    (gvar,) = [gv for gv in mod.get_global_vars() if gv.name_hint == SPLIT_ROTARY]
    mod[gvar] = rope.with_attr("global_symbol", SPLIT_ROTARY)
    return mod
