"""ROCm code objects built here: ROCm's device bitcode, a recent ld.lld, one architecture per build.

TVM's AMDGPU code generator (LLVM 22 in apache-tvm 0.27) compiles a module for one ``mcpu``,
links into it the device libraries that ``tvm_callback_rocm_bitcode_path`` lists (``ocml`` and
the ``oclc_*`` control files), and hands the object to ``tvm_callback_rocm_link``, whose
result is the code object the library embeds. TVM's own callbacks (``tvm.support.rocm``) run the
first of ``ld.lld-22`` / ``ld.lld`` on PATH, whatever its version, look for bitcode only under
``$ROCM_PATH``, ``hipcc``'s folder or ``/opt/rocm``, and link a fixed list of ISA control files
(gfx803/900/906/1030, of which the first present wins) whatever the target. So while a ROCm build
runs, qwen2c registers its own two callbacks (``rocm_codegen``): the newest ld.lld found, and one
of each control file, the ISA file being the target's.

Debian ships the pieces as ``rocm-device-libs`` (bitcode under ``/usr/lib/<triplet>/amdgcn/bitcode``)
and ``lld-<N>`` (``/usr/lib/llvm-<N>/bin/ld.lld``, ``/usr/bin/ld.lld-<N>``). LLVM 22 writes code
object v6 (ELF ABI version 4): ld.lld 16 rejects it ("unknown abi version"), 19 links it, and
Debian 12's default ``lld`` is 14.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import re
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from qwen2c.errors import BackendUnavailableError

from ..registry import TargetSpec
from .pipelines import user_error

log = logging.getLogger(__name__)

MIN_LLD = 19
EM_AMDGPU = 224
ELFOSABI_AMDGPU_HSA = 64
# e_flags & 0xff of an AMDGPU code object names its processor (LLVM's EF_AMDGPU_MACH_AMDGCN_*;
# these three checked against code objects TVM built here).
EF_AMDGPU_MACH = {"gfx908": 0x30, "gfx90a": 0x3F, "gfx942": 0x4C}
# An architecture newer than the installed device libraries: the ISA file of the nearest one of the
# same family (Debian 12's rocm-device-libs 5.2 has gfx940's, not gfx942's).
ISA_FALLBACK = {"gfx942": "gfx940"}

_BITCODE_ROOTS = ("/opt/rocm", "/usr/lib/*-linux-gnu", "/usr/lib64", "/usr/lib/llvm-*/lib/clang/*", "/usr/lib/clang/*")
_CALLBACKS = ("tvm_callback_rocm_link", "tvm_callback_rocm_bitcode_path")


@dataclasses.dataclass(frozen=True)
class Toolchain:
    lld: str  # the ld.lld that links code objects
    files: tuple[str, ...]  # the bitcode files linked into every kernel module, for the target's arch


def find_bitcode_dir() -> Path | None:
    """The folder with ROCm's device bitcode (``ocml.bc``): ``$ROCM_PATH`` first, then the usual places."""
    roots = [os.environ.get("ROCM_PATH")] + [r for pattern in _BITCODE_ROOTS for r in sorted(glob.glob(pattern))]
    for root in filter(None, roots):
        for sub in ("amdgcn/bitcode", "lib/amdgcn/bitcode"):
            if (Path(root) / sub / "ocml.bc").is_file():
                return Path(root) / sub
    return None


def lld_version(path: str) -> int:
    """The major version ``path --version`` reports (0 when it does not run)."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    m = re.search(r"LLD (\d+)", out)
    return int(m.group(1)) if m else 0


def find_lld() -> tuple[str, int] | None:
    """The newest ld.lld here, with its version: on PATH (``ld.lld``, ``ld.lld-<N>``), in Debian's
    ``/usr/lib/llvm-<N>/bin``, or in a ROCm install."""
    on_path = [p for folder in os.environ.get("PATH", "").split(os.pathsep)
               for p in glob.glob(os.path.join(folder, "ld.lld")) + glob.glob(os.path.join(folder, "ld.lld-[0-9]*"))]
    in_rocm = [f"{root}/llvm/bin/ld.lld" for root in (os.environ.get("ROCM_PATH"), "/opt/rocm") if root]
    # PATH order first, so that of equal versions the one on PATH first wins. Each path is kept as
    # found: ld.lld-<N> links to a multi-call ``lld`` that acts on the name it is run as.
    candidates = dict.fromkeys(on_path + sorted(glob.glob("/usr/lib/llvm-*/bin/ld.lld")) + in_rocm)
    versions = {p: lld_version(p) for p in candidates if os.access(p, os.X_OK)}
    return max(versions.items(), key=lambda kv: kv[1], default=None)


def bitcode_files(directory: Path, arch: str) -> tuple[list[str], str | None]:
    """The device libraries to link for ``arch`` (what clang links for HIP without fast-math), and
    what is missing from ``directory``, if anything."""
    isa = [f"oclc_isa_version_{a.removeprefix('gfx')}" for a in (arch, ISA_FALLBACK.get(arch)) if a]
    # Not ockl: TVM marks every bitcode function alwaysinline, which LLVM's verifier rejects for
    # ockl's noinline __ockl_hostcall_internal; TVM's kernels call nothing in it.
    wanted = [["ocml"], ["oclc_daz_opt_off"], ["oclc_unsafe_math_off"], ["oclc_finite_only_off"],
              ["oclc_correctly_rounded_sqrt_on"], ["oclc_wavefrontsize64_on"],
              # code objects v5 and v6 share the implicit kernel arguments the ABI file describes
              ["oclc_abi_version_600", "oclc_abi_version_500"], isa]
    files = []
    for choices in wanted:
        present = [directory / f"{name}.bc" for name in choices if (directory / f"{name}.bc").is_file()]
        if not present:
            return files, f"{' or '.join(c + '.bc' for c in choices)} (for {arch}) in {directory}"
        files.append(str(present[0]))
    return files, None


def check_rocm_toolchain(spec: TargetSpec) -> Toolchain:
    """The toolchain for ``spec``'s code objects; BackendUnavailableError naming each missing piece."""
    bitcode, lld = find_bitcode_dir(), find_lld()
    missing = []
    if bitcode is None:
        missing.append("ROCm's device bitcode, ocml.bc (`apt install rocm-device-libs`, or set ROCM_PATH to the "
                       "folder above amdgcn/bitcode)")
    if lld is None or lld[1] < MIN_LLD:
        found = f"; the newest here is {lld[0]}, LLD {lld[1]}" if lld else ""
        missing.append(f"ld.lld {MIN_LLD} or newer, for the code object v6 TVM's LLVM writes "
                       f"(`apt install lld-{MIN_LLD}`){found}")
    files, missing_file = bitcode_files(bitcode, spec.arches[0]) if bitcode else ([], None)
    if missing_file:
        missing.append(f"{missing_file} (a newer rocm-device-libs, e.g. AMD's own ROCm packages, with ROCM_PATH set "
                       "to the folder above its amdgcn/bitcode)")
    if missing:
        raise BackendUnavailableError(
            f"target {spec.name}: building AMD GPU code objects needs {'; and '.join(missing)}. Nothing was written."
        )
    return Toolchain(lld[0], tuple(files))


