"""Refuse, before allocating, a model that will not fit in this machine's memory."""

from __future__ import annotations

import os

from .errors import MemoryBudgetError

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(what: str, params: int, dtype: str, copies: float, overhead: int = GIB, hint: str = "") -> None:
    """Raise MemoryBudgetError if ``copies`` x the weights (plus overhead) exceed free memory."""
    weights = params * DTYPE_BYTES[dtype]
    need = int(weights * copies) + overhead
    have = available_bytes()
    if need > have:
        raise MemoryBudgetError(
            f"{what} has {params / 1e9:.2f}B parameters: {weights / GIB:.1f} GiB of {dtype} weights, "
            f"and this step needs about {need / GIB:.1f} GiB of memory, but only {have / GIB:.1f} GiB "
            "is available. Nothing was allocated. Use a smaller preset "
            f"or a machine with more memory.{(' ' + hint) if hint else ''}"
        )
