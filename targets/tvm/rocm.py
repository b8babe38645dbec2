"""What TVM needs here to emit ROCm code objects: ROCm's device bitcode and a recent ld.lld.

TVM links AMDGPU code with ``ld.lld`` and the ``ocml``/``ockl`` bitcode libraries it finds under
``$ROCM_PATH/amdgcn/bitcode`` (or ``$ROCM_PATH/lib``). Debian ships them as ``rocm-device-libs``
and ``lld-<N>``; its default ``lld`` (14) is too old for the code objects TVM asks for ("unknown
abi version"). Checked before building, so a missing piece is a message, not a linker traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from qwen2c.errors import BackendUnavailableError

MIN_LLD = 15


def rocm_bitcode_dir() -> Path | None:
    candidates = [os.environ.get("ROCM_PATH"), "/opt/rocm", "/usr/lib/llvm-rocm", "/usr"]
    for root in filter(None, candidates):
        for sub in ("amdgcn/bitcode", "lib/amdgcn/bitcode"):
            d = Path(root) / sub
            if (d / "ocml.bc").is_file():
                return d
    try:
        listed = subprocess.run(["dpkg", "-L", "rocm-device-libs"], capture_output=True, text=True).stdout
    except OSError:
        return None
    for line in listed.splitlines():
        if line.endswith("/ocml.bc"):
            return Path(line).parent
    return None


def lld_version(path: str) -> int:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"LLD (\d+)", out)
    return int(m.group(1)) if m else 0


def find_lld() -> str | None:
    """The newest ``ld.lld`` on PATH or in Debian's versioned LLVM folders."""
    found = [p for p in [shutil.which("ld.lld")] if p]
    found += [str(p) for p in sorted(Path("/usr/lib").glob("llvm-*/bin/ld.lld"))]
    best = max(found, key=lld_version, default=None)
    return best if best and lld_version(best) >= MIN_LLD else None


def check_rocm_toolchain(spec) -> None:
    bitcode, lld = rocm_bitcode_dir(), find_lld()
    missing = []
    if bitcode is None:
        missing.append("ROCm's device bitcode (apt install rocm-device-libs, or set ROCM_PATH)")
    if lld is None:
        missing.append(f"ld.lld {MIN_LLD} or newer (apt install lld-19, for example)")
    if missing:
        raise BackendUnavailableError(
            f"target {spec.name}: building AMD GPU code objects needs {' and '.join(missing)}. Nothing was written."
        )
    # TVM reads ROCM_PATH for the bitcode and runs the first ld.lld on PATH.
    os.environ.setdefault("ROCM_PATH", str(bitcode.parent.parent if bitcode.parent.name == "amdgcn" else bitcode.parent))
    lld_dir = str(Path(lld).parent)
    if lld_version(shutil.which("ld.lld") or "") < MIN_LLD:
        os.environ["PATH"] = lld_dir + os.pathsep + os.environ.get("PATH", "")