@contextlib.contextmanager
def rocm_codegen(spec: TargetSpec):
    """Around ``relax.build`` for ``spec``: TVM links with this toolchain's ld.lld and bitcode."""
    import tvm_ffi

    tools = check_rocm_toolchain(spec)
    log.info("ROCm %s: ld.lld %s, bitcode %s", spec.arches[0], tools.lld, ", ".join(tools.files))
    previous = {name: tvm_ffi.get_global_func(name, allow_missing=True) for name in _CALLBACKS}
    tvm_ffi.register_global_func("tvm_callback_rocm_link", _linker(tools.lld), override=True)
    tvm_ffi.register_global_func("tvm_callback_rocm_bitcode_path", lambda: list(tools.files), override=True)
    try:
        yield
    finally:
        for name, func in previous.items():
            if func is not None:
                tvm_ffi.register_global_func(name, func, override=True)


def _linker(lld: str):
    def link(obj) -> bytearray:
        with tempfile.TemporaryDirectory(prefix="qwen2c-rocm-") as tmp:
            src, out = Path(tmp) / "kernels.o", Path(tmp) / "kernels.co"
            src.write_bytes(bytes(obj))
            # --no-undefined: a code object with unresolved symbols fails only when a GPU loads it.
            done = subprocess.run([lld, "--no-undefined", "-shared", str(src), "-o", str(out)],
                                  capture_output=True, text=True)
            if done.returncode != 0:  # shown as itself by compile_module (pipelines.user_error)
                raise user_error(BackendUnavailableError(
                    f"{lld} could not link the engine's AMD GPU code object:\n"
                    + (done.stderr or done.stdout or f"exit status {done.returncode}")[-2000:]
                ))
            return bytearray(out.read_bytes())

    return link


def code_objects(library: bytes) -> list[dict[str, Any]]:
    """The AMDGPU code objects embedded in ``library``: 64-bit little-endian ELFs with e_machine
    EM_AMDGPU, each with its architecture (from e_flags), code object version and size."""
    found, at = [], library.find(b"\x7fELF")
    while at >= 0 and at + 64 <= len(library):
        ei_class, ei_data, osabi, abi_version = library[at + 4], library[at + 5], library[at + 7], library[at + 8]
        machine = struct.unpack_from("<H", library, at + 18)[0]
        if ei_class == 2 and ei_data == 1 and machine == EM_AMDGPU:
            flags, shoff = struct.unpack_from("<I", library, at + 48)[0], struct.unpack_from("<Q", library, at + 40)[0]
            shentsize, shnum = struct.unpack_from("<HH", library, at + 58)
            mach = flags & 0xFF
            arch = next((a for a, m in EF_AMDGPU_MACH.items() if m == mach), f"mach 0x{mach:02x}")
            # ELFABIVERSION_AMDGPU_HSA_V<n> is n - 2 (V3 = 1 ... V6 = 4).
            version = abi_version + 2 if osabi == ELFOSABI_AMDGPU_HSA else None
            found.append({"arch": arch, "code_object_version": version, "bytes": shoff + shentsize * shnum})
        at = library.find(b"\x7fELF", at + 4)
    return found


def describe_code_objects(library: bytes, spec: TargetSpec) -> dict[str, Any]:
    """What a written ROCm library holds, for the manifest; raises when it has no code object for
    each of ``spec``'s architectures."""
    objects = code_objects(library)
    arches = sorted({o["arch"] for o in objects})
    missing = [a for a in spec.arches if a not in arches]
    if not objects or missing:
        raise BackendUnavailableError(
            f"the ROCm library holds no AMD GPU code object for {', '.join(missing or spec.arches)} (found: "
            f"{', '.join(arches) or 'none'}); refusing to write an engine no GPU could load."
        )
    versions = sorted({o["code_object_version"] for o in objects if o["code_object_version"]})
    return {"format": "hsaco", "arches": arches, "code_objects": len(objects), "code_object_versions": versions,
            "bytes": sum(o["bytes"] for o in objects)}

