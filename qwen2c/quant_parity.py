"""Parity of a quantized engine: what quantization costs, next to what llama.cpp's formats cost.

The float model (transformers, the checkpoint's weights) is the reference. Over ``positions``
consecutive positions of one token sequence (a fixed English passage when the engine has a
tokenizer, else seeded random ids), each next-token distribution is compared with the reference's:

- ``kl``: mean KL(reference || candidate) of the next-token distributions, in nats (and the max);
- ``top1``: the fraction of positions where both pick the same most likely token.

The same figures are computed for transformers running llama.cpp's format at the same bits
(``gguf.quants``, llama.cpp's own reference code: Q8_0 for int8, Q4_0 for int4, 32-input blocks
with a float16 scale) on exactly the weights the engine quantizes, with activations in the
engine's dtype (the engine's figures include its activations' rounding too). The engine passes when its KL is
at most ``QUANT_LIMITS[scheme].kl_factor`` times llama.cpp's (or below a floor) and below an absolute
cap, and its top-1 agreement is at most ``top1_margin`` below llama.cpp's (``tolerances.py``).

A kernel check comes with it: transformers run on the engine's own dequantized weights must give
the engine's logits to the float tolerance of the dtype, so a kernel bug cannot hide inside the
quantization budget.

Activations rounded to int8: llama.cpp's CPU dot products for Q8_0 and Q4_0 weights first round the
activation row to Q8_0 (32 inputs per scale), so its column rounds the inputs of every quantized
linear layer that way. An engine whose kernels do the same (VNNI targets: the manifest's
``quantization.decode_activations``; its ``prompts`` says whether prompts round too, as engines
built since the VNNI prompt kernel do) is checked against transformers rounding the same layers'
inputs: every position here (one token per call runs the engine's decode step), and the sampled
prompt lengths of ``prompt_logits``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

import numpy as np
import torch

from .parity import parity_prompt, running_in_float32
from .quantization import QWEIGHT, SCALES, WeightFormat, from_manifest
from .tolerances import QUANT_LIMITS, compare, tolerance_for

log = logging.getLogger(__name__)

DEFAULT_POSITIONS = 256
ROUNDING_RATIO = 2.0  # rounding_check: at most; two independent roundings differ by about sqrt(2) x one
PROMPT_CHECKS = 6  # prompt lengths checked to float error when decode steps round activations
GGUF_TYPES = {"int8": "Q8_0", "int4": "Q4_0"}
Q8_0_BLOCK = 32  # inputs per scale of llama.cpp's Q8_0 (its weight blocks, and its activations' rounding)

# An ordinary English passage (written for this project), so real checkpoints are measured on text.
PASSAGE = (
    "The river begins as snowmelt high in the mountains, where a few thin streams run together under the "
    "ice and find their way down through the rocks. By the time it reaches the first village it is wide "
    "enough for a small boat, and the people there have fished it for as long as anyone can remember. "
    "In spring the water rises quickly and turns brown with mud; in late summer it slows, and children "
    "can walk across the shallow places without getting their knees wet. Farther down the valley the "
    "river passes a mill that was built two hundred years ago. The wheel no longer turns, but the stone "
    "walls still stand, and each year a few visitors stop to read the sign that tells its history. "
    "Below the mill the land opens into fields of wheat and barley, and the river bends slowly from one "
    "side of the valley to the other. Herons wait in the reeds, and in the evening swallows fly low over "
    "the water to catch insects. At the town of Ashford the river is crossed by an old bridge of five "
    "arches. Market day is Thursday, when farmers bring vegetables, cheese and eggs, and the square in "
    "front of the church fills with stalls. A schoolteacher named Margaret has kept a diary of the "
    "river's height every morning for thirty years. She says the floods come earlier now than they did "
    "when she was young, and that the winters are shorter. Her notebooks are kept in the town library, "
    "where anyone may read them. Beyond Ashford the river grows deeper and darker, and barges carry "
    "timber and grain to the port. There the fresh water meets the sea, the tide pushes back twice a "
    "day, and gulls circle above the fishing boats as they return with the morning catch. Sailors say "
    "that on a clear night you can hear the bells of the old church from the harbour, although it is "
    "more than three miles away, and that the sound carries farther over water than over land."
)


def measurement_tokens(engine, positions: int) -> tuple[list[int], str]:
    """``positions + 1`` token ids, and what they are."""
    n = min(positions + 1, engine.max_context)
    try:
        ids = engine.tokenizer.encode(PASSAGE)
    except Exception:  # noqa: BLE001  (no tokenizer, or one that cannot encode: random ids instead)
        ids = []
    if len(ids) >= n:
        return ids[:n], "English passage"
    return parity_prompt(engine.vocab_size, n, seed=3), "seeded random token ids"


def stored_quantized(engine) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The engine's quantized weights as its weights file holds them: transformers name -> (q, scales)."""
    from safetensors.numpy import load_file

    from .engine_dir import WEIGHTS

    tensors = load_file(str(engine.directory / WEIGHTS))
    keys = {p["name"]: p["key"] for p in engine.manifest["params"]}
    return {name.removesuffix(QWEIGHT): (tensors[key], tensors[keys[name.removesuffix(QWEIGHT) + SCALES]])
            for name, key in keys.items() if name.endswith(QWEIGHT)}


