"""The engine directory: files plus a manifest that checksums them.

A build writes into a staging directory beside the destination and renames it into place only
when complete, so a failed or interrupted build leaves no half engine, and an existing engine is
only replaced when asked (``force``) and only after the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import EngineError, Qwen2cError, read_json_object

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def check_destination(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise Qwen2cError(f"{out} already exists; pass --force to replace it (it is kept until the new engine is complete).")
    if out.exists() and not (out / MANIFEST).is_file():
        raise Qwen2cError(f"{out} exists and is not a qwen2c engine (no {MANIFEST}); refusing to replace it even with --force.")


def make_staging(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; an engine is an ordinary directory
    return staging


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(staging: Path, out: Path, force: bool) -> None:
    """Move a complete staging directory to ``out``; with ``force``, swap out the old engine."""
    check_destination(out, force)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: {"sha256": sha256(p), "size": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    for p in directory.iterdir():  # some writers (safetensors) create files private
        if p.is_file() and p.name != LIBRARY:
            p.chmod(0o666 & ~_umask())
    manifest = {**manifest, "format_version": FORMAT_VERSION, "files": file_table(directory)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(directory: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest, after checking every listed file's size and SHA-256 (``verify``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EngineError(f"{directory}: no such engine directory.")
    path = directory / MANIFEST
    if not path.is_file():
        raise EngineError(f"{directory}: no {MANIFEST}; not a qwen2c engine (or an incomplete copy of one).")
    manifest = read_json_object(path, EngineError)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise EngineError(
            f"{path}: engine format version {version!r}, this qwen2c reads version {FORMAT_VERSION}; rebuild the engine."
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or LIBRARY not in files or WEIGHTS not in files:
        raise EngineError(f"{path}: the manifest's 'files' table is missing or lacks {LIBRARY}/{WEIGHTS}; rebuild.")
    if verify:
        for name, entry in files.items():
            file = directory / name
            if not file.is_file():
                raise EngineError(f"{directory}: {name} is listed in the manifest but missing; the engine is incomplete.")
            if file.stat().st_size != entry.get("size") or sha256(file) != entry.get("sha256"):
                raise EngineError(
                    f"{file}: checksum mismatch with the manifest; the engine is corrupt or was modified. Rebuild it."
                )
    return manifest
