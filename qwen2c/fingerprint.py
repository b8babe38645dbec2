"""What an engine's compiled library was built for: embedded in the library, checked at load.

The manifest and the weights file are data anyone can edit (and re-checksum); the library is code
compiled for one model. A build puts a fingerprint of what it compiled for into the library itself
(``targets/tvm/fingerprint.py``): the model config, dtype and weight format, every parameter's name,
weights-file key, dtype and shape in the order the library takes them, the maximum context, the
target and the MoE layout. ``qwen2c.load`` reads it back before running anything and compares it
with the manifest and with the weights file's header; the first field that disagrees is named.
So an edited ``vocab_size``, or a ``model.so`` copied from another build (even of the same shapes:
its context, target or parameter order differs, or its weights were not the ones it was built for)
is refused instead of reading memory it was not compiled for.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import EngineError

FINGERPRINT_VERSION = 1
WEIGHT_FORMAT = "dense"  # weights stored as they are computed with (the only format today)


def engine_fingerprint(config: dict[str, Any], dtype: str, params: list[dict[str, Any]], max_context: int,
                       target: dict[str, Any], moe: dict[str, Any] | None,
                       weight_format: str = WEIGHT_FORMAT) -> dict[str, Any]:
    """``params``: in call order, each {"name", "key", "dtype" (safetensors' spelling), "shape"}."""
    return _normalized({
        "fingerprint_version": FINGERPRINT_VERSION,
        "model_config": config,
        "dtype": dtype,
        "weight_format": weight_format,
        "params": [{"name": p["name"], "key": p["key"], "dtype": p["dtype"], "shape": list(p["shape"])} for p in params],
        "max_context": max_context,
        "target": target,
        "moe": moe,
    })


def for_build(spec, dtype: str, max_context: int, options: dict[str, Any]) -> bytes:
    """The encoded fingerprint of a build, from the options the builder gives every backend
    (``builder._build_into``: ``model_config``, ``params``, ``moe``, ``weight_format``)."""
    return encode(engine_fingerprint(options["model_config"], dtype, options["params"], max_context, spec.to_json(),
                                     options.get("moe"), options["weight_format"]))


def encode(fingerprint: dict[str, Any]) -> bytes:
    return json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode()


def decode(data: bytes, where: str, what: str = "library") -> dict[str, Any]:
    try:
        value = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        value = None
    if not isinstance(value, dict) or value.get("fingerprint_version") != FINGERPRINT_VERSION:
        raise EngineError(f"{where}: the {what}'s fingerprint is unreadable; it was not built by this qwen2c. Rebuild.")
    return value


def check_against_manifest(embedded: dict[str, Any], manifest: dict[str, Any], weights: dict[str, dict[str, Any]],
                           where: str, what: str = "compiled library") -> None:
    """Refuse a library whose fingerprint disagrees with the manifest or with the weights file.

    ``weights``: the weights file's header (key -> {"dtype", "shape"}). ``what`` carries the
    fingerprint (TVM: the compiled library; ONNX Runtime: the ONNX model), for the messages.
    """
    params = manifest.get("params")
    if not isinstance(params, list) or not all(isinstance(p, dict) for p in params):
        raise EngineError(f"{where}: the manifest's 'params' is not a list of parameters; the engine is corrupt.")
    claimed = {
        "model_config": (manifest.get("model") or {}).get("config") if isinstance(manifest.get("model"), dict) else None,
        "dtype": manifest.get("dtype"),
        "weight_format": manifest.get("weight_format", WEIGHT_FORMAT),
        "max_context": manifest.get("max_context"),
        "target": manifest.get("target"),
        "moe": manifest.get("moe"),
    }
    for field, value in claimed.items():
        path = _first_difference(embedded.get(field), _normalized(value), field)
        if path is not None:
            raise EngineError(
                f"{where}: the manifest's {_manifest_name(path)} disagrees with what the {what} was built "
                f"for ({_describe(embedded.get(field), path, field)}); the manifest was edited or the {what} comes "
                "from another build. Refusing to run it; rebuild the engine."
            )
    built = embedded.get("params") or []
    listed = [{"name": p.get("name"), "key": p.get("key")} for p in params]
    if len(listed) != len(built):
        raise EngineError(f"{where}: the manifest lists {len(listed)} parameters, the {what} takes "
                          f"{len(built)}; the {what} comes from another build. Rebuild the engine.")
    for i, (want, got) in enumerate(zip(built, listed)):
        if (want["name"], want["key"]) != (got["name"], got["key"]):
            raise EngineError(f"{where}: parameter {i} is {got['name']!r} (key {got['key']!r}) in the manifest, "
                              f"{want['name']!r} (key {want['key']!r}) in the {what}; refusing to run it.")
        found = weights.get(want["key"])
        if found is None:
            raise EngineError(f"{where}: the weights file has no tensor {want['key']!r}, which the {what} "
                              "takes; the weights file belongs to another engine.")
        if found.get("dtype") != want["dtype"] or list(found.get("shape", [])) != want["shape"]:
            raise EngineError(
                f"{where}: weights-file tensor {want['key']!r} is {found.get('dtype')} {found.get('shape')}; the "
                f"{what} was built for {want['dtype']} {want['shape']}. Refusing to run it."
            )


def check_embedded(directory, manifest: dict[str, Any], embedded: bytes | None, carrier: str, what: str) -> None:
    """A backend's check at load: the fingerprint ``embedded`` in the engine's file ``carrier``
    (None: it has none) against the manifest and the weights file's header."""
    from pathlib import Path

    from .engine_dir import WEIGHTS, weights_spec

    where = Path(directory) / carrier
    if embedded is None:
        raise EngineError(f"{where}: the {what} carries no fingerprint of what it was built for (built by an older "
                          "qwen2c, or not by qwen2c); rebuild the engine.")
    header = {t["name"]: t for t in weights_spec(Path(directory) / WEIGHTS)}
    check_against_manifest(decode(embedded, str(where), what), manifest, header, str(directory), what)


def _normalized(value):
    """As JSON would give it back (tuples become lists, keys strings), so equal means equal."""
    return json.loads(json.dumps(value, sort_keys=True))


def _first_difference(a, b, path: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            found = _first_difference(a.get(k, _MISSING), b.get(k, _MISSING), f"{path}.{k}")
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    return None if a == b and type(a) is type(b) else path


_MISSING = object()


def _manifest_name(path: str) -> str:
    return "model.config" + path[len("model_config"):] if path.startswith("model_config") else path


def _describe(value, path: str, root: str) -> str:
    """The library's value at ``path`` (relative to ``root``), for the error message."""
    for part in path[len(root):].replace("[", ".[").split(".")[1:]:
        if isinstance(value, list) and part.startswith("["):
            index = int(part[1:-1])
            value = value[index] if index < len(value) else _MISSING
        elif isinstance(value, dict):
            value = value.get(part, _MISSING)
        else:
            value = _MISSING
    return "built without it" if value is _MISSING else f"built for {json.dumps(value)[:80]}"
