"""Assemble the engine's Relax module from the rewritten program (target-independent).

The module holds:
- ``prefill(input_ids[1, n], kv_cache, *params) -> logits[1, 1, vocab]``;
- ``decode(input_ids[1, 1], kv_cache, *params) -> logits[1, 1, vocab]``: the same graph with n
  bound to 1, so its matmuls are scheduled as matrix-vector products;
- the attribute ``qwen2c.kv_cache``: the cache geometry, from which the target's pipeline adds
  ``create_kv_cache`` (``pipelines/add_kv_cache_creation.py``).

For MoE models both functions return ``(logits, experts_0, ..., experts_L)``: each sparse layer's
chosen experts per token ([n, top_k] int64), as the traced program does.
"""

from __future__ import annotations

import re

import tvm
from tvm import relax, tirx
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter
from tvm.relax.utils import copy_with_new_vars

from qwen2c.errors import UnsupportedModelError
from qwen2c.graphs.export import attention_geometry
from qwen2c.model_config import head_dim

from .bounded_embedding import CONVERTERS as BOUNDED_EMBEDDING
from .lower_ops import convert_map
from .pipelines.add_kv_cache_creation import KV_CACHE_ATTR
from .quantized_params import quantize_params


class _Importer(ExportedProgramImporter):
    """TVM's importer, minus its copy of every parameter.

    With ``keep_params_as_input`` it still converts each parameter to a TVM tensor for a "params"
    attribute this module drops: a second copy of the weights in memory, and for a checkpoint
    loaded zero-copy from safetensors (read-only memory, which DLPack refuses) a failure in
    bfloat16, which NumPy cannot hold. Parameters become empty placeholders; buffers and constants
    bound into the graph are converted as before.
    """

    def __init__(self, parameters):
        super().__init__()
        self._parameters = {id(p) for p in parameters}

    def _convert_pytorch_tensor_to_tvm(self, tensor_value):
        if id(tensor_value) in self._parameters:
            return tvm.runtime.empty((0,), "float32")
        return ExportedProgramImporter._convert_pytorch_tensor_to_tvm(tensor_value)


def build_relax_module(program, config, dtype: str, moe_dispatch: str = "sparse",
                       weight_formats=None, kv_cache_dtype: str | None = None) -> tvm.IRModule:
    """``weight_formats``: per weight parameter (program order), its ``WeightFormat`` when it is stored
    quantized (``quantized_params.py``), else None; None for an unquantized engine.
    ``kv_cache_dtype``: the cache's element type (None: ``dtype``); attention runs in it."""
    kv_cache_dtype = kv_cache_dtype or dtype
    kv_cache = relax.Var("kv_cache", relax.ObjectType())
    try:
        mod = _Importer(t for _, t in program.named_parameters()).from_exported_program(
            program, True, True, False, {**convert_map(kv_cache, moe_dispatch, kv_cache_dtype), **BOUNDED_EMBEDDING})
    except AssertionError as e:  # TVM's importer asserts it has a converter for every op
        found = re.search(r"Unsupported function types \[(.*)\]", str(e))
        if found is None:
            raise
        ops = ", ".join("aten." + name.strip(" '").removesuffix(".default") for name in found.group(1).split(","))
        raise UnsupportedModelError(
            f"the traced model uses {ops}, which the TVM backend cannot lower (TVM's PyTorch importer has no "
            "converter for it); no engine was built. This usually comes from the model's hidden_act."
        ) from None
    main = mod["main"]
    input_ids, *weights = main.params
    seq = input_ids.ty.shape[1]
    prefill = relax.Function([input_ids, kv_cache, *weights], main.body, main.ret_ty, is_pure=main.is_pure)
    prefill = prefill.with_attrs({k: v for k, v in main.attrs.items() if k != "params"})
    prefill = prefill.with_attr("num_input", 2)
    if weight_formats is not None:
        prefill = quantize_params(prefill, weight_formats)
    out = tvm.IRModule({"prefill": prefill.with_attr("global_symbol", "prefill")})
    # Only main is carried over: the converters emit abstract kernel calls, never functions of their own.
    assert len(mod.functions_items()) == 1, [g.name_hint for g in mod.get_global_vars()]
    decode = copy_with_new_vars(prefill).with_attr("global_symbol", "decode")
    if isinstance(seq, tirx.Var):
        seq = decode.params[0].ty.shape[1]  # the copy has its own symbolic variables
        decode = relax.transform.BindSymbolicVars({seq: 1})(tvm.IRModule({"decode": decode}))["decode"]
    out["decode"] = decode
    geometry = {"layers": config.num_hidden_layers, "q_heads": config.num_attention_heads,
                "kv_heads": config.num_key_value_heads, "head_dim": head_dim(config), "dtype": kv_cache_dtype,
                **attention_geometry(program)}
    return out.with_attr(KV_CACHE_ATTR, geometry)
