"""Targets as data: each is described once, with what a backend needs to know about it.

Adding a CPU or GPU generation is adding a ``TargetSpec`` here, not editing code paths. The name
``llvm`` means "this host's CPU" and resolves to the matching description. GPU targets name the
architectures their device code is compiled for (``arches``; ``--arch`` picks others, several at
once for CUDA, which go into one fatbin).
"""

from __future__ import annotations

import dataclasses
import os
import platform
from typing import Any

from qwen2c.errors import BackendUnavailableError, Qwen2cError


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    name: str
    backend: str  # the backend that lowers to it by default: "tvm" (targets/backends.py)
    tvm: dict[str, Any]  # a tvm.target.Target config
    device: str  # runtime device kind: "cpu", "cuda", ...
    description: str
    vector_bits: int = 256
    cpu_features: tuple[str, ...] = ()  # /proc/cpuinfo flags the generated code uses
    arch: str = "x86_64"  # the machine the code runs on, as platform.machine() names it
    cross_compiler: str | None = None  # links the library when this machine is another arch
    arches: tuple[str, ...] = ()  # GPU: device architectures compiled for (sm_90, gfx942, ...)
    known_arches: tuple[str, ...] = ()  # GPU: the ones --arch accepts
    multi_arch: bool = False  # GPU: one build serves several arches (CUDA: one fatbin); else one per build
    default_dtype: str = "float32"  # when --dtype is not given (GPU: the checkpoint's)
    cannot_build: str | None = None  # why TVM here cannot emit code for it (refused up front)
    other_backends: tuple[str, ...] = ()  # further backends --backend may pick for it

    def with_backend(self, backend: str | None) -> "TargetSpec":
        """This target lowered by ``backend`` (``--backend``); refuses one that does not serve it."""
        if not backend or backend == self.backend:
            return self
        from .backends import BACKENDS

        BACKENDS.get(backend)  # an unknown name: the known ones
        if backend not in self.other_backends:
            allowed = ", ".join((self.backend, *self.other_backends))
            raise Qwen2cError(f"--backend {backend}: target {self.name} is built by {allowed}.")
        return dataclasses.replace(self, backend=backend, cannot_build=None)

    def tvm_target(self):
        import tvm

        config = dict(self.tvm)
        if self.device == "cpu" and "num-cores" not in config:
            config["num-cores"] = os.cpu_count() or 1
        if self.arches:
            # Code is generated once, for the oldest architecture asked for; each arch then gets its
            # own machine code from that source (CUDA: one fatbin).
            config[_ARCH_KEY.get(self.device, "arch")] = min(self.arches, key=_arch_number)
        if self.device != "cpu":
            return tvm.target.Target(config, host=_host_config())
        return tvm.target.Target(config)

    def with_arches(self, arches: str | None) -> "TargetSpec":
        """This target for ``--arch`` (comma-separated); refuses an unknown architecture by name."""
        if not arches:
            return self
        if not self.known_arches:
            raise Qwen2cError(f"--arch is for GPU targets; {self.name} is {self.description}.")
        wanted = tuple(dict.fromkeys(a.strip() for a in arches.split(",") if a.strip()))
        unknown = [a for a in wanted if a not in self.known_arches]
        if unknown or not wanted:
            raise Qwen2cError(
                f"--arch {arches!r}: {', '.join(unknown) or 'nothing'} is not an architecture of {self.name}; "
                f"choose from {', '.join(self.known_arches)}"
                + (" (several at once, comma-separated)." if self.multi_arch else ".")
            )
        if len(wanted) > 1 and not self.multi_arch:
            raise Qwen2cError(
                f"--arch {arches!r}: a {self.name} build is for one architecture (TVM compiles its device code for a "
                f"single processor, and that code runs on no other); build once per architecture, e.g. --arch {wanted[0]}."
            )
        return dataclasses.replace(self, arches=wanted)

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "backend": self.backend, "tvm": self.tvm, "device": self.device}
        if self.arches:
            out["arches"] = list(self.arches)
        return out