def engine_logits(engine, tokens: list[int]) -> np.ndarray:
    """The engine's next-token logits after each of ``tokens[:-1]``, one token at a time."""
    session = engine.session()
    out = [session.prefill(tokens[:1])]
    for t in tokens[1:-1]:
        out.append(session.decode(t))
    return np.stack(out).astype(np.float32)


def reference_logits(model, tokens: list[int], float32: bool = True) -> torch.Tensor:
    """transformers' next-token logits at every position, computed in float32 whatever the weights'
    dtype (a half-precision model is upcast one module at a time: ``parity.running_in_float32``), or
    with ``float32=False`` in the weights' dtype."""
    device = next(model.parameters()).device
    half = next(model.parameters()).dtype != torch.float32
    with torch.no_grad(), (running_in_float32(model) if half and float32 else contextlib.nullcontext()):
        logits = model(input_ids=torch.tensor([tokens[:-1]], device=device), use_cache=False).logits[0]
    return logits.float().cpu()


def divergence(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Mean and max KL(reference || candidate) per position (nats), and top-1 agreement."""
    p_log = torch.log_softmax(reference.double(), -1)
    q_log = torch.log_softmax(torch.as_tensor(candidate).double(), -1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0)
    top1 = (reference.argmax(-1) == torch.as_tensor(candidate).argmax(-1)).double().mean()
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "top1": float(top1)}


@contextlib.contextmanager
def weights_replaced(model, replace):
    """``model`` with each quantized weight ``p`` (by parameter name) set to ``replace(name, p)``,
    restored afterwards; a tensor shared by two names (tied embeddings) is replaced once."""
    saved, seen = {}, set()
    with torch.no_grad():
        try:
            for name, p in model.named_parameters(remove_duplicate=True):
                new = replace(name, p)
                if new is None or id(p) in seen:
                    continue
                seen.add(id(p))
                saved[name] = p.detach().clone()
                p.copy_(new.to(p.dtype))
            yield model
        finally:
            params = dict(model.named_parameters())
            for name, value in saved.items():
                params[name].copy_(value)


def round_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` rounded as Q8_0 rounds it: per ``group`` inputs, int8 with scale max|x| / 127."""
    shape = x.shape
    g = x.float().reshape(-1, group)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(g * inv) * (amax / 127)).reshape(shape).to(x.dtype)


