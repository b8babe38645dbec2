"""The one table of numerical tolerances, keyed by dtype, used by every parity check.

A value passes when ``max|actual - expected| <= atol + rtol * max|expected|``: logits are compared
as whole vectors, so the error is measured against the vector's scale, not element by element.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def allows(self, max_abs_err: float, ref_scale: float) -> bool:
        return max_abs_err <= self.atol + self.rtol * ref_scale


TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(atol=1e-4, rtol=2e-3),
    "float16": Tolerance(atol=1e-2, rtol=2e-2),
    "bfloat16": Tolerance(atol=5e-2, rtol=5e-2),
}


# Half-precision engines: how much more an engine may err against the float32 reference than
# transformers itself does when run in the same dtype on the same inputs (see parity.py). The
# engine accumulates in float32 where torch's CPU kernels round more often, so it usually errs
# less; the factor absorbs the different order of operations.
HALF_ERROR_FACTOR = 4.0


@dataclasses.dataclass(frozen=True)
class QuantLimit:
    """What a quantized engine may cost, judged next to llama.cpp's format at the same bits (quant_parity.py).

    Passes when its mean KL is at most ``kl_factor`` x llama.cpp's (or under ``kl_floor``, where both
    are too small to compare) and under ``kl_cap``, and its top-1 agreement is at most
    ``top1_margin`` below llama.cpp's.
    """

    kl_factor: float
    kl_floor: float
    kl_cap: float
    top1_margin: float

    def judge(self, ours: dict, llama_cpp: dict, positions: int) -> list[str]:
        failures = []
        allowed = max(self.kl_factor * llama_cpp["kl"], self.kl_floor)
        if ours["kl"] > allowed:
            failures.append(f"KL {ours['kl']:.3e} exceeds {self.kl_factor:g} x llama.cpp's {llama_cpp['kl']:.3e} "
                            f"(floor {self.kl_floor:g})")
        if ours["kl"] > self.kl_cap:
            failures.append(f"KL {ours['kl']:.3e} exceeds the cap {self.kl_cap:g}")
        # Top-1 agreement over n positions is a proportion: two standard errors of it are noise, not cost
        # (random-weight models, whose distributions are nearly flat, agree on ~70% of positions).
        p = llama_cpp["top1"]
        noise = 2 * (p * (1 - p) / max(positions, 1)) ** 0.5
        if ours["top1"] < p - self.top1_margin - noise:
            failures.append(f"top-1 agreement {ours['top1']:.1%} is more than {self.top1_margin:.0%} (+{noise:.1%} "
                            f"sampling noise) below llama.cpp's {p:.1%}")
        return failures

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "text": (
            f"KL <= max({self.kl_factor:g} x llama.cpp's, {self.kl_floor:g}) and <= {self.kl_cap:g}; top-1 >= "
            f"llama.cpp's - {self.top1_margin:.0%} - 2 standard errors of it")}


# The factor leaves room for a different rounding of the same error (our int4 scales are searched,
# Q4_0's are not; group sizes up to 128 have fewer scales than llama.cpp's 32); the caps are where a
# model stops being the same model (0.01 nats is about what 8 bits costs a small model; 0.1 for 4).
QUANT_LIMITS: dict[str, QuantLimit] = {
    "int8": QuantLimit(kl_factor=1.5, kl_floor=1e-4, kl_cap=0.01, top1_margin=0.02),
    "int4": QuantLimit(kl_factor=1.5, kl_floor=1e-3, kl_cap=0.1, top1_margin=0.03),
}


def tolerance_for(dtype: str) -> Tolerance:
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype!r}; known: {sorted(TOLERANCES)}") from None


def tolerance_for_engine(dtype: str, kv_cache_dtype: str | None = None) -> Tolerance:
    """An engine's tolerance: its dtype's, or its KV cache's where the cache holds coarser numbers
    (a float32 engine with a float16 cache rounds every key, value and attention output to float16)."""
    tol = tolerance_for(dtype)
    if kv_cache_dtype is None or kv_cache_dtype == dtype:
        return tol
    cache = tolerance_for(kv_cache_dtype)
    return Tolerance(atol=max(tol.atol, cache.atol), rtol=max(tol.rtol, cache.rtol))


def compare(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float, float]:
    """(max abs error, relative error, scale of the expected values)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    err = float(np.max(np.abs(actual - expected)))
    scale = float(np.max(np.abs(expected)))
    return err, err / max(scale, 1e-30), scale
