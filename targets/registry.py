"""Targets as data: each is described once, with what a backend needs to know about it.

Adding a CPU or GPU generation is adding a ``TargetSpec`` here, not editing code paths. The name
``llvm`` means "this host's CPU" and resolves to the matching description.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from typing import Any

from qwen2c.errors import Qwen2cError


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    name: str
    backend: str  # which backend lowers to it: "tvm"
    tvm: dict[str, Any]  # a tvm.target.Target config
    device: str  # runtime device kind: "cpu", "cuda", ...
    description: str
    vector_bits: int = 256
    cpu_features: tuple[str, ...] = ()  # /proc/cpuinfo flags the generated code uses
    arch: str = "x86_64"  # the machine the code runs on, as platform.machine() names it
    cross_compiler: str | None = None  # links the library when this machine is another arch

    def tvm_target(self):
        import tvm

        config = dict(self.tvm)
        if self.device == "cpu" and "num-cores" not in config:
            config["num-cores"] = os.cpu_count() or 1
        return tvm.target.Target(config)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "tvm": self.tvm, "device": self.device}


class Registry:
    def __init__(self) -> None:
        self._targets: dict[str, TargetSpec] = {}

    def register(self, spec: TargetSpec) -> None:
        if spec.name in self._targets:
            raise ValueError(f"target {spec.name!r} is registered twice")
        self._targets[spec.name] = spec

    def names(self) -> list[str]:
        return sorted(self._targets) + ["llvm"]

    def resolve(self, name: str) -> TargetSpec:
        if name == "llvm":
            return self._targets[host_target_name()]
        try:
            return self._targets[name]
        except KeyError:
            raise Qwen2cError(
                f"unknown target {name!r}. Known targets: {', '.join(self.names())}. "
                "GPU and other accelerator targets arrive with their backends; 'llvm' builds for this CPU."
            ) from None


TARGETS = Registry()
TARGETS.register(TargetSpec(
    "llvm-avx2", "tvm", {"kind": "llvm", "mcpu": "core-avx2"}, "cpu",
    "x86-64 with AVX2 and FMA (Haswell, Zen and later)", 256, ("avx2", "fma"),
))
TARGETS.register(TargetSpec(
    "llvm-avx512", "tvm", {"kind": "llvm", "mcpu": "skylake-avx512"}, "cpu",
    "x86-64 with AVX-512 (Skylake-SP, Ice Lake, Zen 4 and later)", 512, ("avx512f", "avx2", "fma"),
))
TARGETS.register(TargetSpec(
    "llvm-x86-64", "tvm", {"kind": "llvm", "mcpu": "x86-64"}, "cpu",
    "baseline x86-64 (SSE2 only)", 128, (),
))
TARGETS.register(TargetSpec(
    "llvm-aarch64", "tvm", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, "cpu",
    "64-bit Arm with NEON (Graviton, Ampere, Apple silicon under Linux)", 128, (),
    arch="aarch64", cross_compiler="aarch64-linux-gnu-gcc",
))


def host_target_name() -> str:
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "llvm-aarch64"
    flags = _cpu_flags()
    for name in ("llvm-avx512", "llvm-avx2"):
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

    from qwen2c.errors import BackendUnavailableError

    if spec.device != "cpu" or spec.arch == host_arch():
        return None
    if spec.cross_compiler and shutil.which(spec.cross_compiler):
        return spec.cross_compiler
    raise BackendUnavailableError(
        f"target {spec.name} builds {spec.arch} code, and this machine is {host_arch()}: linking the engine's "
        f"library needs the cross compiler {spec.cross_compiler or '(none known)'}, which is not on PATH. Install "
        f"one (e.g. apt install gcc-aarch64-linux-gnu) or build on an {spec.arch} machine. Nothing was written."
    )


def runs_on_this_host(spec: TargetSpec) -> bool:
    """Whether engines for ``spec`` can execute here (for the build-time parity check)."""
    if spec.device != "cpu":
        return False
    host_arm = platform.machine().lower() in ("aarch64", "arm64")
    if ("aarch64" in spec.tvm.get("mtriple", "")) != host_arm:
        return False
    return set(spec.cpu_features) <= _cpu_flags()
