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


def tolerance_for(dtype: str) -> Tolerance:
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype!r}; known: {sorted(TOLERANCES)}") from None


def compare(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float, float]:
    """(max abs error, relative error, scale of the expected values)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    err = float(np.max(np.abs(actual - expected)))
    scale = float(np.max(np.abs(expected)))
    return err, err / max(scale, 1e-30), scale
