"""The engine directory: files plus a manifest that checksums them.

A build writes into a staging directory beside the destination and renames it into place only
when complete, so a failed or interrupted build leaves no half engine, and an existing engine is
only replaced when asked (``force``) and only after the new one is complete.

An engine copied without its weights (``qwen2c pack --no-weights``, for weights made where it
runs) lists, instead of the weights file's checksum, the tensors that file must hold
(``expected_weights``: name, safetensors dtype, shape); a supplied file is checked against them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import EngineError, OutputError, Qwen2cError, read_json_object

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SIGNATURE = "signature.json"  # qwen2c/signing.py: signs the manifest, so it is in no checksum table


def check_destination(out: Path, force: bool, marker: str = MANIFEST, kind: str = "engine") -> None:
    """Refuse an existing ``out`` unless ``force``, and always one that lacks ``marker`` (not ours)."""
    if out.exists() and not force:
        raise Qwen2cError(f"{out} already exists; pass --force to replace it (it is kept until the new {kind} is complete).")
    if out.exists() and not (out / marker).is_file():
        raise Qwen2cError(f"{out} exists and is not a qwen2c {kind} (no {marker}); refusing to replace it even with --force.")


def make_staging(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; an engine is an ordinary directory
    return staging


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(staging: Path, out: Path, force: bool, marker: str = MANIFEST, kind: str = "engine",
            abort=None) -> None:
    """Move a complete staging directory to ``out``; with ``force``, swap out the old one.

    ``abort``: called once the new directory is in place, before the old one is deleted; if it
    returns true (an interrupt arrived meanwhile) the swap is undone and KeyboardInterrupt raised.
    """
    check_destination(out, force, marker, kind)
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
    if abort is not None and abort():
        os.rename(out, staging)
        if old is not None:
            os.rename(old, out)
        raise KeyboardInterrupt
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256(path: Path) -> str:
    """SHA-256 of a file, hashed from a mapping of it (no copy into Python buffers)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as view:
                for at in range(0, size, 1 << 24):
                    h.update(view[at:at + (1 << 24)])
    return h.hexdigest()


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: {"sha256": sha256(p), "size": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name not in (MANIFEST, SIGNATURE)
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest with the format version and the checksum table; return what was written."""
    for p in directory.iterdir():  # some writers (safetensors) create files private
        if p.is_file() and p.name != LIBRARY:
            p.chmod(0o666 & ~_umask())
    manifest = {**manifest, "format_version": FORMAT_VERSION, "files": file_table(directory)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def record_in_manifest(directory: Path, key: str, value: Any) -> None:
    """Set one top-level field of an engine's manifest (e.g. the parity ``qwen2c verify`` measured).

    The manifest is not in its own checksum table, so nothing else changes; it is replaced by a
    rename, so an interrupted write leaves the old manifest whole.
    """
    path = Path(directory) / MANIFEST
    manifest = read_json_object(path, EngineError)
    manifest[key] = value
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_manifest(directory: Path, verify: bool = True, staging_ok: bool = False) -> dict[str, Any]:
    """The manifest, after checking (``verify``) every listed file's size and SHA-256, and a weights
    file supplied after packing against the tensors the manifest expects."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EngineError(f"{directory}: no such engine directory.")
    if is_staging(directory) and not staging_ok:
        raise EngineError(f"{directory}: the staging folder of a build that is running or was interrupted, not an "
                          "engine; the next build to the same destination removes it.")
    path = directory / MANIFEST
    if not path.is_file():
        raise EngineError(f"{directory}: no {MANIFEST}; not a qwen2c engine (or an incomplete copy of one).")
    manifest = read_json_object(path, EngineError)
    version = manifest.get("format_version")
    if isinstance(version, bool):
        version = None
    if version != FORMAT_VERSION:
        raise EngineError(
            f"{path}: engine format version {version!r}, this qwen2c reads version {FORMAT_VERSION}; rebuild the engine."
        )
    files = manifest.get("files")
    expected_weights = manifest.get("expected_weights")
    main = _main_file(directory, manifest)
    if not isinstance(files, dict) or main not in files or (WEIGHTS not in files and expected_weights is None):
        raise EngineError(f"{path}: the manifest's 'files' table is missing or lacks {main}/{WEIGHTS}; rebuild.")
    if verify:
        verify_files(directory, manifest)
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Every file ``manifest`` lists has its size and SHA-256; a weights file supplied after packing
    holds the tensors it expects."""
    files = manifest["files"]
    _verify_checksums(Path(directory), files)
    if WEIGHTS not in files:
        _verify_supplied_weights(Path(directory) / WEIGHTS, manifest.get("expected_weights"))


def _main_file(directory: Path, manifest: dict[str, Any]) -> str:
    """The file the manifest's backend cannot run without (TVM: model.so); refuses an unknown backend."""
    from qwen2c.targets.backends import BACKENDS

    return BACKENDS.for_engine(directory, manifest).main_file


def _verify_checksums(directory: Path, files: dict[str, Any]) -> None:
    for name, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise EngineError(f"{directory}: the manifest's entry for {name!r} is not a file of the engine; corrupt.")
        file = directory / name
        if not file.is_file():
            raise EngineError(f"{directory}: {name} is listed in the manifest but missing; the engine is incomplete.")
        if not _checksum_matches(file, entry):
            raise EngineError(
                f"{file}: checksum mismatch with the manifest; the engine is corrupt or was modified. Rebuild it."
            )


# Verified once, trusted until the file changes: a file whose SHA-256 matched its manifest is
# remembered in the user's cache (``QWEN2C_CACHE_DIR``, default ``$XDG_CACHE_HOME/qwen2c`` or
# ``~/.cache/qwen2c``) under a name derived from its path, device, inode, size, mtime and ctime and
# the digest the manifest expects. Reopening an unchanged engine then costs one stat per file
# instead of hashing every byte (qwen2-0.5b float32, 2 GB: 4.6 s measured on a busy 2-core machine,
# SHA-256 at ~0.45-0.7 GB/s there; it cannot be split over cores). Why it stays safe:
# * ctime is set by the kernel on every write, truncation, rename-over (new inode) or metadata
#   change, and cannot be set back by an unprivileged user (``touch -d`` sets mtime, and ctime to
#   now); so any change to the file changes the name looked up and the file is hashed again;
# * a file is remembered only if its ctime is more than a second older than the start of the
#   hashing, so a change made while it was being hashed (which the kernel's coarse clock could stamp
#   with the same ctime) cannot be remembered as verified;
# * a changed manifest (another expected digest) looks up another name;
# * the cache lives in the user's own directory (mode 0700), not in the engine directory: whoever
#   can forge an entry can already change the user's files, qwen2c's code included.
# Set QWEN2C_VERIFY_CACHE=0 to hash every file on every load.
VERIFY_CACHE_ENV = "QWEN2C_VERIFY_CACHE"
CACHE_DIR_ENV = "QWEN2C_CACHE_DIR"
_RACY_NS = 1_000_000_000


def _checksum_matches(file: Path, entry: dict[str, Any]) -> bool:
    """Size and SHA-256 as the manifest says, hashing only files not already verified unchanged."""
    before = file.stat()
    if before.st_size != entry.get("size"):
        return False
    mark = _verified_mark(file, before, entry.get("sha256"))
    if mark is not None and mark.exists():
        return True
    started = time.time_ns()
    if sha256(file) != entry.get("sha256"):
        return False
    after = file.stat()
    if mark is not None and _identity(after) == _identity(before) and after.st_ctime_ns < started - _RACY_NS:
        try:
            mark.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            mark.touch()
        except OSError as e:  # an unwritable cache only costs the next load a hash
            log.debug("could not remember %s as verified: %s", file, e)
    return True


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _verified_mark(file: Path, st: os.stat_result, digest: Any) -> Path | None:
    if os.environ.get(VERIFY_CACHE_ENV, "1") == "0" or not isinstance(digest, str):
        return None
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qwen2c")
    key = json.dumps([str(file.resolve()), *_identity(st), digest])
    return Path(root) / "verified" / hashlib.sha256(key.encode()).hexdigest()


def weights_spec(path: Path) -> list[dict[str, Any]]:
    """Name, dtype (safetensors' spelling: F32, BF16, ...) and shape of each tensor in a safetensors
    file, sorted by name (the file's order is a layout choice: weights_file.write_aligned groups and
    aligns tensors); read from its header alone."""
    header = _safetensors_header(path)
    return [{"name": name, "dtype": header[name]["dtype"], "shape": header[name]["shape"]} for name in sorted(header)]


def _safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file describes, after checking that its size matches them."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= size - 8:
            raise EngineError(f"{path}: not a safetensors file (no valid header).")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EngineError(f"{path}: not a safetensors file (unreadable header: {e}).") from None
    if not isinstance(header, dict):
        raise EngineError(f"{path}: not a safetensors file (its header is not a JSON object).")
    header.pop("__metadata__", None)
    try:
        data = max((t["data_offsets"][1] for t in header.values()), default=0)
    except (KeyError, TypeError, IndexError):
        raise EngineError(f"{path}: not a safetensors file (a tensor entry has no data_offsets).") from None
    if not isinstance(data, int) or isinstance(data, bool):
        raise EngineError(f"{path}: not a safetensors file (a tensor's data_offsets are not integers).")
    if 8 + length + data != size:
        raise EngineError(
            f"{path}: {size} bytes, but its header describes {8 + length + data}; the file is truncated or corrupt."
        )
    return header


def _verify_supplied_weights(path: Path, expected: list[dict[str, Any]]) -> None:
    """A weights file supplied after packing holds exactly the expected tensors, shapes and dtypes."""
    if not path.is_file():
        raise EngineError(
            f"{path.parent}: no {WEIGHTS}; this engine was packed without its weights. Supply a {WEIGHTS} holding "
            f"the {len(expected)} tensors its manifest lists under 'expected_weights'."
        )
    if not isinstance(expected, list) or not all(isinstance(w, dict) and {"name", "dtype", "shape"} <= set(w)
                                                   for w in expected):
        raise EngineError(f"{path.parent}: the manifest's 'expected_weights' is not a list of tensors; corrupt.")
    found = _safetensors_header(path)
    for want in expected:
        got = found.pop(want["name"], None) if isinstance(want["name"], str) else None
        if not isinstance(got, dict):
            raise EngineError(
                f"{path}: tensor {want['name']!r} is missing; the engine expects {want['dtype']} {want['shape']}."
            )
        if got["dtype"] != want["dtype"] or got["shape"] != want["shape"]:
            raise EngineError(
                f"{path}: tensor {want['name']!r} is {got['dtype']} {got['shape']}; the engine expects "
                f"{want['dtype']} {want['shape']}."
            )
    if found:
        raise EngineError(
            f"{path}: tensor {next(iter(found))!r} is not one this engine uses (see its manifest's 'expected_weights')."
        )


# --- Staging folders that outlive their build (killed builds), and the destination checked first ---
#
# A build stages into ``.NAME.building-PID-XXXX`` beside the destination and holds an exclusive
# lock (flock) on ``.NAME.building-PID-XXXX.lock`` while it runs. The kernel drops the lock when
# the process dies, however it dies, so the next build to the same destination can tell a staging
# folder that nobody owns from one that a concurrent build is filling, even if the PID was reused.

STAGING_MARK = ".building-"
SPACE_MARGIN = 256 << 20  # the library and the linker's temporary objects, beyond the weights


def is_staging(directory: Path) -> bool:
    name = Path(directory).resolve().name
    return name.startswith(".") and STAGING_MARK in name


class Staging:
    """A locked staging folder for ``out``: created (so the destination is proven writable) before
    any slow step, removed on exit unless published. Leftovers of dead builds are removed first."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path: Path | None = None
        self._lock_file = None

    def __enter__(self) -> "Staging":
        import fcntl

        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(self.out)
            fd, lock = tempfile.mkstemp(prefix=f".{self.out.name}{STAGING_MARK}{os.getpid()}-", suffix=".lock",
                                        dir=parent)
            self._lock_file, self._lock_path = os.fdopen(fd, "w"), Path(lock)
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            self.path = Path(lock[: -len(".lock")])
            self.path.mkdir()
            self.path.chmod(0o777 & ~_umask())  # an engine is an ordinary directory
            (self.path / ".write-probe").write_bytes(b"\0" * 4096)
            (self.path / ".write-probe").unlink()
        except OSError as e:
            self.__exit__(None, None, None)
            raise output_error(self.out, e) from None
        return self

    def __exit__(self, *exc) -> None:
        if self.path is not None and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_file is not None:
            self._lock_path.unlink(missing_ok=True)
            self._lock_file.close()
            self._lock_file = None


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging folders, lock files and temporary objects that builds to ``out`` left
    when they were killed; put back an engine that a killed ``--force`` build had moved aside.
    Returns what was removed."""
    import fcntl

    out = Path(out)
    removed = []
    prefix = f".{out.name}{STAGING_MARK}"
    if not out.parent.is_dir():
        return removed
    for entry in sorted(out.parent.iterdir()):
        if not entry.name.startswith(prefix) or entry.name.endswith(".lock"):
            continue
        lock = entry.with_name(entry.name + ".lock")
        if lock.exists():
            try:
                with open(lock, "a") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while its build runs
            except BlockingIOError:
                continue
            except OSError:
                continue
        elif _owner_alive(entry.name[len(prefix):]):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        lock.unlink(missing_ok=True)
        removed.append(entry)
    for lock in out.parent.glob(f"{_glob_escape(prefix)}*.lock"):
        if not lock.with_name(lock.name[: -len(".lock")]).exists():
            try:
                with open(lock, "a") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue
            lock.unlink(missing_ok=True)
            removed.append(lock)
    for old in out.parent.glob(f"{_glob_escape('.' + out.name)}.old-*"):
        if _owner_alive(old.name.rsplit("-", 1)[-1]):
            continue
        if not out.exists() and (old / MANIFEST).is_file():
            os.rename(old, out)  # a killed --force build had moved the user's engine aside
        else:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    return removed


def _owner_alive(suffix: str) -> bool:
    pid = suffix.split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


_SPACE_ERRNOS = {"ENOSPC", "EDQUOT", "EFBIG"}
_ACCESS_ERRNOS = {"EACCES", "EPERM", "EROFS", "ENOENT", "ENOTDIR", "EISDIR", "ENAMETOOLONG", "ELOOP", "EEXIST"}


def output_error(out: Path, error: BaseException) -> Qwen2cError | None:
    """A one-paragraph error for a failure to write to ``out``'s folder, or None if ``error`` is not one."""
    import errno

    code = errno.errorcode.get(getattr(error, "errno", None) or 0, "")
    text = str(error)
    if code in _SPACE_ERRNOS or "No space left" in text or "File too large" in text or "Disk quota" in text:
        return OutputError(f"-o {out}: the disk filled while writing the engine ({getattr(error, 'strerror', None) or text}); "
                           "nothing was left behind. Free space and build again.")
    if code in _ACCESS_ERRNOS:
        return OutputError(f"-o {out}: cannot write in {out.parent} ({error.strerror}); nothing was built. "
                           "Choose a writable folder.")
    return None


def check_free_space(staging: Path, out: Path, weight_bytes: int) -> None:
    """Refuse before any slow step when the destination's disk cannot hold the engine."""
    need = weight_bytes + SPACE_MARGIN
    free = shutil.disk_usage(staging).free
    if free < need:
        raise OutputError(
            f"-o {out}: the engine needs about {need / (1 << 20):.0f} MiB ({weight_bytes / (1 << 20):.0f} MiB of "
            f"weights plus the library and temporary objects), and {out.parent} has {free / (1 << 20):.0f} MiB "
            "free; nothing was built. Free space or choose another folder."
        )
