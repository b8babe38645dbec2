"""``qwen2c pack``: engines and what runs them, in one folder, for a machine without TVM or a network.

```
DIR/engines/<name>/  each engine's files (its weights and tokenizer optional)
DIR/site/            for PYTHONPATH: qwen2c, TVM's Python package with its runtime libraries (not
                     its 259 MB compiler), tvm_ffi built for the target's Python, typing_extensions
DIR/env.sh           `. DIR/env.sh` sets PYTHONPATH and makes TVM load its runtime only
DIR/pack.json        what is in it: engines, Python version, versions, sizes
```

The target machine needs Python X.Y with numpy (torch and transformers for ``verify`` and
tokenizers). tvm_ffi's compiled core is specific to a Python version: for the running Python the
installed copy is taken; for another, its wheel is fetched once into ``~/.cache/qwen2c/wheels``.
Everything else is pure Python or version-independent.

An engine packed without weights lists the tensors its weights file must hold instead of that
file's checksum (``expected_weights``; see ``engine_dir``), so weights made on the target machine
(from a seed, say) load once they match.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

from . import __version__, engine_dir
from .errors import Qwen2cError

log = logging.getLogger(__name__)

PACK_JSON = "pack.json"
ENV_SH = "env.sh"
FORMAT_VERSION = 1
# pyproject.toml's package-dir: in a development install these live beside qwen2c/, not in it.
QWEN2C_PACKAGES = ("qwen2c", "qwen2c.graphs", "qwen2c.schedules", "qwen2c.targets", "qwen2c.autotune")
# What TVM's runtime-only mode loads (``libtvm_runtime_extra.so`` is not loaded in that mode).
TVM_RUNTIME_LIBRARIES = ("libtvm_runtime.so", "libtvm_runtime_cuda.so")
MIN_PYTHON_MINOR = 11  # pyproject.toml: requires-python >= 3.11

ENV_SH_TEXT = """\
# Source this file (`. path/to/env.sh`) to run the engines in engines/ with this folder's qwen2c
# and TVM runtime, e.g. `qwen2c run "$QWEN2C_PACK/engines/NAME" --prompt-ids 1,2,3`.
export QWEN2C_PACK="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
export PYTHONPATH="$QWEN2C_PACK/site${PYTHONPATH:+:$PYTHONPATH}"
# TVM's runtime only: this folder has no compiler library.
export TVM_USE_RUNTIME_LIB=1
# Else tvm_ffi may try to JIT-compile a PyTorch extension at import.
export TVM_FFI_DISABLE_TORCH_C_DLPACK=1
qwen2c() { "${PYTHON:-python3}" -m qwen2c.cli "$@"; }
"""


class WheelFetchError(Qwen2cError):
    """A wheel for another Python version could not be fetched (no network, no such wheel)."""


def pack(
    engines: Iterable[str | Path],
    out: str | Path,
    python: str | None = None,
    weights: bool = True,
    tokenizer: bool = True,
    force: bool = False,
    progress: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Write a self-contained folder at ``out`` that runs ``engines`` with Python ``python`` (X.Y,
    default: this one) and no TVM installed; return what ``pack.json`` records.

    Nothing appears at ``out`` until the folder is complete; an existing pack is replaced only
    with ``force``. ``weights=False`` leaves out each engine's weights, to be supplied later.
    """
    out = Path(out)
    python = _check_python(python)
    sources = _name_engines(engines)
    engine_dir.check_destination(out, force, PACK_JSON, "pack")
    tvm_dist = _installed("apache-tvm")
    tvm_ffi_dist = _tvm_ffi_distribution(python, progress)
    staging = engine_dir.make_staging(out)
    try:
        packed = []
        for name, source in sources:
            progress(f"copying engine {source} as engines/{name}")
            packed.append(_copy_engine(source, staging / "engines" / name, weights, tokenizer))
        progress(f"copying qwen2c, TVM's runtime and tvm_ffi for Python {python}")
        site = staging / "site"
        _copy_tvm(tvm_dist, site)
        _copy_tvm_ffi(tvm_ffi_dist, site)
        _copy_qwen2c(site)
        _copy_typing_extensions(site)
        (staging / ENV_SH).write_text(ENV_SH_TEXT)
        versions = {"qwen2c": __version__, "tvm": tvm_dist.version, "tvm_ffi": tvm_ffi_dist.version}
        summary = _summary(staging, python, versions, packed)
        (staging / PACK_JSON).write_text(json.dumps(summary, indent=2) + "\n")
        engine_dir.publish(staging, out, force, PACK_JSON, "pack")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return summary


