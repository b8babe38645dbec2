"""``qwen2c build``: checkpoint or preset -> export -> passes -> backend -> engine dir -> parity.

Read top to bottom; each step logs its progress. Nothing is written at the destination until the
engine is complete and has passed parity.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__, engine_dir
from .checkpoint import checkpoint_dtype, load_reference, resolve_model
from .errors import ConfigError, ParityError
from .model_config import moe_layers
from .parity import DEFAULT_DECODE_STEPS, check_parity, format_report
from .tokenizer import copy_tokenizer, write_qwen2_tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 4096
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


def build(
    model: str,
    target: str,
    out: str | Path,
    dtype: str | None = None,
    max_context: int | None = None,
    force: bool = False,
    parity_steps: int = DEFAULT_DECODE_STEPS,
    moe_dispatch: str = "sparse",
    arch: str | None = None,
    progress: Callable[[str], None] = log.info,
    backend: str | None = None,
) -> dict[str, Any]:
    """Build an engine directory at ``out``; return its manifest.

    ``dtype``: weights and activations; None takes the target's default (CPU: float32; GPU: the
    checkpoint's, bfloat16 for presets). ``arch`` (GPU targets): comma-separated architectures.
    ``moe_dispatch`` (MoE models): "sparse" computes each token's routed experts only; "dense" runs
    every expert on every token, weighted 0 where unrouted (a baseline for benchmarks).
    ``backend``: which backend builds it (``--backend``; default: the target's, ``TargetSpec.backend``).
    """
    import transformers

    from qwen2c.graphs.export import export_model, param_names
    from qwen2c.graphs.pipeline import run_passes
    from qwen2c.targets.backends import BACKENDS
    from qwen2c.targets.registry import TARGETS

    out = Path(out)
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: qwen2c builds {', '.join(SUPPORTED_DTYPES)} engines.")
    spec = TARGETS.resolve(target, arch, backend)
    lowering = BACKENDS.get(spec.backend).load()
    engine_dir.check_destination(out, force)
    source = resolve_model(model)
    if dtype is None:
        dtype = checkpoint_dtype(source) if spec.default_dtype == "checkpoint" else spec.default_dtype
    options = {"moe_dispatch": moe_dispatch}
    lowering.prepare(spec, dtype, options)  # refuses what this backend cannot build here, before loading
    limit = source.config.get("max_position_embeddings", DEFAULT_MAX_CONTEXT)
    max_context = max_context or min(DEFAULT_MAX_CONTEXT, limit)
    if not 2 <= max_context <= limit:
        raise ConfigError(f"--max-context {max_context} must be between 2 and the model's max_position_embeddings ({limit}).")

    clock = _Clock(progress)
    clock.step(f"loading {source.name} ({source.param_count() / 1e6:.1f}M parameters, {dtype})")
    # Copies of the weights in host memory at once: the reference, and a CPU engine when parity runs
    # here (a GPU engine's weights live on the GPU; the float32 reference of a half-precision engine
    # is the same model upcast one module at a time).
    parity_here = lowering.runs_here(spec)
    copies = 2.2 if parity_here and spec.device == "cpu" else 1.2
    config, reference = load_reference(source, dtype, copies=copies)
    clock.step(f"exporting with torch.export (dynamic sequence length up to {max_context})")
    program = export_model(reference, max_context)
    clock.step("running graph passes (each checked against its input in PyTorch)")
    reports = run_passes(program, config, dtype)
    for r in reports:
        progress(f"    {r.name}: fired {r.fired}x" + (f", missed {len(r.misses)}: {r.misses[0]}" if r.misses else ""))
    clock.step(f"lowering with the {spec.backend} backend and compiling for {spec.name}")
    lowered = lowering.lower(program, config, spec, dtype, max_context, options, progress)

    staging = engine_dir.make_staging(out)
    try:
        clock.step("writing the engine")
        backend_fields = lowering.write(lowered, staging, progress)
        params = _save_weights(program, param_names(program), staging / engine_dir.WEIGHTS)
        cfg = dict(source.config)
        (staging / engine_dir.CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        tokenizer = (write_qwen2_tokenizer(staging) if source.is_preset else copy_tokenizer(source.tokenizer_files, staging))
        manifest: dict[str, Any] = {
            "model": {"source": source.name, "preset": source.is_preset, "config": cfg,
                      "parameters": source.param_count()},
            "target": spec.to_json(),
            **{k: v for k, v in backend_fields.items() if k != "versions"},
            "backend": spec.backend,
            "dtype": dtype,
            "max_context": max_context,
            "moe": _moe_manifest(config, moe_dispatch),
            "versions": {"qwen2c": __version__, **backend_fields.get("versions", {}), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "passes": [r.to_json() for r in reports],
            "params": params,
            "tokenizer": tokenizer,
            "parity": None,
        }
        engine_dir.write_manifest(staging, manifest)
        if parity_here:
            from .runtime import Engine
            from .verify import TORCH_DEVICES

            clock.step(f"checking parity against transformers ({parity_steps} decode steps)")
            reference = reference.to(TORCH_DEVICES.get(spec.device, "cpu"))  # on the engine's device
            report = check_parity(Engine(staging), reference, dtype, decode_steps=parity_steps)
            progress(format_report(report))
            if not report["passed"]:
                raise ParityError(
                    f"the engine's logits disagree with transformers beyond the {dtype} tolerance "
                    f"(worst: max abs err {report['max_abs_err']:.3g}); no engine was written.\n" + format_report(report)
                )
            manifest["parity"] = report
        else:
            manifest["parity"] = f"not run (no {spec.device} device)" if spec.device != "cpu" else \
                f"not run ({spec.name} code does not run on this machine)"
            progress(f"    parity not run: {spec.name} engines do not run on this machine; `qwen2c verify` where they do "
                     "records it in the manifest")
        engine_dir.write_manifest(staging, manifest)
        engine_dir.publish(staging, out, force)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    clock.step(f"engine written to {out}")
    return manifest


def _moe_manifest(config, dispatch: str) -> dict[str, Any] | None:
    layers = moe_layers(config)
    if not layers:
        return None
    return {"dispatch": dispatch, "layers": layers, "num_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok, "norm_topk_prob": bool(config.norm_topk_prob)}


def _save_weights(program, names: list[tuple[str, str]], path: Path) -> list[dict[str, str]]:
    """Write the program's parameters once each (tied weights share a key); return the call order."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    key_of: dict[int, str] = {}
    order = []
    for placeholder, name in names:
        tensor = program.state_dict[f"model.{name}"]
        key = key_of.setdefault(tensor.data_ptr(), name)
        if key == name:
            tensors[name] = tensor.detach().contiguous()
        order.append({"name": name, "key": key})
    save_file(tensors, str(path), metadata={"format": "pt"})
    return order


class _Clock:
    def __init__(self, progress):
        self.progress, self.start, self.n = progress, time.monotonic(), 0

    def step(self, what: str) -> None:
        self.n += 1
        self.progress(f"[{time.monotonic() - self.start:6.1f}s] {what}")
