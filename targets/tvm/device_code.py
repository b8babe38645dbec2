"""Device code in the engine's library: compiled here, checked before the engine is written.

CUDA: TVM 0.27 builds a CUDA module that holds *source* unless its CUDA runtime library
(``libtvm_runtime_cuda.so``) is loaded while building; with it loaded, TVM compiles each CUDA
module through ``tvm_callback_cuda_compile`` at build time and saves the binary (format "cubin",
which the driver's ``cuModuleLoadData`` takes as a fatbin too). That library links against the
CUDA driver, ``libcuda.so.1``, which a machine without a GPU lacks, yet calls none of it while
building. So on such a machine qwen2c loads a stand-in driver whose every entry point fails
(compiled once from the C below), then TVM's CUDA runtime, and registers an nvcc callback that
makes one fatbin with machine code for every requested architecture. The written library is then
checked: a fatbin with each architecture's ELF, and no CUDA source left to compile at load.

Other GPU kinds: ROCm code objects are linked by TVM with ``ld.lld`` and ROCm's device bitcode;
Metal and OpenCL keep source, as those platforms load it (their drivers compile it).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

from qwen2c.errors import BackendUnavailableError

from ..registry import TargetSpec
from .pipelines import user_error

FATBIN_MAGIC = 0xBA55ED50

_STUB_DRIVER_C = r"""
/* A stand-in for the CUDA driver (libcuda.so.1) on a machine without a GPU: lets TVM's CUDA
 * runtime library load so that TVM compiles CUDA modules while building. Never called then;
 * every entry point fails with CUDA_ERROR_STUB_LIBRARY (34). */
#define STUB 34
int cuModuleLoadData(void **m, const void *img) { return STUB; }
int cuModuleUnload(void *m) { return STUB; }
int cuModuleGetFunction(void **f, void *m, const char *n) { return STUB; }
int cuFuncSetAttribute(void *f, int a, int v) { return STUB; }
int cuLaunchKernelEx(const void *c, void *f, void **p, void **e) { return STUB; }
int cuDeviceGetName(char *n, int len, int d) { return STUB; }
int cuTensorMapEncodeTiled(void) { return STUB; }
int cuGetErrorName(int e, const char **s) { *s = "CUDA_ERROR_STUB_LIBRARY"; return 0; }
int cuGetErrorString(int e, const char **s) { *s = "stand-in CUDA driver (no GPU here)"; return 0; }
"""


def check_device_toolchain(spec: TargetSpec) -> None:
    """Refuse, before anything is built, a GPU target whose device code cannot be compiled here."""
    if spec.device == "cuda":
        if shutil.which("nvcc") is None:
            raise BackendUnavailableError(
                f"target {spec.name}: compiling CUDA device code needs nvcc (CUDA 12.8 or newer) on PATH; none was "
                "found. Install the CUDA toolkit or `pip install nvidia-cuda-nvcc`. Nothing was written."
            )
        if ctypes.util.find_library("cuda") is None and shutil.which("cc") is None and shutil.which("gcc") is None:
            raise BackendUnavailableError(
                f"target {spec.name}: this machine has no CUDA driver, and no C compiler to build the stand-in "
                "driver qwen2c uses to compile device code without a GPU. Install gcc. Nothing was written."
            )
    if spec.device == "rocm":
        from .rocm import check_rocm_toolchain

        check_rocm_toolchain(spec)


@contextlib.contextmanager
def device_codegen(spec: TargetSpec):
    """Around ``relax.build`` for ``spec``: makes TVM compile CUDA device code while building, and
    link ROCm code objects with the toolchain ``rocm.py`` found."""
    if spec.device == "rocm":
        from .rocm import rocm_codegen

        with rocm_codegen(spec):
            yield
        return
    if spec.device != "cuda":
        yield
        return
    import tvm_ffi

    _load_tvm_cuda_runtime()
    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _nvcc_fatbin(spec.arches), override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)


def _load_tvm_cuda_runtime() -> None:
    import tvm_ffi

    from .runtime import load_tvm_cuda_library

    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None:
        return
    if ctypes.util.find_library("cuda") is None:
        ctypes.CDLL(str(_stub_driver()), mode=ctypes.RTLD_GLOBAL)
    try:
        load_tvm_cuda_library()
    except (OSError, RuntimeError) as e:
        raise BackendUnavailableError(
            f"TVM's CUDA runtime library (libtvm_runtime_cuda.so) would not load ({e}); it needs the CUDA 13 "
            "runtime (libcudart.so.13: `pip install nvidia-cuda-runtime`). Nothing was written."
        ) from None
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise BackendUnavailableError("TVM's CUDA runtime loaded but registered no CUDA module; cannot compile "
                                      "device code with this apache-tvm build.")


def _stub_driver() -> Path:
    """The stand-in driver, compiled once per user into qwen2c's cache folder."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen2c"
    digest = hashlib.sha256(_STUB_DRIVER_C.encode()).hexdigest()[:12]
    lib = cache / f"libcuda_stub_{digest}.so"
    if lib.is_file():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    compiler = shutil.which("cc") or shutil.which("gcc")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src, out = Path(tmp) / "stub.c", Path(tmp) / lib.name
        src.write_text(_STUB_DRIVER_C)
        subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(src)],
                       check=True, capture_output=True)
        os.replace(out, lib)
    return lib


