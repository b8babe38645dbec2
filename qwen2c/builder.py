"""``qwen2c build``: checkpoint or preset -> export -> passes -> backend -> engine dir -> parity.

Read top to bottom; each step logs its progress. Nothing is written at the destination until the
engine is complete and has passed parity.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__, args, engine_dir
from .checkpoint import check_reference_fits, checkpoint_dtype, load_reference, resolve_model
from .errors import ConfigError, ParityError
from .fingerprint import WEIGHT_FORMAT
from .interrupts import deferred as interrupt_deferred
from .interrupts import interrupt_guard
from .memory import DTYPE_BYTES
from .model_config import context_limit, moe_layers
from .parity import DEFAULT_DECODE_STEPS, check_parity, format_report
from .quant_parity import check_quantized_parity, format_quantized_report
from .quantization import QWEIGHT, SCALES, quantization_manifest, weight_format, weight_formats
from .signing import load_private_key, sign_engine
from .autotune.apply import context_for as tuning_context_for
from .autotune.apply import manifest_section as tuning_manifest
from .autotune.context import using as tuning_context
from .tokenizer import copy_tokenizer, write_qwen2_tokenizer

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


def build(
    model: str,
    target: str,
    out: str | Path,
    dtype: str | None = None,
    max_context: int | None = None,
    force: bool = False,
    parity_steps: int | None = None,
    moe_dispatch: str = "sparse",
    arch: str | None = None,
    progress: Callable[[str], None] = log.info,
    sign_key: str | Path | None = None,
    quantize: str | None = None,
    group_size: int | str | None = None,
    backend: str | None = None,
    tuning_db: str | Path | list[str | Path] | None = None,
    no_tuning: bool = False,
    kv_cache_dtype: str | None = None,
) -> dict[str, Any]:
    """Build an engine directory at ``out``; return its manifest.

    ``dtype``: weights and activations; None takes the target's default (CPU: float32; GPU: the
    checkpoint's, bfloat16 for presets). ``arch`` (GPU targets): comma-separated architectures.
    ``moe_dispatch`` (MoE models): "sparse" computes each token's routed experts only; "dense" runs
    every expert on every token, weighted 0 where unrouted (a baseline for benchmarks).
    ``parity_steps``: decode steps checked against transformers (None: 8, or fewer to fit a short
    context). ``sign_key``: an Ed25519 private key (PEM) that signs the manifest (``signing.py``).
    ``quantize`` ("int8", "int4"; None or "none": not quantized) and ``group_size`` (32, 64): weight-only
    quantization (``quantization.py``); parity then measures what it costs (``quant_parity.py``).
    ``backend``: which backend builds it (``--backend``; default: the target's, ``TargetSpec.backend``;
    ``targets/backends.py``).
    ``tuning_db``: tuning databases (``qwen2c tune --db``) whose records for this target set kernel
    parameters; None: the records qwen2c ships, where they match; ``no_tuning``: every default
    (``autotune/apply.py``). The manifest's ``tuning`` says which kernels were tuned.
    ``kv_cache_dtype``: the KV cache's element type (None or "auto": ``args.kv_cache_dtype``).

    Every argument is checked, and the destination proven writable with room for the engine,
    before any slow step. Interrupted (Ctrl-C) at any point, the build raises KeyboardInterrupt,
    publishes nothing and leaves nothing behind (``interrupts.py``); the staging folders of a build
    that was killed are removed by the next build to the same destination.
    """
    start = time.monotonic()
    with interrupt_guard() as guard:
        return _build(model, target, Path(out), dtype, max_context, force, parity_steps, moe_dispatch, arch, progress,
                      sign_key, guard, start, quantize, group_size, backend, tuning_db, no_tuning, kv_cache_dtype)


def _build(model, target, out: Path, dtype, max_context, force, parity_steps, moe_dispatch, arch, progress,
           sign_key, guard, start, quantize=None, group_size=None, backend=None, tuning_db=None,
           no_tuning=False, kv_cache_dtype=None) -> dict[str, Any]:
    with interrupt_deferred():  # interrupts.py: a Ctrl-C inside C++ initialisation can abort the process
        import transformers  # noqa: F401
        from torch.export import export  # noqa: F401
    # (The backend's own modules, TVM's compiler among them, are imported likewise by its prepare.)
    from qwen2c.targets.backends import BACKENDS
    from qwen2c.targets.registry import TARGETS

    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: qwen2c builds {', '.join(SUPPORTED_DTYPES)} engines.")
    fmt = weight_format(quantize, group_size)
    spec = TARGETS.resolve(target, arch, backend)
    lowering = BACKENDS.get(spec.backend).load()
    engine_dir.check_destination(out, force)
    source = resolve_model(model)
    if dtype is None:
        dtype = checkpoint_dtype(source) if spec.default_dtype == "checkpoint" else spec.default_dtype
    kv_dtype = args.kv_cache_dtype(kv_cache_dtype, dtype, fmt is not None, spec.backend)
    max_context = args.max_context(max_context, context_limit(source.config))
    parity_steps = args.parity_steps(parity_steps, max_context, DEFAULT_DECODE_STEPS)
    signer = load_private_key(sign_key) if sign_key is not None else None
    # The backend refuses what it cannot build here (toolchains, dtypes, options), before anything loads.
    lowering.prepare(spec, dtype, {"moe_dispatch": moe_dispatch, "quantize": fmt, "kv_cache_dtype": kv_dtype})
    tuning = _tuning(spec, tuning_db, no_tuning, progress)

    parity_here = lowering.runs_here(spec)
    check_reference_fits(source, dtype, _host_copies(spec, parity_here))  # memory first, then the disk
    guard.checkpoint()
    with engine_dir.Staging(out) as staging:
        engine_dir.check_free_space(staging.path, out, source.param_count() * DTYPE_BYTES[dtype])
        with _temporary_files_in(staging.path):
            manifest = _build_into(staging.path, out, source, spec, lowering, dtype, max_context, parity_steps,
                                   parity_here, moe_dispatch, _Clock(progress, guard, start), fmt, tuning, kv_dtype)
        guard.checkpoint()
        try:
            manifest = engine_dir.write_manifest(staging.path, manifest)
            if signer is not None:
                sign_engine(staging.path, engine_dir.read_manifest(staging.path, verify=False, staging_ok=True), signer)
        except OSError as e:
            raise engine_dir.output_error(out, e) or e from None
        with guard.deferred():  # published whole, or (interrupted meanwhile) not at all
            guard.checkpoint()
            engine_dir.publish(staging.path, out, force, abort=lambda: guard.requested)
            staging.path = None
            progress(f"[{time.monotonic() - start:6.1f}s] engine written to {out}")
    return manifest


def _build_into(staging: Path, out: Path, source, spec, lowering, dtype: str, max_context: int, parity_steps: int,
                parity_here: bool, moe_dispatch: str, clock: "_Clock", fmt=None, tuning=None,
                kv_cache_dtype: str | None = None) -> dict[str, Any]:
    """Every slow step, into ``staging``; returns the manifest (not yet written: until it is, the
    staging folder is not an engine). ``lowering``: the backend's module (``targets/backends.py``)."""
    import transformers

    from qwen2c.graphs.export import export_model, param_names
    from qwen2c.graphs.pipeline import run_passes

    progress = clock.progress
    clock.step(f"loading {source.name} ({source.param_count() / 1e6:.1f}M parameters, {dtype})")
    config, reference = load_reference(source, dtype, copies=_host_copies(spec, parity_here))
    clock.step(f"exporting with torch.export (dynamic sequence length up to {max_context})")
    program = export_model(reference, max_context)
    clock.step("running graph passes (each checked against its input in PyTorch)")
    reports = run_passes(program, config, dtype)
    for r in reports:
        progress(f"    {r.name}: fired {r.fired}x" + (f", missed {len(r.misses)}: {r.misses[0]}" if r.misses else ""))
    formats = weight_formats(program, fmt) if fmt else None
    if fmt:
        n = sum(f is not None for f in formats)
        progress(f"    weights: {fmt.scheme}, groups of {fmt.group}, {n} of {len(formats)} tensors quantized")
    clock.step(f"lowering with the {spec.backend} backend and compiling for {spec.name}")
    cfg = dict(source.config)
    moe = _moe_manifest(config, moe_dispatch)
    params = _param_table(program, param_names(program), formats)
    # What the backend may record of the build (the TVM backend fingerprints its library with it).
    kv_cache_dtype = kv_cache_dtype or dtype
    options = {"moe_dispatch": moe_dispatch, "quantize": fmt, "formats": formats, "model_config": cfg,
               "kv_cache_dtype": kv_cache_dtype,
               "params": params, "moe": moe, "weight_format": _weight_format(fmt)}
    with tuning_context(tuning):  # kernels take their parameters from it (autotune/params.py)
        lowered = lowering.lower(program, config, spec, dtype, max_context, options, progress)
    if tuning is not None:
        section = tuning_manifest(tuning)
        progress(f"    kernel parameters: {section['kernels_tuned']} tuned, {section['kernels_default']} default")

    clock.step("writing the engine")
    try:
        fields = lowering.write(lowered, staging, progress)  # the backend's files and manifest fields
        # Laid out as the backend uses the weights (TVM: its concatenations end to end), if it says.
        _save_weights(program, params, staging / engine_dir.WEIGHTS, fields.get("weight_layout"), formats)
        (staging / engine_dir.CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        tokenizer = (write_qwen2_tokenizer(staging) if source.is_preset else copy_tokenizer(source.tokenizer_files, staging))
    except Exception as e:  # a full or vanished disk shows up as OSError, or as the linker's or safetensors' error
        raise engine_dir.output_error(out, e) or e from None
    manifest: dict[str, Any] = {
        "model": {"source": source.name, "preset": source.is_preset, "config": cfg,
                  "parameters": source.param_count()},
        "target": spec.to_json(),
        **{k: v for k, v in fields.items() if k != "versions"},
        "backend": spec.backend,
        "dtype": dtype,
        "kv_cache_dtype": kv_cache_dtype,
        "weight_format": _weight_format(fmt),
        "max_context": max_context,
        "moe": moe,
        "versions": {"qwen2c": __version__, **fields.get("versions", {}), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "passes": [r.to_json() for r in reports],
        "params": [{"name": p["name"], "key": p["key"]} for p in params],
        "tokenizer": tokenizer,
        "quantization": quantization_manifest(fmt, program, formats, source, vnni=_rounds_activations(spec)) if fmt else None,
        "tuning": section if tuning is not None else None,
        "parity": None,
    }
    if parity_here:
        from .runtime import Engine
        from .verify import TORCH_DEVICES

        reference = reference.to(TORCH_DEVICES.get(spec.device, "cpu"))  # on the engine's device
        engine = Engine(staging, manifest=manifest)
        if fmt:
            clock.step(f"measuring what {fmt.scheme} costs against the float model and llama.cpp's format")
            report = check_quantized_parity(engine, reference, fmt, dtype)
            progress(format_quantized_report(report))
            if not report["passed"]:
                raise ParityError(
                    f"the {fmt.scheme} engine costs more than the stated limits allow "
                    f"({'; '.join(report['failures'])}); no engine was written.\n" + format_quantized_report(report))
        else:
            clock.step(f"checking parity against transformers ({parity_steps} decode steps)")
            report = check_parity(engine, reference, dtype, decode_steps=parity_steps)
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
    manifest["build_seconds"] = round(time.monotonic() - clock.start, 1)  # reported by `qwen2c bench`
    return manifest


def _tuning(spec, tuning_db, no_tuning: bool, progress):
    """The tuning context of a TVM build (None for backends that take no kernel parameters); its
    databases are checked here, before any slow step."""
    if spec.backend != "tvm":
        if tuning_db is not None:
            raise ConfigError(f"--tuning-db: the {spec.backend} backend has no tunable kernels of qwen2c's; "
                              "tuning records apply to TVM builds.")
        return None
    if no_tuning and tuning_db is not None:
        raise ConfigError("--no-tuning and --tuning-db ask for opposite things; give one.")
    return tuning_context_for(spec, tuning_db, progress, disabled=no_tuning)


def _host_copies(spec, parity_here: bool) -> float:
    """Copies of the weights in host memory at once: the reference, and a CPU engine when parity runs
    here (a GPU engine's weights live on the GPU; the float32 reference of a half-precision engine
    is the same model upcast one module at a time)."""
    return 2.2 if parity_here and spec.device == "cpu" else 1.2


@contextlib.contextmanager
def _temporary_files_in(staging: Path):
    """Temporary files of the build (TVM's objects before linking, nvcc's, the linker's) inside the
    staging folder, so a killed build's are removed with it by the next build."""
    tmp = staging / ".tmp"
    tmp.mkdir()
    previous_dir, previous_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(tmp), str(tmp)
    try:
        yield
    finally:
        tempfile.tempdir = previous_dir
        if previous_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_env
        shutil.rmtree(tmp, ignore_errors=True)


def _moe_manifest(config, dispatch: str) -> dict[str, Any] | None:
    layers = moe_layers(config)
    if not layers:
        return None
    return {"dispatch": dispatch, "layers": layers, "num_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok, "norm_topk_prob": bool(config.norm_topk_prob)}


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _rounds_activations(spec) -> bool:
    """Whether the engine's quantized decode steps round activations to int8 (VNNI CPU targets)."""
    from .targets.tvm.pipelines.cpu import uses_vnni

    return spec.backend == "tvm" and uses_vnni(spec)


def _weight_format(fmt) -> str:
    """The fingerprint's and manifest's name of how weights are stored: dense, or the quantization."""
    return WEIGHT_FORMAT if fmt is None else f"{fmt.scheme}-g{fmt.group}"


def _param_table(program, names: list[tuple[str, str]], formats=None) -> list[dict[str, Any]]:
    """The program's parameters in call order: name, weights-file key (tied weights share one),
    safetensors dtype and shape. A quantized weight (``formats[i]``) is two: ``<name>.qweight`` and
    ``<name>.scales``, in that order (``targets/tvm/quantized_params.py``)."""
    key_of: dict[int, str] = {}
    table = []
    for i, (_placeholder, name) in enumerate(names):
        tensor = program.state_dict[f"model.{name}"]
        key = key_of.setdefault(tensor.data_ptr(), name)
        fmt = formats[i] if formats else None
        if fmt is None:
            table.append({"name": name, "key": key, "dtype": _SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype)),
                          "shape": list(tensor.shape)})
            continue
        q_shape, s_shape = fmt.stored_shapes(tuple(tensor.shape))
        table += [{"name": name + QWEIGHT, "key": key + QWEIGHT, "dtype": _NUMPY_DTYPES[fmt.qdtype],
                   "shape": list(q_shape), "source": name, "format": fmt},
                  {"name": name + SCALES, "key": key + SCALES, "dtype": "F16", "shape": list(s_shape)}]
    return table


_NUMPY_DTYPES = {"int8": "I8", "uint8": "U8"}


def _save_weights(program, params: list[dict[str, Any]], path: Path, layout: list[list[int]] | None = None,
                  formats=None) -> None:
    """Write the program's parameters once each (tied weights share a key), quantized where the
    table says (``_param_table``).

    The file is laid out to be mapped and used in place (``weights_file.write_aligned``): the
    weights ``transform_params`` concatenates (``layout``, indices into the call order) end to end.
    """
    from .weights_file import write_aligned

    tensors: dict[str, np.ndarray] = {}
    for p in params:
        if p["key"] != p["name"] or p["key"] in tensors:
            continue
        if "format" in p:
            q, scales = p["format"].quantize(program.state_dict[f"model.{p['source']}"])
            tensors[p["key"]], tensors[p["key"].removesuffix(QWEIGHT) + SCALES] = q, scales
        elif not p["key"].endswith(SCALES):
            tensors[p["key"]] = _as_numpy(program.state_dict[f"model.{p['key']}"].detach().contiguous())
    groups = [[params[i]["key"] for i in out] for out in layout or [] if len(out) > 1]
    write_aligned(tensors, path, groups, metadata={"format": "pt"})


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16; ml_dtypes' has the same bits
        import ml_dtypes

        return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class _Clock:
    """Progress lines with the time since the build started; each step is an interrupt checkpoint."""

    def __init__(self, progress, guard, start: float):
        self.progress, self.guard, self.start, self.n = progress, guard, start, 0

    def step(self, what: str) -> None:
        self.guard.checkpoint()
        self.n += 1
        self.progress(f"[{time.monotonic() - self.start:6.1f}s] {what}")
