"""Write an ONNX model into an engine directory, and check one before a runtime opens it.

ONNX files are protobuf messages, limited to 2 GB: a larger model keeps its weights in one external
data file beside it (``model.onnx.data``). An ONNX file names its external files itself, so a file
from elsewhere could point a runtime at any path on the machine: every location is checked, before
any runtime sees the model, to be a plain file name inside the engine directory, within that file's
size (the engine's manifest checksums the file itself).
"""

from __future__ import annotations

from pathlib import Path

from qwen2c.errors import EngineError

# Weights beyond this stay out of the protobuf (2 GiB, less room for the graph itself).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
# Tensors at least this big go to the external file (small ones, shapes and constants, stay inline).
INLINE_LIMIT = 1024


def initializer_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save(model, directory: Path, name: str, threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[str]:
    """Write ``model`` (onnx_ir) as ``directory/name``, its weights in ``name.data`` when over
    ``threshold`` bytes; run ``onnx.checker`` on what was written. Returns the file names written."""
    import onnx
    import onnx_ir as ir

    path = directory / name
    if initializer_bytes(model) > threshold:
        data = f"{name}.data"
        ir.save(model, path, external_data=data, size_threshold_bytes=INLINE_LIMIT)
        written = [name, data]
    else:
        ir.save(model, path)
        written = [name]
    check_locations(path)
    # The path, not a loaded proto: the checker then reads external data itself, and models over
    # 2 GB can be checked at all. ONNX Runtime's contrib ops have no ONNX schema; the checker
    # checks everything around them.
    onnx.checker.check_model(str(path))
    return written


def check_locations(path: Path) -> list[str]:
    """The external data files ``path`` uses, after checking each reference stays inside its folder."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001  (protobuf raises its own DecodeError)
        raise EngineError(f"{path}: not a readable ONNX model ({e}).") from None
    folder = path.parent.resolve()
    used: dict[str, int] = {}
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        location = info.location
        target = (folder / location).resolve()
        if Path(location).is_absolute() or Path(location).name != location or target.parent != folder:
            raise EngineError(
                f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, outside the engine directory; "
                "qwen2c opens only external data files beside the model. The file was not opened."
            )
        if not target.is_file():
            raise EngineError(f"{path}: tensor {tensor.name!r} needs {location}, which is missing.")
        end = (info.offset or 0) + (info.length or 0)
        size = used.setdefault(location, target.stat().st_size)
        if end > size:
            raise EngineError(f"{path}: tensor {tensor.name!r} reads past the end of {location} ({end} > {size} bytes).")
    return sorted(used)