@contextlib.contextmanager
def activations_rounded(model, layers, group: int = Q8_0_BLOCK):
    """``model`` with the inputs of the linear layers whose weight is named in ``layers`` rounded by
    ``round_activations`` (a tied vocabulary projection by its embedding's name); hooks removed after."""
    weights = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in layers}
    hooks = []
    try:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and id(module.weight) in weights:
                hooks.append(module.register_forward_pre_hook(
                    lambda _m, args: (round_activations(args[0], group), *args[1:])))
        yield model
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def cache_rounded(model, kv_cache_dtype: str | None):
    """``model`` rounding what the engine's KV cache rounds, when it holds coarser numbers than the
    model computes in (``--kv-cache-dtype``; None: nothing rounded): q, k and v as they enter the cache's
    kernels, q and k again after RoPE (the cache's RoPE kernel writes its element type), and the
    attention output as it leaves them. The kernels accumulate in float32, as transformers does here."""
    if kv_cache_dtype is None:
        yield model
        return
    dtype = getattr(torch, kv_cache_dtype)
    attentions = [m for m in model.modules() if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))]
    if not attentions:
        yield model
        return
    hooks, patched = [], {}

    def rounded(x):
        return x.to(dtype).to(x.dtype)

    try:
        for attn in attentions:
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                hooks.append(proj.register_forward_hook(lambda _m, _args, out: rounded(out)))
            hooks.append(attn.o_proj.register_forward_pre_hook(lambda _m, args: (rounded(args[0]), *args[1:])))
            module = sys.modules[type(attn).__module__]
            if module not in patched and hasattr(module, "apply_rotary_pos_emb"):
                patched[module] = module.apply_rotary_pos_emb
                module.apply_rotary_pos_emb = (lambda rope: lambda *a, **k: tuple(rounded(t) for t in rope(*a, **k)))(
                    patched[module])
        yield model
    finally:
        for h in hooks:
            h.remove()
        for module, rope in patched.items():
            module.apply_rotary_pos_emb = rope


def _activation_rounding(engine, stored) -> tuple[set[str], int, bool] | None:
    """The layers whose inputs the engine rounds to int8, the group, and whether prompts round them
    too (else only decode steps do); None: the engine rounds none."""
    rounding = (engine.manifest.get("quantization") or {}).get("decode_activations")
    if not rounding:
        return None
    from qwen2c.schedules.cpu_vnni_gemm import serves

    fmt = from_manifest(engine.manifest["quantization"])
    layers = {name for name, (q, _) in stored.items() if q.ndim == 2 and serves(
        q.shape[-1] * (2 if fmt.bits == 4 else 1), q.shape[0], fmt.bits, fmt.group)}
    if not layers:  # every width off the kernels' chunks
        return None
    return layers, int(rounding["group_size"]), bool(rounding.get("prompts"))


def rounding_check(ours: np.ndarray, rounded: np.ndarray, unrounded: np.ndarray) -> dict[str, Any]:
    """How far the engine's logits (decode steps, or prompts) are from transformers rounding the same activations, as a
    fraction of how far rounding moves the logits at all (the rounded against the unrounded reference).

    Why not float error: rounding is a step function. A value that lands within float error of a
    rounding boundary rounds one way in the engine and the other in transformers, which moves the next
    layer's inputs by a rounding step, which flips more roundings downstream and, through the KV cache,
    at later positions. In a deep model this cascade makes the two as different as two independent
    roundings (measured on qwen2-0.5b: 0.97 of the rounding's own effect), while in a 2-layer model
    most positions match to float error (ratio < 0.1). So this bound is coarse (``ROUNDING_RATIO``):
    it catches a kernel that scales or rounds wrongly (far beyond what rounding moves), not a subtle
    one; the kernel's own tests (``tests/test_vnni.py``) hold it to NumPy to float error.
    """
    err = np.abs(ours.astype(np.float64) - rounded).max(-1)
    effect = np.abs(rounded - unrounded).max(-1)
    ratio = float(err.mean() / max(effect.mean(), 1e-30))
    return {"mean_abs_err_vs_rounded": float(err.mean()), "mean_rounding_effect": float(effect.mean()),
            "ratio": ratio, "limit": ROUNDING_RATIO, "passed": ratio <= ROUNDING_RATIO}