_ARCH_KEY = {"cuda": "arch", "rocm": "mcpu", "metal": "arch", "opencl": "arch"}


def _arch_number(arch: str) -> int:
    digits = "".join(c for c in arch if c.isdigit())
    return int(digits) if digits else 0


def _host_config() -> dict[str, Any]:
    return {"kind": "llvm", "mcpu": "x86-64"} if host_arch() == "x86_64" else {"kind": "llvm"}


class Registry:
    def __init__(self) -> None:
        self._targets: dict[str, TargetSpec] = {}

    def register(self, spec: TargetSpec) -> None:
        if spec.name in self._targets:
            raise ValueError(f"target {spec.name!r} is registered twice")
        self._targets[spec.name] = spec

    def names(self) -> list[str]:
        return sorted(self._targets) + ["llvm"]

    def all(self) -> list[TargetSpec]:
        return [self._targets[n] for n in sorted(self._targets)]

    def resolve(self, name: str, arch: str | None = None, backend: str | None = None) -> TargetSpec:
        if name == "llvm":
            return self._targets[host_target_name()].with_arches(arch).with_backend(backend)
        try:
            spec = self._targets[name]
        except KeyError:
            raise Qwen2cError(
                f"unknown target {name!r}. Known targets: {', '.join(self.names())} "
                "('llvm' builds for this CPU; `qwen2c targets` says what each can do here)."
            ) from None
        spec = spec.with_backend(backend)
        if spec.cannot_build:
            raise BackendUnavailableError(f"target {name}: {spec.cannot_build} Nothing was built.")
        return spec.with_arches(arch)


TARGETS = Registry()
# ONNX Runtime's CPU execution provider runs the ONNX export on any CPU (its kernels pick the ISA at
# run time), so every CPU target offers it.
_CPU_BACKENDS = ("onnxruntime",)
TARGETS.register(TargetSpec(
    "llvm-avx2", "tvm", {"kind": "llvm", "mcpu": "core-avx2"}, "cpu",
    "x86-64 with AVX2 and FMA (Haswell, Zen and later)", 256, ("avx2", "fma"),
    other_backends=_CPU_BACKENDS,
))
TARGETS.register(TargetSpec(
    "llvm-avx512", "tvm", {"kind": "llvm", "mcpu": "skylake-avx512"}, "cpu",
    "x86-64 with AVX-512 (Skylake-SP, Ice Lake, Zen 4 and later)", 512, ("avx512f", "avx2", "fma"),
    other_backends=_CPU_BACKENDS,
))
TARGETS.register(TargetSpec(
    "llvm-avx512-vnni", "tvm", {"kind": "llvm", "mcpu": "cascadelake"}, "cpu",
    "x86-64 with AVX-512 and VNNI int8 dot products (Cascade Lake, Ice Lake, Sapphire Rapids, Zen 4 and later): "
    "quantized decode steps use them", 512, ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma"),
    other_backends=_CPU_BACKENDS,
))
TARGETS.register(TargetSpec(
    "llvm-x86-64", "tvm", {"kind": "llvm", "mcpu": "x86-64"}, "cpu",
    "baseline x86-64 (SSE2 only)", 128, (),
    other_backends=_CPU_BACKENDS,
))
TARGETS.register(TargetSpec(
    "llvm-aarch64", "tvm", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, "cpu",
    "64-bit Arm with NEON (Graviton, Ampere, Apple silicon under Linux)", 128, (),
    arch="aarch64", cross_compiler="aarch64-linux-gnu-gcc", other_backends=_CPU_BACKENDS,
))


