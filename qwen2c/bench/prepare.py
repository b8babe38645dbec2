"""Which systems a benchmark run times, and the files each needs (engines, an ONNX export, GGUFs).

qwen2c's engines come first: engine directories given by the user, or built here from a preset or
checkpoint (timed: that is the build time the report shows). With ``--compare`` each peer is added
on the same weights: the engine directory is a transformers checkpoint (config.json and
model.safetensors with transformers' names), so transformers and torch.compile load it directly,
the ONNX export starts from it, and llama.cpp's converter reads it. A peer whose package is missing
is skipped with the command that installs it; one whose preparation fails is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Callable

from .. import engine_dir
from ..errors import ConfigError, Qwen2cError
from .harness import Plan, System

log = logging.getLogger(__name__)

PEERS = ("eager", "compile", "onnxruntime", "llama.cpp")
FAMILY = {"eager": "transformers eager", "compile": "torch.compile", "onnxruntime": "onnxruntime",
          "llama.cpp": "llama.cpp"}
DEFAULT_LLAMA_TYPES = ("f32", "f16", "q8_0", "q4_0")
INSTALL = "pip install 'qwen2c[bench]'"
_NEEDS = {"onnxruntime": ("onnxruntime", "onnx", "onnxscript"), "llama.cpp": ("llama_cpp", "gguf")}
_PACKAGE_NAMES = {"llama_cpp": "llama-cpp-python"}
BITS = {"float32": 32, "float16": 16, "bfloat16": 16}
MIB = 1 << 20


def missing_packages(peer: str) -> list[str]:
    return [_PACKAGE_NAMES.get(m, m) for m in _NEEDS.get(peer, ()) if importlib.util.find_spec(m) is None]


def engine_precision(manifest: dict[str, Any]) -> tuple[str, int]:
    """(label, weight bits) of an engine: its quantization when quantized, else its dtype."""
    quant = manifest.get("quantization")
    if isinstance(quant, dict) and quant.get("scheme") in ("int8", "int4"):
        return f"{quant['scheme']} (groups of {quant.get('group_size')})", 8 if quant["scheme"] == "int8" else 4
    return manifest["dtype"], BITS[manifest["dtype"]]


def _weights_bytes(engine: Path) -> int:
    return (engine / engine_dir.WEIGHTS).stat().st_size


def plan_systems(engines: list[Path], plan: Plan, peers: list[str], cache: Path, llama_types: list[str],
                 build_seconds: dict[Path, float], progress: Callable[[str], None] = log.info
                 ) -> tuple[list[System], list[str], dict[str, Any]]:
    """The systems to time, the peers skipped (each with its reason), and the model's config."""
    manifests = {e: engine_dir.read_manifest(e, verify=False) for e in engines}
    configs = {e: m["model"]["config"] for e, m in manifests.items()}
    config = configs[engines[0]]
    for e, c in configs.items():
        if {k: v for k, v in c.items() if k not in ("dtype", "torch_dtype")} != \
                {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}:
            raise ConfigError(f"{e}: a different model from {engines[0]}; one benchmark run compares one model.")
    longest = max(max(plan.prefill), max(plan.decode_contexts) + plan.decode_steps)
    systems: list[System] = []
    names: set[str] = set()
    for e, m in manifests.items():
        label, bits = engine_precision(m)
        # A non-TVM engine (e.g. --backend onnxruntime) of the same model is named by its backend too.
        base = "qwen2c" if m.get("backend", "tvm") == "tvm" else f"qwen2c-{m['backend']}"
        tuning = m.get("tuning") or {}
        if tuning.get("kernels_tuned"):  # built with tuning records: named so beside the default build
            label = f"{label} tuned"
        name = f"{base} {label}" if f"{base} {label}" not in names else f"{base} {label} ({e.name})"
        names.add(name)
        systems.append(System(name, "qwen2c", label, bits, {"kind": "qwen2c", "path": str(e)},
                              int(_weights_bytes(e) * 1.2) + 400 * MIB, build_seconds.get(e),
                              "engine build" if e in build_seconds else ""))
    skipped: list[str] = []
    float_engines = [e for e, m in manifests.items() if engine_precision(m)[1] in (16, 32)]
    best = sorted(float_engines, key=lambda e: -BITS[manifests[e]["dtype"]])[:1]
    for peer in peers:
        missing = missing_packages(peer)
        if missing:
            skipped.append(f"{peer}: skipped, {' and '.join(missing)} not installed ({INSTALL})")
            continue
        if not float_engines:
            skipped.append(f"{peer}: skipped, no float32/float16/bfloat16 engine to take the weights from")
            continue
        try:
            if peer in ("eager", "compile"):
                for e in float_engines:
                    dtype = manifests[e]["dtype"]
                    context = manifests[e]["max_context"]
                    spec = {"kind": peer, "path": str(e), "dtype": dtype, "max_context": context,
                            "cache_len": min(longest, context)}
                    systems.append(System(f"{FAMILY[peer]} {dtype}", FAMILY[peer], dtype, BITS[dtype], spec,
                                          int(_weights_bytes(e) * (1.3 if peer == "eager" else 2.0)) + 600 * MIB))
            elif peer == "onnxruntime":
                systems.append(_onnx_system(best[0], manifests[best[0]], cache, progress))
            elif peer == "llama.cpp":
                systems.extend(_llama_systems(best[0], manifests[best[0]], cache, llama_types, plan.threads, progress))
        except Qwen2cError as err:
            skipped.append(f"{peer}: skipped, {err}")
    return systems, skipped, config


def _weights_key(manifest: dict[str, Any]) -> str:
    return manifest["files"][engine_dir.WEIGHTS]["sha256"][:16]


def _onnx_system(engine: Path, manifest: dict[str, Any], cache: Path, progress) -> System:
    from .onnx_peer import ONNX_FILE, export_in_child

    folder = cache / "onnx" / _weights_key(manifest)
    seconds = None
    if not (folder / ONNX_FILE).is_file():
        progress(f"exporting {engine} to ONNX (torch.onnx.export, dynamo, with the KV cache)")
        seconds = export_in_child(str(engine), folder, manifest["max_context"])
    size = sum(p.stat().st_size for p in folder.iterdir())
    spec = {"kind": "onnxruntime", "path": str(folder / ONNX_FILE), "max_context": manifest["max_context"]}
    return System("onnxruntime float32", "onnxruntime", "float32", 32, spec, int(size * 1.5) + 600 * MIB, seconds,
                  "ONNX export")


def _llama_systems(engine: Path, manifest: dict[str, Any], cache: Path, types: list[str], threads: int,
                   progress) -> list[System]:
    from .gguf_peer import BITS as GGUF_BITS
    from .gguf_peer import gguf_for

    out = []
    for t in types:
        if t not in GGUF_BITS:
            raise ConfigError(f"--llama-types {t!r}: choose from {', '.join(GGUF_BITS)}.")
        progress(f"GGUF {t} of {engine} (llama.cpp's converter/quantizer; cached)")
        path, seconds = gguf_for(engine, _weights_key(manifest), t, cache, threads)
        spec = {"kind": "llama.cpp", "path": str(path), "dtype": t, "max_context": manifest["max_context"]}
        out.append(System(f"llama.cpp {t}", "llama.cpp", t, GGUF_BITS[t], spec,
                          int(path.stat().st_size * 1.1) + 400 * MIB, seconds, "GGUF conversion"))
    return out
