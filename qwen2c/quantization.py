"""Weight-only quantization formats: how a weight is stored, quantized at build time, and read back.

A quantized engine stores each matrix of the model (linear layers, the embedding, the vocabulary
projection, MoE experts) as integers plus one scale per group of ``group`` consecutive inputs of an
output row, and its kernels dequantize in registers as they read (``schedules/dequantize.py``);
activations stay in the engine's dtype. Layouts, for a weight ``W[..., N, K]`` (rows are outputs):

- ``int8``: ``q[..., N, K]`` int8 and ``scales[..., N, K / group]`` float16; ``W ~ q * scale``.
- ``int4``: ``q[..., N, K / 2]`` uint8, two values per byte, and ``scales[..., N, K / group]``
  float16; ``W ~ (nibble - 8) * scale``. Within each block of 32 inputs, byte j holds input j in its
  low nibble and input j + 16 in its high one (llama.cpp's Q4_0 order), so a vector of up to 16
  consecutive inputs is one contiguous load of bytes and one shift: the CPU kernel never gathers.

Symmetric scales: int8 takes max|w| / 127 per group, as llama.cpp's Q8_0 does (but rounds with the
scale as stored in float16, where Q8_0 rounds with it before storing). int4 starts from
Q4_0's scale (-m / 8, m the group's value of largest magnitude), then refits the scale by least
squares for the rounded integers, rounds again with it and refits once more: each step lowers the
group's squared error, so it is never worse than Q4_0's rounding at the same bits (measured on
Gaussian weights: 6% less squared error).

What stays in the engine's dtype, and why: 1-D tensors (norms, biases: a few KB), the MoE router and
the shared expert's gate (a wrong rounding there flips which experts run, for no bandwidth: llama.cpp
keeps its router unquantized too), and any matrix whose input width is not a multiple of the group
(named in the manifest). Tied embeddings are one tensor, quantized once: the embedding gather and
the vocabulary projection read the same packed bytes (keeping a float copy for the gather would
add 272 MB to qwen2-0.5b in float16, for a lookup of one row per token).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

SCHEMES = ("none", "int8", "int4")
# Groups of 32 or 64 inputs: llama.cpp's Q8_0/Q4_0 use 32, and the limits on what quantization may cost
# are set against them (tolerances.QUANT_LIMITS). One scale per output row (per-channel int8) had 2.1x
# the squared error of groups of 32 on Gaussian weights of Qwen2-0.5B's MLP shape: not offered.
GROUP_SIZES = (32, 64)
DEFAULT_GROUP = 32
SCALE_DTYPE = "float16"
INT4_BLOCK = 32  # inputs per nibble block (see the module docstring)
# Names of weights never quantized (suffixes of transformers' state-dict names): see the docstring.
KEEP_FLOAT = ("mlp.gate.weight", "shared_expert_gate.weight")
QWEIGHT, SCALES = ".qweight", ".scales"  # suffixes of the stored tensors' names
_CHUNK_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """One quantization scheme: ``int8`` or ``int4``, ``group`` inputs per scale."""

    scheme: str
    group: int

    @property
    def bits(self) -> int:
        return 8 if self.scheme == "int8" else 4

    def refusal(self, name: str, shape: tuple[int, ...]) -> str | None:
        """Why the weight ``name`` stays in float, or None when it is quantized."""
        if len(shape) not in (2, 3):
            return "not a matrix"
        if name.endswith(KEEP_FLOAT):
            return "MoE router or shared-expert gate (routing decisions stay in float)"
        k, g = shape[-1], self.group
        if k % g:
            return f"input width {k} is not a multiple of the group size {g}"
        if self.scheme == "int4" and k % INT4_BLOCK:
            return f"input width {k} is not a multiple of {INT4_BLOCK}"
        return None

    def stored_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        *lead, k = shape
        packed = k if self.bits == 8 else k // 2
        return (*lead, packed), (*lead, k // self.group)

    @property
    def qdtype(self) -> str:
        return "int8" if self.bits == 8 else "uint8"

    def bytes_per_param(self, k: int) -> float:
        return self.bits / 8 + 2 / self.group

    def quantize(self, w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``w[..., N, K]`` (any float dtype) -> (q, scales) as stored. In NumPy: 4x faster than the
        same arithmetic in torch here (measured on a 4864 x 896 matrix, two cores)."""
        *lead, k = w.shape
        g = self.group
        rows = w.detach().reshape(-1, k)
        qs, ds = [], []
        for start in range(0, rows.shape[0], _CHUNK_ROWS):  # bounded scratch for a 151936-row vocabulary
            x = rows[start:start + _CHUNK_ROWS].to(torch.float32).numpy().reshape(-1, k // g, g)
            q, d = (_int8 if self.bits == 8 else _int4)(x)
            q = q.astype(np.int8).reshape(-1, k)
            qs.append(_pack_int4(q) if self.bits == 4 else q)
            ds.append(d.astype(np.float16))
        q, scales = np.concatenate(qs), np.concatenate(ds)
        return q.reshape(*lead, -1), scales.reshape(*lead, k // g)

    def dequantize(self, q: np.ndarray, scales: np.ndarray) -> torch.Tensor:
        """The float32 weights the engine computes with (the reference for kernel tests)."""
        values = np.asarray(q)
        if self.bits == 4:
            values = _unpack_int4(values)
        *lead, k = values.shape
        g = self.group
        s = np.asarray(scales, dtype=np.float32)
        return torch.from_numpy((values.astype(np.float32).reshape(*lead, k // g, g) * s[..., None]).reshape(*lead, k))

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "bits": self.bits, "group_size": self.group,
                "scale_dtype": SCALE_DTYPE, "symmetric": True,
                "layout": ("int8 [.., N, K]" if self.bits == 8 else
                           "uint8 [.., N, K/2]: per 32-input block, byte j = input j (low nibble) | input j+16 "
                           "(high nibble), value = nibble - 8")}


def weight_format(scheme: str | None, group_size: int | str | None = None) -> WeightFormat | None:
    """The format for ``--quantize`` / ``--group-size``; None for unquantized engines."""
    if scheme in (None, "none"):
        if group_size is not None:
            raise ConfigError("--group-size applies to quantized engines only: give --quantize int8 or int4.")
        return None
    if scheme not in SCHEMES:
        raise ConfigError(f"--quantize {scheme!r} must be one of {', '.join(SCHEMES)}.")
    if group_size is None:
        return WeightFormat(scheme, DEFAULT_GROUP)
    try:
        group = int(group_size)
    except (TypeError, ValueError):
        group = -1
    if group not in GROUP_SIZES:
        raise ConfigError(f"--group-size {group_size!r} must be one of {', '.join(map(str, GROUP_SIZES))}.")
    return WeightFormat(scheme, group)


def from_manifest(record: dict[str, Any] | None) -> WeightFormat | None:
    if not record:
        return None
    return WeightFormat(record["scheme"], int(record["group_size"]))


def _int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = _f16(np.abs(x).max(-1) / 127)  # round with the scale that is stored
    return np.clip(np.round(x / _nonzero(d)[..., None]), -127, 127), d


def _int4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0's scale, then alternately the least-squares scale for the integers and the integers for that
    scale: each step can only lower the group's squared error (up to the scale's float16 rounding)."""
    m = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    q = _round4(x, _f16(-m / 8))
    q = _round4(x, _least_squares(x, q))
    return q, _least_squares(x, q)


def _round4(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x / _nonzero(d)[..., None]), -8, 7)


def _least_squares(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    return _f16((x * q).sum(-1) / _nonzero((q * q).sum(-1)))


def _f16(d: np.ndarray) -> np.ndarray:
    """The scale as it will be stored."""
    return d.astype(np.float16).astype(np.float32)


def _nonzero(d: np.ndarray) -> np.ndarray:
    return np.where(d == 0, np.float32(1), d)


def _pack_int4(q: np.ndarray) -> np.ndarray:
    *lead, k = q.shape
    n = (q + 8).astype(np.uint8).reshape(*lead, k // INT4_BLOCK, 2, INT4_BLOCK // 2)
    return (n[..., 0, :] | (n[..., 1, :] << 4)).reshape(*lead, k // 2)


def _unpack_int4(packed: np.ndarray) -> np.ndarray:
    *lead, half = packed.shape
    b = packed.reshape(*lead, half // (INT4_BLOCK // 2), INT4_BLOCK // 2)
    low, high = (b & 15).astype(np.int8) - 8, (b >> 4).astype(np.int8) - 8
    return np.stack([low, high], -2).reshape(*lead, half * 2)


def weight_formats(program, fmt: WeightFormat) -> list[WeightFormat | None]:
    """Per weight parameter of the traced program (in order): ``fmt`` where it is quantized, else None."""
    from qwen2c.graphs.export import param_names

    return [None if fmt.refusal(name, tuple(program.state_dict[f"model.{name}"].shape)) else fmt
            for _, name in param_names(program)]


def quantization_manifest(fmt: WeightFormat, program, formats: list[WeightFormat | None], source,
                          vnni: bool = False) -> dict[str, Any]:
    """The manifest's record: the scheme, what stayed in float and why, bytes per token's weights,
    where the float reference lives (``verify`` measures the engine against it), and whether the
    quantized layers round activations to int8 (``vnni``: ``schedules/cpu_vnni_gemv.py`` for decode
    steps, ``cpu_vnni_gemm.py`` for prompts; parity models it)."""
    from pathlib import Path

    from qwen2c.graphs.export import param_names

    kept, seen, stored = [], set(), 0
    for (_, name), f in zip(param_names(program), formats):
        tensor = program.state_dict[f"model.{name}"]
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        if f is None:
            stored += tensor.numel() * tensor.element_size()
            if tensor.dim() >= 2:
                kept.append({"name": name, "reason": fmt.refusal(name, tuple(tensor.shape))})
        else:
            stored += int(tensor.numel() * f.bytes_per_param(tensor.shape[-1]))
    rounding = None
    if vnni:
        from qwen2c.schedules.cpu_vnni_gemm import LANES
        from qwen2c.schedules.cpu_vnni_gemv import ACT_GROUP, chunk_inputs

        rounding = {"dtype": "int8", "group_size": ACT_GROUP, "scale": "max|x| / 127", "steps": "decode and prompts",
                    "prompts": True,
                    "layers": f"linear layers whose input width is a multiple of {chunk_inputs(fmt.bits)} and "
                              f"output width of {LANES}",
                    "kernel": "VNNI integer dot products (schedules/cpu_vnni_gemv.py, schedules/cpu_vnni_gemm.py)"}
    return {**fmt.to_json(), "kept_float": kept, "weight_bytes": stored, "decode_activations": rounding,
            "float_reference": source.name if source.is_preset else str(Path(source.checkpoint).resolve())}