def prompt_logits(engine, tokens: list[int], count: int = PROMPT_CHECKS) -> dict[int, np.ndarray]:
    """The engine's logits after prompts of ``count`` lengths spread over ``tokens`` (each one prefill
    call: the prompt kernels), keyed by the position of their last token."""
    lengths = sorted({int(n) for n in np.linspace(2, len(tokens) - 1, count)} - {0, 1})
    return {n - 1: np.asarray(engine.session().prefill(tokens[:n]), dtype=np.float32) for n in lengths}


def check_quantized_parity(engine, model, fmt: WeightFormat, dtype: str,
                           positions: int = DEFAULT_POSITIONS) -> dict[str, Any]:
    """Measure ``engine`` (quantized as ``fmt``) against ``model`` (transformers, float weights,
    ``dtype``) and llama.cpp's format on the same weights."""
    from gguf import GGMLQuantizationType, quants

    tokens, what = measurement_tokens(engine, positions)
    reference = reference_logits(model, tokens)
    ours = engine_logits(engine, tokens)
    stored = stored_quantized(engine)
    quantized = set(stored)

    def ours_dequantized(name, p):
        return fmt.dequantize(*stored[name]) if name in stored else None

    gguf_type = GGMLQuantizationType[GGUF_TYPES[fmt.scheme]]

    def llama_cpp(name, p):
        if name not in quantized or p.shape[-1] % Q8_0_BLOCK:
            return None
        w = p.detach().float().cpu().numpy()
        return torch.from_numpy(quants.dequantize(quants.quantize(w, gguf_type), gguf_type).reshape(w.shape))

    rounded = _activation_rounding(engine, stored)
    kv_cache = engine.manifest.get("kv_cache_dtype")
    kv_cache = kv_cache if kv_cache not in (None, dtype) else None
    # engine_logits feeds one token per call, which the engine runs through its decode step: with
    # its activations rounded at every position. The cache rounds first (its output feeds o_proj).
    with weights_replaced(model, ours_dequantized), cache_rounded(model, kv_cache):
        own = reference_logits(model, tokens)
        unrounded = own
        if rounded:
            with activations_rounded(model, *rounded[:2]):
                own = reference_logits(model, tokens)
    # llama.cpp keeps a float16 cache by default: its column rounds as ours does when ours does too.
    with weights_replaced(model, llama_cpp), cache_rounded(model, kv_cache), activations_rounded(
            model, {n for n in quantized if stored[n][0].ndim == 2}, Q8_0_BLOCK):
        # In the engine's dtype, as the engine runs, with activations rounded to Q8_0 as llama.cpp's
        # CPU dot products for Q8_0/Q4_0 weights round them.
        theirs = reference_logits(model, tokens, float32=False)

    # The kernels against transformers on the same (dequantized) weights: float error only. Where the
    # kernels round activations, rounding_check's coarser bound holds instead: for the decode steps,
    # and for the prompts when they round too (else the prompt kernels keep float error, checked at
    # sampled prompt lengths).
    tol = tolerance_for(dtype)  # the cache's rounding is modelled (cache_rounded), so float error holds
    decode = prompt = None
    if rounded:
        prompts = prompt_logits(engine, tokens)
        at = list(prompts)
        if rounded[2]:
            err, _, scale = compare(np.stack(list(prompts.values())), own.numpy()[at])
            prompt = {**rounding_check(np.stack(list(prompts.values())), own.numpy()[at], unrounded.numpy()[at]),
                      "positions": at}
        else:
            err, _, scale = compare(np.stack(list(prompts.values())), unrounded.numpy()[at])
        decode = {**rounding_check(ours, own.numpy(), unrounded.numpy()), "prompt_positions": at}
        kernels_ok = decode["passed"] and (prompt["passed"] if prompt else tol.allows(err, scale))
    else:
        err, _, scale = compare(ours, own.numpy())
        kernels_ok = tol.allows(err, scale)
    limits = QUANT_LIMITS[fmt.scheme]
    engine_figures, llama_figures = divergence(reference, ours), divergence(reference, theirs)
    verdict = limits.judge(engine_figures, llama_figures, len(tokens) - 1)
    return {
        "kind": "quantized",
        "dtype": dtype,
        "quantization": fmt.to_json(),
        "reference": "transformers on the float weights",
        "tokens": what,
        "positions": len(tokens) - 1,
        "engine": engine_figures,
        "llama_cpp": {"format": GGUF_TYPES[fmt.scheme], **llama_figures},
        "limits": limits.to_json(),
        "kernels": {"max_abs_err_vs_transformers_on_dequantized_weights": err, "allowed": tol.atol + tol.rtol * scale,
                    "rounded_decode": decode, "rounded_prompts": prompt, "passed": bool(kernels_ok)},
        "failures": verdict + _kernel_failures(err, tol.atol + tol.rtol * scale, decode, prompt),
        "passed": not verdict and bool(kernels_ok),
    }


