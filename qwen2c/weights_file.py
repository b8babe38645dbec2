"""The engine's weights file: written so it can be mapped and used in place, and mapped at load.

The file is an ordinary safetensors file (transformers and ``safetensors`` read it), laid out for
loading without copies:

* every tensor starts 64 bytes into a page-aligned mapping when sizes allow (TVM accepts foreign
  memory through DLPack only at 64-byte alignment, and its kernels assume it): the header is padded
  with spaces, which the format allows, and tensors whose byte size is a multiple of 64 come first;
* tensors the engine uses concatenated along their first axis (``groups``: q/k/v, gate/up, from
  ``transform_params``; see targets/tvm/pipelines/record_weight_layout.py) are stored end to end, in
  that order, so the concatenation is already in the file.

``map_weights`` maps the file copy-on-write (``MAP_PRIVATE``): pages come from the page cache, shared
with every other process mapping the file; nothing is copied, and pages are mapped as first used. Copy-on-write rather than
read-only because DLPack cannot mark memory read-only, and NumPy refuses to export read-only arrays;
nothing writes to weights, and if something did, only its private copy of that page would change.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from .engine_dir import _safetensors_header
from .errors import EngineError

ALIGNMENT = 64

# safetensors dtype -> NumPy dtype name (bfloat16 is ml_dtypes', which TVM's runtime depends on).
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
           "U8": "uint8", "BOOL": "bool"}
_SAFETENSORS_DTYPE = {v: k for k, v in _DTYPES.items()}


def write_aligned(tensors: dict[str, np.ndarray], path: Path, groups: list[list[str]] = (),
                  metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (NumPy arrays, any order) as safetensors, each group end to end, aligned."""
    runs = [list(g) for g in groups if len(g) > 1 and len(set(g)) == len(g)]
    seen = {name for run in runs for name in run}
    if len(seen) != sum(len(r) for r in runs):  # a tensor in two groups: store it once, alone
        runs, seen = [], set()
    runs += [[name] for name in tensors if name not in seen]
    # Runs whose size keeps the next one aligned first; the rest (odd sizes) at the end.
    runs.sort(key=lambda run: sum(tensors[n].nbytes for n in run) % ALIGNMENT != 0)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    order = [name for run in runs for name in run]
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": _SAFETENSORS_DTYPE[t.dtype.name], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGNMENT)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            f.write(np.ascontiguousarray(tensors[name]).view(np.uint8).data)


def map_weights(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as an array over one copy-on-write mapping of it."""
    path = Path(path)
    try:
        header = _safetensors_header(path)
        with open(path, "rb") as f:
            start = 8 + struct.unpack("<Q", f.read(8))[0]
            # Not MAP_POPULATE: on a private writable mapping Linux populates by write faults, which
            # copies every page (measured: 2.6 s and 2 GB of anonymous memory for qwen2-0.5b).
            mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        raise EngineError(f"{path}: unreadable weights ({e}).") from None
    if hasattr(mmap, "MADV_WILLNEED"):  # read ahead in large requests: the whole file will be used
        mapping.madvise(mmap.MADV_WILLNEED)
    arrays = {}
    for name, entry in header.items():
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise EngineError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, which qwen2c does not load.")
        if dtype == "bfloat16":
            import ml_dtypes  # noqa: F401  (registers NumPy's bfloat16)
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        array = np.frombuffer(mapping, dtype=np.uint8, count=end - begin, offset=start + begin)
        try:
            arrays[name] = array.view(dtype).reshape(shape)
        except ValueError:
            raise EngineError(f"{path}: tensor {name!r} has {end - begin} bytes, not a {dtype} {list(shape)}.") from None
    return arrays


def joined(parts: list[np.ndarray]) -> np.ndarray | None:
    """``np.concatenate(parts)`` as a view, when the parts lie end to end in one buffer; else None."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] or not p.flags.c_contiguous for p in parts):
        return None
    address = first.ctypes.data
    for p in parts:
        if p.ctypes.data != address:
            return None
        address += p.nbytes
    # A view reaching past ``first`` into the same buffer (which ``first`` keeps alive).
    rows = sum(p.shape[0] for p in parts)
    return np.lib.stride_tricks.as_strided(first, shape=(rows, *first.shape[1:]), strides=first.strides, writeable=True)
