"""llama.cpp's input: a GGUF file made from the same weights by llama.cpp's own converter.

The converter (``convert_hf_to_gguf.py``, with the ``gguf-py`` it was written against) is not
installed by ``pip install llama-cpp-python``; it ships in that package's source distribution
under ``vendor/llama.cpp/``. It is taken from a llama.cpp source tree named by
``$QWEN2C_LLAMA_CPP_SRC``, or else from the source distribution of the installed llama-cpp-python
version, fetched once with pip and kept under the cache folder. It converts a checkpoint directory
(an engine directory is one: config.json, model.safetensors with transformers' names, and the
tokenizer it insists on) to f32, f16, bf16 or q8_0; 4-bit (q4_0) and llama.cpp's other quantized
types are made from the f32 file with llama.cpp's quantizer (``llama_model_quantize``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..errors import BackendUnavailableError

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZE_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                  "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8, "q6_k": 6, "q5_0": 5, "q4_0": 4, "q4_k_m": 4}
ENV_SOURCE = "QWEN2C_LLAMA_CPP_SRC"


def llama_cpp_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def find_converter(cache: Path) -> Path:
    """The folder holding ``convert_hf_to_gguf.py``, the ``conversion/`` package it imports (its
    per-architecture code) and ``gguf-py/``."""
    import importlib.util

    # The converter imports sentencepiece for Qwen2 too (it tries a SentencePiece vocabulary before the
    # BPE one), so without it every conversion fails with a traceback; say so before trying.
    if importlib.util.find_spec("sentencepiece") is None:
        raise BackendUnavailableError("llama.cpp's converter needs sentencepiece, which is not installed "
                                      "(pip install sentencepiece, or pip install 'qwen2c[bench]').")
    if os.environ.get(ENV_SOURCE):
        folder = Path(os.environ[ENV_SOURCE])
        if not (folder / "convert_hf_to_gguf.py").is_file() or not (folder / "gguf-py").is_dir():
            raise BackendUnavailableError(f"${ENV_SOURCE}={folder}: no convert_hf_to_gguf.py and gguf-py/ there; "
                                          "point it at a llama.cpp source tree.")
        return folder
    version = llama_cpp_version()
    if version is None:
        raise BackendUnavailableError("llama-cpp-python is not installed (pip install 'qwen2c[bench]').")
    folder = cache / f"llama.cpp-converter-{version}"
    if (folder / "convert_hf_to_gguf.py").is_file() and (folder / "conversion").is_dir():
        return folder
    with tempfile.TemporaryDirectory(prefix="qwen2c-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps", "--no-binary",
               ":all:", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise BackendUnavailableError(
                f"llama.cpp's converter ships only in llama-cpp-python's source distribution, and fetching it failed "
                f"({' '.join(cmd)}: {done.stderr.strip()[-400:]}). Set ${ENV_SOURCE} to a llama.cpp source tree.")
        staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=cache))
        with tarfile.open(archives[0]) as tar:
            prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            wanted = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()
                      and (m.name == prefix + "convert_hf_to_gguf.py"
                           or m.name.startswith((prefix + "gguf-py/", prefix + "conversion/")))]
            for m in wanted:
                m.name = m.name[len(prefix):]
            tar.extractall(staging, members=wanted, filter="data")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    return folder


def convert(checkpoint: Path, out: Path, outtype: str, converter: Path, threads: int) -> None:
    """Write ``out`` (GGUF, ``outtype``) from the checkpoint directory with llama.cpp's converter or,
    for the types it does not write, with llama.cpp's quantizer from an f32 file next to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    if outtype in CONVERTER_TYPES:
        env = {**os.environ, "PYTHONPATH": str(converter / "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype", outtype,
               "--outfile", str(partial)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise BackendUnavailableError(f"llama.cpp's converter failed on {checkpoint} ({outtype}): "
                                          f"{done.stderr.strip()[-800:]}")
    elif outtype in QUANTIZE_TYPES:
        import llama_cpp

        source = out.with_name("model-f32.gguf")
        if not source.is_file():
            convert(checkpoint, source, "f32", converter, threads)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, QUANTIZE_TYPES[outtype])
        params.nthread = threads
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
            partial.unlink(missing_ok=True)
            raise BackendUnavailableError(f"llama.cpp's quantizer failed making {outtype} from {source}.")
    else:
        raise BackendUnavailableError(f"llama.cpp type {outtype!r}: choose from "
                                      f"{', '.join([*CONVERTER_TYPES, *QUANTIZE_TYPES])}.")
    partial.rename(out)


def gguf_for(checkpoint: Path, key: str, outtype: str, cache: Path, threads: int) -> tuple[Path, float | None]:
    """The GGUF of ``checkpoint`` in ``outtype``, cached under ``cache/gguf/KEY/``; and the seconds
    converting took (None when it was already there)."""
    import time

    out = cache / "gguf" / key / f"model-{outtype}.gguf"
    if out.is_file():
        return out, None
    start = time.perf_counter()
    convert(checkpoint, out, outtype, find_converter(cache), threads)
    return out, time.perf_counter() - start

