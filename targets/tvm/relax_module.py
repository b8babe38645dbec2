"""Assemble the engine's Relax module from the rewritten program.

The module holds three functions:
- ``create_kv_cache(max_batch, max_total_seq_len, prefill_chunk, page_size, sliding)``: a paged KV
  cache with TVM's TIR attention kernels for the target, RoPE applied inside (theta from the config);
- ``prefill(input_ids[1, n], kv_cache, *params) -> logits[1, 1, vocab]``;
- ``decode(input_ids[1, 1], kv_cache, *params) -> logits[1, 1, vocab]``: the same graph with n
  bound to 1, so its matmuls are scheduled as matrix-vector products.

For MoE models both return ``(logits, experts_0, ..., experts_L)``: each sparse layer's chosen
experts per token ([n, top_k] int64), as the traced program does.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax, tirx
from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache
from tvm.relax.frontend.torch import from_exported_program
from tvm.relax.utils import copy_with_new_vars

from qwen2c.model_config import head_dim, rope_theta

from qwen2c.schedules.cpu_attention import (
    CACHE_PAGE_SIZE,
    PAGED_PREFILL,
    RAGGED_PREFILL,
    paged_prefill_kernel,
    ragged_prefill_kernel,
)

from .lower_ops import convert_map

log = logging.getLogger(__name__)

KV_CACHE_ARGS = ("max_batch_size", "max_total_seq_len", "prefill_chunk_size", "page_size", "support_sliding_window")


def build_relax_module(program, config, dtype: str, target: tvm.target.Target, vector_lanes: int,
                       moe_dispatch: str = "sparse") -> tvm.IRModule:
    kv_cache = relax.Var("kv_cache", relax.ObjectType())
    mod = from_exported_program(
        program,
        keep_params_as_input=True,
        unwrap_unit_return_tuple=True,
        run_ep_decomposition=False,
        custom_convert_map=convert_map(kv_cache, vector_lanes, moe_dispatch),
    )
    main = mod["main"]
    input_ids, *weights = main.params
    seq = input_ids.ty.shape[1]
    prefill = relax.Function([input_ids, kv_cache, *weights], main.body, main.ret_ty, is_pure=main.is_pure)
    prefill = prefill.with_attrs({k: v for k, v in main.attrs.items() if k != "params"})
    prefill = prefill.with_attr("num_input", 2)
    out = tvm.IRModule({"prefill": prefill.with_attr("global_symbol", "prefill")})
    for gvar, func in mod.functions_items():  # kernels the converters added (e.g. the MoE ones)
        if gvar.name_hint != "main":
            out[gvar] = func
    decode = copy_with_new_vars(prefill).with_attr("global_symbol", "decode")
    if isinstance(seq, tirx.Var):
        seq = decode.params[0].ty.shape[1]  # the copy has its own symbolic variables
        decode = relax.transform.BindSymbolicVars({seq: 1})(tvm.IRModule({"decode": decode}))["decode"]
    out["decode"] = decode
    out = _add_kv_cache_creation(out, config, dtype, target)
    if target.kind.name == "llvm" and dtype == "float32":
        out = _use_qwen2c_attention_kernels(out, config, vector_lanes)
    return out


def _use_qwen2c_attention_kernels(mod: tvm.IRModule, config, vector_lanes: int) -> tvm.IRModule:
    """Swap the cache's CPU prefill kernels for qwen2c's parallel ones (same signatures and results)."""
    heads = (config.num_key_value_heads, config.num_attention_heads, head_dim(config), vector_lanes)
    replaced = set()
    for gvar in mod.get_global_vars():
        original = mod[gvar]
        symbol = original.attrs.get("global_symbol") if isinstance(original, tirx.PrimFunc) and original.attrs else None
        if symbol == RAGGED_PREFILL:
            kernel = ragged_prefill_kernel(*heads)
        elif symbol == PAGED_PREFILL:
            kernel = paged_prefill_kernel(*heads, page_size=CACHE_PAGE_SIZE)
        else:
            continue
        mod[gvar] = kernel.with_attr("global_symbol", symbol)
        replaced.add(symbol)
    if replaced != {RAGGED_PREFILL, PAGED_PREFILL}:  # TVM renamed its kernels: keep going on its own
        log.warning("the KV cache's prefill kernels were not all found (%s); using TVM's", sorted(replaced))
    return mod


def _add_kv_cache_creation(mod: tvm.IRModule, config, dtype: str, target: tvm.target.Target) -> tvm.IRModule:
    bb = relax.BlockBuilder(mod)
    sizes = {name: tirx.Var(name, "int64") for name in KV_CACHE_ARGS}
    params = [relax.Var(f"{name}_", relax.ShapeType([v])) for name, v in sizes.items()]
    dim = head_dim(config)
    with bb.function("create_kv_cache", params):
        cache = TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=sizes["max_batch_size"],
            max_total_seq_len=sizes["max_total_seq_len"],
            prefill_chunk_size=sizes["prefill_chunk_size"],
            page_size=sizes["page_size"],
            support_sliding_window=sizes["support_sliding_window"],
            layer_partition=relax.ShapeExpr([0, config.num_hidden_layers]),
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            qk_head_dim=dim,
            v_head_dim=dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=rope_theta(config),
            rope_scaling={},
            rope_ext_factors=relax.prim_value(0),
            rotary_dim=dim,
            enable_disaggregation=False,
            dtype=dtype,
            target=target,
        )
        bb.emit_func_output(bb.emit(cache._expr))
    return bb.finalize()
