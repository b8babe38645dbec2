"""``qwen2c targets``: what this machine can do for each registered target.

Each verdict comes from the checks ``qwen2c build`` makes before compiling (the code generator
TVM registered, the target's own refusal, the cross linker or device toolchain) and from whether
this machine has the device, so the list and a build never disagree:

    build and run   code is emitted and linked here, and its engines run here (parity is checked)
    build           code is emitted and linked here; its engines run on another machine
    neither         the reason names what is missing and how to get it
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import json
import textwrap

from .errors import BackendUnavailableError

BUILD_AND_RUN, BUILD, NEITHER = "build and run", "build", "neither"


@dataclasses.dataclass(frozen=True)
class Support:
    name: str
    device: str
    description: str
    verdict: str
    reason: str | None  # why not "build and run"
    host: bool  # what `--target llvm` resolves to here


def target_support() -> list[Support]:
    """Every registered target, with its verdict on this machine."""
    from qwen2c.targets.registry import TARGETS, host_target_name

    host = host_target_name()
    return [_support(spec, spec.name == host) for spec in TARGETS.all()]


def _support(spec, host: bool) -> Support:
    reason = _build_problem(spec)
    if reason is not None:
        verdict = NEITHER
    else:
        reason = _run_problem(spec)
        verdict = BUILD if reason else BUILD_AND_RUN
    return Support(spec.name, spec.device, spec.description, verdict, reason, host)


def _build_problem(spec) -> str | None:
    """Why code for ``spec`` cannot be emitted and linked here, or None."""
    import tvm

    from qwen2c.targets.registry import linker_for
    from qwen2c.targets.tvm.device_code import check_device_toolchain

    kind = spec.tvm["kind"]
    if tvm.get_global_func(f"target.build.{kind}", allow_missing=True) is None:
        return spec.cannot_build or f"this apache-tvm wheel has no {kind} code generator (target.build.{kind} is missing)."
    if spec.cannot_build:
        return spec.cannot_build
    try:
        linker_for(spec)
        check_device_toolchain(spec)
    except BackendUnavailableError as e:
        # The build's own refusal, less the sentence meant for a refused build.
        return str(e).removesuffix(" Nothing was written.")
    return None


def _run_problem(spec) -> str | None:
    """Why engines for ``spec`` cannot run here, or None."""
    import tvm

    from qwen2c.targets.registry import _cpu_flags, host_arch, runs_on_this_host

    if spec.device == "cpu":
        if runs_on_this_host(spec):
            return None
        if spec.arch != host_arch():
            return f"{spec.arch} code; this machine is {host_arch()}."
        return f"this CPU lacks {', '.join(sorted(set(spec.cpu_features) - _cpu_flags()))}."
    if spec.device == "cuda" and ctypes.util.find_library("cuda") is None:
        return "no NVIDIA driver here (libcuda.so.1)."
    if spec.device != "cuda" and tvm.get_global_func(f"device_api.{spec.device}", allow_missing=True) is None:
        return f"this apache-tvm wheel has no {spec.device} runtime (device_api.{spec.device}); its engines run elsewhere."
    from qwen2c.targets.tvm.runtime import open_device

    try:
        open_device(spec.device)
    except BackendUnavailableError as e:
        return str(e)
    return None


def to_json(support: list[Support]) -> str:
    return json.dumps({"targets": [dataclasses.asdict(s) for s in support]}, indent=2)


def format_support(support: list[Support], width: int = 110) -> str:
    """A table: target, verdict, device, and why not "build and run" (wrapped under its column)."""
    names = [s.name + (" (llvm)" if s.host else "") for s in support]
    name_w, verdict_w = max(map(len, names + ["target"])), max(len(BUILD_AND_RUN), len("verdict"))
    device_w = max(len(s.device) for s in support)
    indent = " " * (name_w + verdict_w + device_w + 6)
    lines = [f"{'target':<{name_w}}  {'verdict':<{verdict_w}}  {'device':<{device_w}}  reason"]
    for name, s in zip(names, support):
        row = f"{name:<{name_w}}  {s.verdict:<{verdict_w}}  {s.device:<{device_w}}  "
        reason = textwrap.wrap(s.reason or "", max(width - len(indent), 40)) or [""]
        lines.append((row + reason[0]).rstrip())
        lines += [indent + more for more in reason[1:]]
    lines.append("(llvm): what --target llvm builds for on this machine.")
    return "\n".join(lines)