def _nvcc_fatbin(arches: tuple[str, ...]) -> Callable[[str], bytes]:
    def compile_cuda(code) -> bytes:
        with tempfile.TemporaryDirectory(prefix="qwen2c-nvcc-") as tmp:
            src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
            src.write_text(str(code))
            cmd = ["nvcc", "-fatbin", "-O3", "-std=c++17", "-o", str(out), str(src)]
            for arch in arches:
                number = arch.removeprefix("sm_")
                cmd += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise user_error(BackendUnavailableError(
                    f"nvcc could not compile the engine's CUDA kernels for {', '.join(arches)}; nothing was "
                    "written:\n" + (done.stderr or done.stdout)[-2000:]
                ))
            return out.read_bytes()

    return compile_cuda


def write_library(executable, spec: TargetSpec, path: Path, linker: str | None,
                  progress: Callable[[str], None]) -> dict[str, Any] | None:
    """Export the compiled library to ``path``; return what device code it holds (for the manifest)."""
    if linker is None:
        executable.export_library(str(path))
    else:
        from tvm.support import cc

        executable.export_library(str(path), fcompile=cc.cross_compiler(linker))
    if spec.device == "cpu":
        return None
    info = describe_device_code(path.read_bytes(), spec)
    progress(f"    device code: {info['format']}" + (f" for {', '.join(info['arches'])}" if info.get("arches") else "")
             + f", {info['bytes'] / 1e6:.2f} MB")
    return info


def describe_device_code(library: bytes, spec: TargetSpec) -> dict[str, Any]:
    """What device code a written library holds; raises when a CUDA library holds no machine code
    for a requested architecture, or still holds source."""
    if spec.device == "rocm":
        from .rocm import describe_code_objects

        return describe_code_objects(library, spec)
    if spec.device != "cuda":
        return {"format": {"metal": "metal source", "opencl": "opencl source"}.get(spec.device, "source"),
                "bytes": len(library)}
    fatbins = list(fatbin_elf_arches(library))
    found = sorted({arch for _, arches in fatbins for arch in arches})
    missing = [a for a in spec.arches if a not in found]
    if not fatbins or missing:
        raise BackendUnavailableError(
            f"the CUDA library holds no machine code for {', '.join(missing or spec.arches)} (found: "
            f"{', '.join(found) or 'none'}); refusing to write an engine that would compile at load."
        )
    if b"__global__" in library:
        raise BackendUnavailableError("the CUDA library still holds CUDA source; refusing to write it.")
    return {"format": "fatbin", "arches": found, "fatbins": len(fatbins),
            "bytes": sum(size for size, _ in fatbins)}


def fatbin_elf_arches(data: bytes):
    """Yield (size, [sm_XX, ...]) for each fatbin in ``data``: the architectures of its CUDA ELFs.

    Fatbin layout: a 16-byte header (magic 0xBA55ED50, version, header size, payload size), then
    entries, each with its own header (kind, version, header size, payload size, ..., sm arch).
    """
    start = 0
    while True:
        at = data.find(struct.pack("<I", FATBIN_MAGIC), start)
        if at < 0 or at + 16 > len(data):
            return
        _, _, header, size = struct.unpack_from("<IHHQ", data, at)
        arches, entry, end = [], at + header, at + header + size
        while entry + 32 <= min(end, len(data)):
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            if entry_header == 0:
                break
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            if kind == 2:  # an ELF (cubin); 1 is PTX
                arches.append(f"sm_{arch}")
            entry += entry_header + payload
        yield size, arches
        start = max(end, at + 16)
