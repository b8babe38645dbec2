"""Loading an engine needs TVM's runtime only: a fresh process never maps TVM's compiler library, and
a CUDA engine where CUDA is missing fails with what is missing."""

import ctypes.util
import json
import shutil
import subprocess
import sys

import pytest

import qwen2c
from qwen2c.targets.tvm.runtime import PAGE_SIZE

PROMPT = [5, 77, 300, 2]

# Runs in a fresh interpreter: qwen2c.load there is the process's first TVM import.
LOAD_AND_GENERATE = """
import json, os, sys
import qwen2c
try:
    tokens = qwen2c.load(sys.argv[1]).generate(json.loads(sys.argv[2]), max_new_tokens=8)
except qwen2c.Qwen2cError as e:
    tokens = f"{type(e).__name__}: {e}"
import tvm
print(json.dumps({
    "tokens": tokens,
    "runtime_only": tvm._RUNTIME_ONLY,
    "mapped": sorted({line.split()[-1] for line in open("/proc/self/maps") if "libtvm" in line}),
    "env_left": os.environ.get("TVM_USE_RUNTIME_LIB"),
}))
"""


def load_in_fresh_process(engine, preload: str = "") -> dict:
    out = subprocess.run([sys.executable, "-c", preload + LOAD_AND_GENERATE, str(engine), json.dumps(PROMPT)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def as_cuda_engine(tmp_path, tiny_engine):
    """The CPU engine relabelled for CUDA: the runtime looks for CUDA before it opens the library."""
    copy = tmp_path / "cuda"
    shutil.copytree(tiny_engine, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"]["device"] = "cuda"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_fresh_process_loads_with_tvm_runtime_only_and_same_tokens(tiny_engine):
    here = qwen2c.load(tiny_engine).generate(PROMPT, max_new_tokens=8)
    there = load_in_fresh_process(tiny_engine)
    assert there["tokens"] == here
    assert there["runtime_only"] is True
    assert any(path.endswith("/libtvm_runtime.so") for path in there["mapped"])
    assert not any("libtvm_compiler" in path for path in there["mapped"]), there["mapped"]
    assert there["env_left"] is None  # the switch is not passed on to child processes


def test_page_size_matches_the_cpu_attention_kernels():
    from qwen2c.schedules.cpu_attention import CACHE_PAGE_SIZE

    assert PAGE_SIZE == CACHE_PAGE_SIZE


@pytest.mark.skipif(ctypes.util.find_library("cuda") is not None, reason="this machine has a CUDA driver")
def test_cuda_engine_without_driver_names_the_missing_library(tmp_path, tiny_engine):
    result = load_in_fresh_process(as_cuda_engine(tmp_path, tiny_engine))
    assert result["tokens"].startswith("BackendUnavailableError")
    assert "libcuda.so.1 was not found" in result["tokens"] and "LD_LIBRARY_PATH" in result["tokens"]


@pytest.mark.skipif(ctypes.util.find_library("cuda") is not None, reason="this machine has a CUDA driver")
def test_cuda_engine_without_device_says_so(tmp_path, tiny_engine):
    from qwen2c.targets.tvm.device_code import _stub_driver

    # The stand-in driver the CUDA build uses: TVM's CUDA runtime loads, and finds no device.
    preload = f"import ctypes; ctypes.CDLL({str(_stub_driver())!r}, mode=ctypes.RTLD_GLOBAL)\n"
    result = load_in_fresh_process(as_cuda_engine(tmp_path, tiny_engine), preload)
    assert result["tokens"] == (
        "BackendUnavailableError: this engine is for cuda and this machine has no CUDA device."
    )
