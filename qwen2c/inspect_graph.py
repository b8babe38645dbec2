"""``qwen2c inspect``: export and rewrite a model at full size with no weights (meta tensors).

For models too large to load here (qwen2-72b, qwen2-57b-a14b in float32), this still checks what
the compiler does to them: the trace, every graph pass and its fire count, and the shapes the
rewritten program produces. Numerics need real weights, so the passes' numeric checks are off.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from .checkpoint import meta_model, resolve_model
from .errors import PassCheckError
from .memory import DTYPE_BYTES
from .model_config import active_param_count, context_limit, moe_layers, param_count


def inspect_graph(model: str, max_context: int = 4096, probe_tokens: int = 5) -> dict[str, Any]:
    from qwen2c.graphs.export import export_model
    from qwen2c.graphs.pipeline import run_passes

    from .args import max_context as checked_context

    source = resolve_model(model)
    limit = context_limit(source.config)
    max_context = checked_context(min(max_context, limit) if isinstance(max_context, int) else max_context, limit)
    config, reference = meta_model(source)
    program = export_model(reference, max_context)
    traced = _count_ops(program)
    reports = run_passes(program, config, "float32", check_lengths=())
    fused = _count_ops(program)
    sparse = moe_layers(config)
    # Run the rewritten program on meta tensors: shape propagation through every fused op.
    with torch.no_grad():
        out = program.module()(torch.zeros((1, probe_tokens), dtype=torch.int64, device="meta"))
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    expected = [(1, 1, config.vocab_size)] + [(probe_tokens, config.num_experts_per_tok) for _ in sparse]
    shapes = [tuple(o.shape) for o in outputs]
    if shapes != expected:
        raise PassCheckError(f"{model}: the rewritten program returns shapes {shapes}, expected {expected}.")
    params = param_count(config)
    return {
        "model": source.name,
        "parameters": params,
        "active_parameters": active_param_count(config),
        "float32_weights_gib": params * DTYPE_BYTES["float32"] / (1 << 30),
        "moe_layers": sparse,
        "traced_nodes": sum(traced.values()),
        "rewritten_nodes": sum(fused.values()),
        "fused_ops": {k: v for k, v in fused.items() if k.startswith("qwen2c.")},
        "passes": [r.to_json() for r in reports],
        "probe_tokens": probe_tokens,
        "output_shapes": shapes,
    }


def _count_ops(program) -> Counter:
    from qwen2c.graphs.pass_base import op_name

    return Counter(op_name(n) for n in program.graph.nodes if n.op == "call_function")


def format_inspect(r: dict[str, Any]) -> str:
    lines = [
        f"{r['model']}: {r['parameters'] / 1e9:.2f}B parameters"
        + (f" ({r['active_parameters'] / 1e9:.2f}B active per token)" if r["moe_layers"] else "") + ", "
        f"{r['float32_weights_gib']:.1f} GiB in float32; traced on meta tensors (no weights allocated)",
        f"  graph: {r['traced_nodes']} ops traced -> {r['rewritten_nodes']} after passes; fused: "
        + ", ".join(f"{k} x{v}" for k, v in sorted(r["fused_ops"].items())),
    ]
    if r["moe_layers"]:
        lines.append(f"  sparse MoE layers: {len(r['moe_layers'])} ({r['moe_layers'][0]}..{r['moe_layers'][-1]})")
    for p in r["passes"]:
        lines.append(f"  pass {p['name']}: fired {p['fired']}x" + (f"; missed: {p['misses']}" if p["misses"] else ""))
    logits, *routing = r["output_shapes"]
    lines.append(f"  outputs for a {r['probe_tokens']}-token prompt: logits {logits}"
                 + (f", routing {len(routing)} x {routing[0]}" if routing else ""))
    return "\n".join(lines)