def format_pack(summary: dict[str, Any], out: str | Path) -> str:
    """What ``qwen2c pack`` prints: sizes and how to run the pack."""
    lines = [f"packed {len(summary['engines'])} engine(s) into {out} for Python {summary['python']}: "
             f"{_mib(summary['bytes']['total'])} in all"]
    for e in summary["engines"]:
        left_out = [what for what in ("weights", "tokenizer") if not e[what]]
        lines.append(f"  engines/{e['name']}: {_mib(sum(e['files'].values()))} ({e['device']}"
                     + "".join(f", no {what}" for what in left_out) + ")")
    lines.append(f"  site: {_mib(summary['bytes']['site'])} (qwen2c {summary['versions']['qwen2c']}, "
                 f"TVM {summary['versions']['tvm']} runtime, tvm_ffi {summary['versions']['tvm_ffi']})")
    first = summary["engines"][0]["name"]
    lines.append(f'run: . {out}/{ENV_SH} && qwen2c run "$QWEN2C_PACK/engines/{first}" --prompt-ids 1,2,3')
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _check_python(python: str | None) -> str:
    if python is None:
        return f"{sys.version_info.major}.{sys.version_info.minor}"
    m = re.fullmatch(r"3\.(\d+)", python)
    if m is None or int(m.group(1)) < MIN_PYTHON_MINOR:
        raise Qwen2cError(f"--python {python!r}: give the X.Y version of the Python that will run the pack "
                          f"(3.{MIN_PYTHON_MINOR} or newer, as qwen2c requires).")
    return python


def _name_engines(engines: Iterable[str | Path]) -> list[tuple[str, Path]]:
    named: dict[str, Path] = {}
    for e in map(Path, engines):
        name = e.resolve().name
        if name in named:
            raise Qwen2cError(f"{e} and {named[name]} would both be engines/{name} in the pack; rename one.")
        named[name] = e
    if not named:
        raise Qwen2cError("give at least one engine directory to pack.")
    return list(named.items())


def _copy_engine(source: Path, dest: Path, weights: bool, tokenizer: bool) -> dict[str, Any]:
    """Copy an engine (verified first: a pack never carries a corrupt one); without its weights or
    tokenizer, its copied manifest no longer lists them."""
    manifest = engine_dir.read_manifest(source)
    files = manifest["files"]
    dropped = set() if tokenizer else set(manifest.get("tokenizer") or ())
    if not weights:
        dropped.add(engine_dir.WEIGHTS)
    names = [n for n in files if n not in dropped]
    if weights and engine_dir.WEIGHTS not in files:  # weights supplied after an earlier pack: checked above
        names.append(engine_dir.WEIGHTS)
    dest.mkdir(parents=True)
    for name in names:
        shutil.copy2(source / name, dest / name)
    if dropped:
        manifest = {**manifest, "files": {n: e for n, e in files.items() if n not in dropped}}
        if not tokenizer:
            manifest["tokenizer"] = []
        if not weights and engine_dir.WEIGHTS in files:
            manifest["expected_weights"] = engine_dir.weights_spec(source / engine_dir.WEIGHTS)
    (dest / engine_dir.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if not dropped and (source / engine_dir.SIGNATURE).is_file():  # the manifest is unchanged: still signed
        shutil.copy2(source / engine_dir.SIGNATURE, dest / engine_dir.SIGNATURE)
    return {"name": dest.name, "source": str(source.resolve()), "target": manifest["target"]["name"],
            "device": manifest["target"]["device"], "weights": weights, "tokenizer": bool(manifest.get("tokenizer")),
            "files": {n: (dest / n).stat().st_size for n in sorted([*names, engine_dir.MANIFEST])}}


def _copy_tree(source: Path, dest: Path, patterns: tuple[str, ...]) -> None:
    """Files under ``source`` matching ``patterns``, keeping their layout (no caches, no hidden)."""
    for pattern in patterns:
        for f in source.rglob(pattern):
            rel = f.relative_to(source)
            if f.is_file() and not any(p == "__pycache__" or p.startswith(".") for p in rel.parts):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest / rel)


def _copy_qwen2c(site: Path) -> None:
    for name in QWEN2C_PACKAGES:
        source = Path(importlib.util.find_spec(name).submodule_search_locations[0])
        _copy_tree(source, site.joinpath(*name.split(".")), ("*.py",))