CUDA_ARCHES = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")
TARGETS.register(TargetSpec(
    "cuda", "tvm", {"kind": "cuda", "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
                    "thread_warp_size": 32}, "cuda",
    "NVIDIA GPUs (Turing sm_75 to Hopper sm_90); device code compiled here with nvcc into a fatbin",
    arches=("sm_90",), known_arches=CUDA_ARCHES, multi_arch=True, default_dtype="checkpoint",
    other_backends=("onnxruntime", "tensorrt"),
))
TARGETS.register(TargetSpec(
    "rocm", "tvm", {"kind": "rocm"}, "rocm",
    "AMD Instinct GPUs (gfx90a MI200, gfx942 MI300), one architecture per build; code objects (v6) linked here "
    "with ld.lld 19+ and ROCm's device bitcode",
    arches=("gfx942",), known_arches=("gfx90a", "gfx942"), default_dtype="checkpoint",
))
TARGETS.register(TargetSpec(
    "metal", "tvm", {"kind": "metal"}, "metal",
    "Apple GPUs (Metal Shading Language source, compiled by the driver when the engine loads)",
    default_dtype="checkpoint",
))
TARGETS.register(TargetSpec(
    "opencl", "tvm", {"kind": "opencl"}, "opencl",
    "OpenCL GPUs (OpenCL C source, compiled by the driver when the engine loads)",
    default_dtype="checkpoint",
))
TARGETS.register(TargetSpec(
    "vulkan", "tvm", {"kind": "vulkan"}, "vulkan", "Vulkan GPUs (SPIR-V)",
    cannot_build="the apache-tvm wheel installed here has no SPIR-V code generator (target.build.vulkan is "
                 "missing); build TVM with USE_VULKAN=ON to target Vulkan.",
))
TARGETS.register(TargetSpec(
    "webgpu", "tvm", {"kind": "webgpu"}, "webgpu", "WebGPU (WGSL)",
    cannot_build="TVM's WebGPU code generator has no 64-bit integers, and the engine takes its token ids as int64 "
                 "(the kernels that cast them to int32 fail: \"CodeGenWebGPU: do not support i64\"); a WebGPU "
                 "engine would also need TVM's WebAssembly/JavaScript runtime, which qwen2c does not package.",
))


def host_target_name() -> str:
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "llvm-aarch64"
    flags = _cpu_flags()
    for name in ("llvm-avx512-vnni", "llvm-avx512", "llvm-avx2"):
        if set(TARGETS._targets[name].cpu_features) <= flags:
            return name
    return "llvm-x86-64"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_arch() -> str:
    machine = platform.machine().lower()
    return "aarch64" if machine in ("aarch64", "arm64") else machine


def linker_for(spec: TargetSpec) -> str | None:
    """The cross compiler that links ``spec``'s library here, or None when the host's own will do.

    Raises BackendUnavailableError, before anything is built, when a cross compiler is needed and
    is not on PATH.
    """
    import shutil

    if spec.device != "cpu" or spec.arch == host_arch():
        return None
    if spec.cross_compiler and shutil.which(spec.cross_compiler):
        return spec.cross_compiler
    raise BackendUnavailableError(
        f"target {spec.name} builds {spec.arch} code, and this machine is {host_arch()}: linking the engine's "
        f"library needs the cross compiler {spec.cross_compiler or '(none known)'}, which is not on PATH. Install "
        f"one (e.g. apt install gcc-aarch64-linux-gnu) or build on an {spec.arch} machine. Nothing was written."
    )


def _gpu_present(kind: str) -> bool:
    """A real device of ``kind`` here. (A stand-in CUDA driver loaded to compile device code, see
    targets/tvm/device_code.py, reports no device.)"""
    import ctypes.util

    if kind == "cuda" and ctypes.util.find_library("cuda") is None:
        return False
    try:
        import tvm

        return bool(tvm.runtime.device(kind, 0).exist)
    except Exception:  # noqa: BLE001  (no runtime for that kind in this TVM build)
        return False


def runs_on_this_host(spec: TargetSpec) -> bool:
    """Whether engines for ``spec`` can execute here (for the build-time parity check)."""
    if spec.device != "cpu":
        return _gpu_present(spec.device)
    host_arm = platform.machine().lower() in ("aarch64", "arm64")
    if ("aarch64" in spec.tvm.get("mtriple", "")) != host_arm:
        return False
    return set(spec.cpu_features) <= _cpu_flags()
