"""Add ``create_kv_cache`` to the engine module: TVM's paged KV cache, built for the target.

The traced program lowers attention to calls into a cache object it receives as an argument;
which cache, and which attention kernels it carries, depends on the target (TVM's
``TIRPagedKVCache`` generates CPU or GPU kernels by the target it is given). The model's cache
geometry travels on the module as the attribute ``qwen2c.kv_cache`` (set in ``relax_module.py``).

The function: ``create_kv_cache(max_batch, max_total_seq_len, prefill_chunk, page_size, sliding)``.
Runs first in every pipeline.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

KV_CACHE_ATTR = "qwen2c.kv_cache"
KV_CACHE_ARGS = ("max_batch_size", "max_total_seq_len", "prefill_chunk_size", "page_size", "support_sliding_window")


def kv_cache_geometry(mod: tvm.IRModule) -> dict | None:
    """The module's cache geometry; None for a module without attention (no attribute)."""
    attrs = mod.attrs or {}
    if KV_CACHE_ATTR not in attrs:
        return None
    g = attrs[KV_CACHE_ATTR]
    return {"layers": int(g["layers"]), "q_heads": int(g["q_heads"]), "kv_heads": int(g["kv_heads"]),
            "head_dim": int(g["head_dim"]), "rope_theta": float(g["rope_theta"]), "dtype": str(g["dtype"])}


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
    bb = relax.BlockBuilder(mod)
    sizes = {name: tirx.Var(name, "int64") for name in KV_CACHE_ARGS}
    params = [relax.Var(f"{name}_", relax.ShapeType([v])) for name, v in sizes.items()]
    with bb.function("create_kv_cache", params):
        cache = TIRPagedKVCache(
            attn_kind="mha",
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
            rope_theta=g["rope_theta"],
            rope_scaling={},
            rope_ext_factors=relax.prim_value(0),
            rotary_dim=g["head_dim"],
            enable_disaggregation=False,
            dtype=g["dtype"],
            target=target,
        )
        bb.emit_func_output(bb.emit(cache._expr))
    return bb.finalize()