def _installed(project: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(project)
    except importlib.metadata.PackageNotFoundError:
        raise Qwen2cError(f"{project} is not installed here; qwen2c pack copies TVM's runtime from it.") from None


def _copy_tvm(dist: importlib.metadata.Distribution, site: Path) -> None:
    """TVM's Python files (the same wheel serves every Python) and its runtime libraries."""
    source = Path(dist.locate_file("tvm"))
    _copy_tree(source, site / "tvm", ("*.py",))
    (site / "tvm" / "lib").mkdir()
    for lib in TVM_RUNTIME_LIBRARIES:
        if not (source / "lib" / lib).is_file():
            raise Qwen2cError(f"{source / 'lib' / lib}: missing from the installed apache-tvm; reinstall it.")
        shutil.copy2(source / "lib" / lib, site / "tvm" / "lib" / lib)


def _tvm_ffi_distribution(python: str, progress) -> importlib.metadata.Distribution:
    """The installed apache-tvm-ffi for this Python; for another, the same version's wheel for it."""
    installed = _installed("apache-tvm-ffi")
    if python == f"{sys.version_info.major}.{sys.version_info.minor}":
        return installed
    unpacked = _unpack(_fetch_wheel("apache-tvm-ffi", installed.version, python, progress))
    return next(importlib.metadata.distributions(name="apache-tvm-ffi", path=[str(unpacked)]))


def _copy_tvm_ffi(dist: importlib.metadata.Distribution, site: Path) -> None:
    """tvm_ffi's Python files, its core extension and libraries, and a dist-info naming them.

    tvm_ffi finds its library through its distribution's RECORD first: without a record in the
    pack, a machine that has apache-tvm-ffi installed would mix that library with this core.
    """
    _copy_tree(Path(dist.locate_file("tvm_ffi")), site / "tvm_ffi", ("*.py", "*.so"))
    info = site / f"apache_tvm_ffi-{dist.version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(dist.read_text("METADATA"))
    files = sorted(p.relative_to(site).as_posix() for p in (site / "tvm_ffi").rglob("*") if p.is_file())
    files += [f"{info.name}/METADATA", f"{info.name}/RECORD"]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))


def _copy_typing_extensions(site: Path) -> None:
    # tvm_ffi imports it (>= 4.13); the target's copy may be older or absent. A newer one is a superset.
    shutil.copy2(importlib.util.find_spec("typing_extensions").origin, site / "typing_extensions.py")


def _fetch_wheel(project: str, version: str, python: str, progress) -> Path:
    """``project==version``'s binary wheel for CPython ``python`` on this platform, cached."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen2c" / "wheels"
    tag = "cp" + python.replace(".", "")
    pattern = f"{project.replace('-', '_')}-{version}-{tag}-{tag}-*.whl"
    found = sorted(cache.glob(pattern))
    if found:
        return found[-1]
    progress(f"fetching {project}=={version} for Python {python}")
    machine = platform.machine()
    # The wheels are tagged manylinux_2_24/2_28: the legacy manylinux2014 tag alone finds none.
    platforms = [f"manylinux_2_28_{machine}", f"manylinux_2_27_{machine}", f"manylinux2014_{machine}"]
    cmd = [sys.executable, "-m", "pip", "download", f"{project}=={version}", "--only-binary=:all:", "--no-deps",
           "--python-version", python, *(a for p in platforms for a in ("--platform", p)), "-d", str(cache),
           "--retries", "2", "--timeout", "30", "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob(pattern))
    if result.returncode != 0 or not found:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise WheelFetchError(f"could not fetch {project}=={version} for Python {python} ({tail}). Put its wheel in "
                              f"{cache} (`{' '.join(cmd[2:])}` where the registry is reachable), then pack again.")
    return found[-1]


def _unpack(wheel: Path) -> Path:
    """The wheel's files, unzipped once beside it."""
    target = wheel.with_suffix("")
    if not target.is_dir():
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(partial)
        os.replace(partial, target)
    return target


def _summary(staging: Path, python: str, versions: dict[str, str], engines: list[dict[str, Any]]) -> dict[str, Any]:
    site = staging / "site"
    engines_bytes = sum(sum(e["files"].values()) for e in engines)
    site_bytes = _bytes(site)
    return {
        "format_version": FORMAT_VERSION,
        "python": python,
        "versions": versions,
        "engines": engines,
        "site": {
            "packages": {p.name: _bytes(p) for p in sorted(site.iterdir())},
            "libraries": {p.relative_to(site).as_posix(): p.stat().st_size for p in sorted(site.rglob("*.so"))},
        },
        "bytes": {"engines": engines_bytes, "site": site_bytes,
                  "total": engines_bytes + site_bytes + (staging / ENV_SH).stat().st_size},
    }


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