def _kernel_failures(err: float, allowed: float, decode: dict | None, prompt: dict | None) -> list[str]:
    out = []
    if err > allowed and not prompt:
        out.append(f"kernel error: max abs err {err:.3e} against transformers on the engine's own dequantized weights "
                   f"(allowed {allowed:.3e}){' at prompt positions' if decode else ''}")
    for what, check in (("decode", decode), ("prompt", prompt)):
        if check and not check["passed"]:
            out.append(f"{what} kernel error: {check['ratio']:.2f} x what rounding activations moves the logits, away "
                       f"from transformers rounding them (at most {check['limit']})")
    return out


def format_quantized_report(r: dict[str, Any]) -> str:
    q, e, l = r["quantization"], r["engine"], r["llama_cpp"]
    lines = [
        f"quantized parity ({q['scheme']}, group {q['group_size']}, {r['dtype']} activations) vs transformers on the "
        f"float weights, {r['positions']} positions ({r['tokens']}): {'PASS' if r['passed'] else 'FAIL'}",
        f"  {'':22}{'KL mean (nats)':>16}{'KL max':>12}{'top-1 agree':>14}",
        f"  {'qwen2c ' + q['scheme']:22}{e['kl']:16.3e}{e['kl_max']:12.3e}{e['top1']:14.1%}",
        f"  {'llama.cpp ' + l['format']:22}{l['kl']:16.3e}{l['kl_max']:12.3e}{l['top1']:14.1%}",
        f"  limits: {r['limits']['text']}",
    ]
    decode, prompt = r["kernels"].get("rounded_decode"), r["kernels"].get("rounded_prompts")
    if prompt:
        lines.append(f"  prompts (activations rounded to int8, VNNI) vs transformers rounding them: max abs err "
                     f"{r['kernels']['max_abs_err_vs_transformers_on_dequantized_weights']:.3e}, mean "
                     f"{prompt['mean_abs_err_vs_rounded']:.3e} = {prompt['ratio']:.2f} x what rounding moves the logits "
                     f"(at most {prompt['limit']})")
    else:
        lines.append(f"  kernels vs transformers on the engine's dequantized weights{' (prompts)' if decode else ''}: "
                     f"max abs err {r['kernels']['max_abs_err_vs_transformers_on_dequantized_weights']:.3e} "
                     f"(allowed {r['kernels']['allowed']:.3e})")
    if decode:
        lines.append(f"  decode steps (activations rounded to int8, VNNI) vs transformers rounding them: mean err "
                     f"{decode['mean_abs_err_vs_rounded']:.3e} = {decode['ratio']:.2f} x what rounding moves the logits "
                     f"(at most {decode['limit']}; flipped roundings cascade, see quant_parity.rounding_check)")
    lines.append(f"  kernels: {'ok' if r['kernels']['passed'] else 'FAIL'}")
    lines += [f"  FAIL: {f}" for f in r["failures"]]
    return "\n".join(lines)
