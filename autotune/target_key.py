"""What a tuning record is valid for: the target's code generation and the versions that made it.

Two builds may share a record only when their kernels compile to the same code: the same target
description (LLVM CPU and its features, or the GPU architectures), and the same qwen2c and TVM (a
new TVM lowers a schedule differently; a new qwen2c may have rewritten the kernel, which the
record's ``structure`` also catches). ``match`` is a digest of exactly those fields; ``about``
holds what is useful to read but must not decide (the CPU's model name, its core count).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def target_key(spec) -> dict[str, Any]:
    import tvm

    from qwen2c import __version__

    config = {k: v for k, v in spec.tvm.items() if k != "num-cores"}
    fields = {"target": spec.name, "tvm_target": config, "arches": list(spec.arches),
              "cpu_features": list(spec.cpu_features), "vector_bits": spec.vector_bits,
              "versions": {"qwen2c": __version__, "tvm": tvm.__version__}}
    return {**fields, "match": digest(fields), "about": {"cpu": _cpu_model(), "cores": os.cpu_count()}}


def digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
