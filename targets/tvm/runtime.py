"""Run a compiled TVM engine: the VM, its weights, and one paged KV cache per sequence.

Per token, the work outside compiled code is: two KV-state calls, one VM call, and a copy of the
logits to NumPy. Weights are uploaded once and stay in the engine's memory in their dtype.

Only TVM's runtime is needed here. A process that has not imported TVM yet imports it in
runtime-only mode (``TVM_USE_RUNTIME_LIB=1``), which leaves the 259 MB compiler library unmapped
and works where only the runtime is installed (``qwen2c pack``); a process that already imported
all of TVM (a build) keeps it. So this module uses ``tvm.runtime`` only: ``tvm.relax`` does not
import in runtime-only mode.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from pathlib import Path

from qwen2c.errors import BackendUnavailableError, EngineError
from qwen2c.weights_file import joined

# TVM sizes its worker pool on first use and, by default, to half the logical CPUs (it assumes
# hyper-threading): on a 2-core machine without SMT that is one thread, and half the memory
# bandwidth decode needs (measured: 42 ms vs 20 ms for the 0.5B vocabulary projection).
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

RUNTIME_ONLY_ENV = "TVM_USE_RUNTIME_LIB"

# TVM builds its CPU cache kernels for 16-slot pages (TIRPagedKVCache does not pass a page size to
# them), and qwen2c's CPU attention kernels (schedules/cpu_attention.py, CACHE_PAGE_SIZE) are built
# for the same. Stated here rather than imported: that module needs TVM's compiler.
PAGE_SIZE = 16


def _import_tvm():
    """TVM's runtime alone unless this process already imported TVM, which is then used as is."""
    if "tvm" not in sys.modules:
        previous = os.environ.get(RUNTIME_ONLY_ENV)
        os.environ[RUNTIME_ONLY_ENV] = "1"
        try:
            import tvm
        finally:  # TVM reads it once, at import; child processes should not inherit it from us
            if previous is None:
                del os.environ[RUNTIME_ONLY_ENV]
            else:
                os.environ[RUNTIME_ONLY_ENV] = previous
    import tvm
    import tvm.runtime.vm

    return tvm


tvm = _import_tvm()

import numpy as np  # noqa: E402
from tvm.runtime import ShapeTuple  # noqa: E402
from tvm.runtime.vm import VirtualMachine  # noqa: E402

_add_sequence = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
_begin_forward = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
_end_forward = tvm.get_global_func("vm.builtin.kv_state_end_forward")
_SEQUENCE_IDS = ShapeTuple([0])  # every cache holds one sequence, id 0
_ONE_TOKEN = ShapeTuple([1])

_CPU = tvm.cpu().dlpack_device_type()
_DEVICES = {"cpu": tvm.cpu, "cuda": tvm.cuda, "rocm": tvm.rocm, "metal": tvm.metal, "opencl": tvm.opencl}


def open_device(kind: str):
    """Device 0 of ``kind``, with the runtime support it needs; BackendUnavailableError if absent."""
    if kind == "cuda":
        _load_cuda_runtime()
    device = _DEVICES[kind](0)
    if not device.exist:
        raise BackendUnavailableError(f"this engine is for {kind} and this machine has no {kind.upper()} device.")
    return device


def tvm_library_dir() -> Path:
    return Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent


def load_tvm_cuda_library() -> None:
    """Load ``libtvm_runtime_cuda.so`` beside TVM's runtime (raises tvm_ffi's RuntimeError when it is
    absent, OSError when a library it needs is missing). Used to run engines and to build them."""
    from tvm_ffi.libinfo import load_lib_ctypes

    tvm.base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
        "tvm", "tvm_runtime_cuda", "RTLD_LOCAL", extra_lib_paths=[tvm_library_dir()])


def _load_cuda_runtime() -> None:
    """Load TVM's CUDA runtime library, which registers the CUDA module loader and device API.

    A full ``import tvm`` loads it when it can; runtime-only mode never does. It needs the CUDA
    driver (libcuda.so.1) and the CUDA 13 runtime (libcudart.so.13).
    """
    if tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        return
    lib_dir = tvm_library_dir()
    try:
        load_tvm_cuda_library()
    except RuntimeError:  # tvm_ffi's "cannot find library" (a runtime copied without it)
        raise BackendUnavailableError(
            f"this engine is for cuda, and TVM's CUDA runtime (libtvm_runtime_cuda.so) is not in {lib_dir}."
        ) from None
    except OSError as e:
        missing = re.match(r"(\S+): cannot open shared object file", str(e))
        raise BackendUnavailableError(
            f"this engine is for cuda, and TVM's CUDA runtime ({lib_dir / 'libtvm_runtime_cuda.so'}) could not be "
            f"loaded: {missing.group(1) + ' was not found' if missing else e}. It needs the NVIDIA driver "
            "(libcuda.so.1) and the CUDA 13 runtime (libcudart.so.13, from the CUDA toolkit or pip's "
            "nvidia-cuda-runtime); add the folder holding a missing library to LD_LIBRARY_PATH."
        ) from None


def _shares_memory(tensor, array: np.ndarray) -> bool:
    return tensor.data_ptr() == array.ctypes.data


class TvmProgram:
    """One loaded library and its weights, shared by every session and thread.

    A Relax VirtualMachine keeps its registers per instance, so one instance must not run two calls
    at once: each thread gets its own VM (``_thread_vm``) over the same loaded library and the same
    weight tensors, which compiled code only reads. KV caches belong to sessions.
    """

    def __init__(self, library: Path, device: str, weights: list[np.ndarray], max_context: int,
                 check_fingerprint=None, prefill_chunk: int | None = None,
                 weight_layout: list[list[int]] | None = None):
        self.device = open_device(device)
        self.where = library.parent
        self.library = tvm.runtime.load_module(str(library))
        self.vm = VirtualMachine(self.library, self.device)
        if check_fingerprint is not None:  # before any of the library's code runs on the weights
            check_fingerprint(read_fingerprint(self.vm))
        self.params, self.weights_in_place = self._weights_for_vm(weights, weight_layout)
        self.max_context = max_context
        # Models with sliding-window layers: the cache attends a prefill chunk exactly only up to
        # the window (pipelines/add_kv_cache_creation.py), so longer prompts go in chunks.
        self.prefill_chunk = prefill_chunk or max_context
        self._local = threading.local()
        self._local.functions = _VmFunctions(self.vm)

    def _thread_vm(self) -> "_VmFunctions":
        functions = getattr(self._local, "functions", None)
        if functions is None:
            functions = self._local.functions = _VmFunctions(VirtualMachine(self.library, self.device))
        return functions

    def _weights_for_vm(self, weights: list[np.ndarray], layout: list[list[int]] | None):
        """The VM's weights, and how many of them use the caller's memory in place (no copy).

        Weights the compiler combined (q/k/v, gate/up: pipelines/combine_parallel_linears.py) are
        made by ``transform_params``. When the engine records what it makes (``layout``) and the
        weights file stores each combination end to end, the combination is a view of the file
        and ``transform_params`` is skipped; otherwise it runs here, once, on the device.
        """
        if not self.vm.module.implements_function("transform_params"):
            layout = [[i] for i in range(len(weights))]
        else:
            layout = self._library_layout(layout)
        if layout is not None and not (
                isinstance(layout, list) and all(isinstance(out, list) and out for out in layout)
                and all(type(i) is int and 0 <= i < len(weights) for out in layout for i in out)):
            # The manifest is data: an index outside the parameters must not reach the views below.
            raise EngineError(f"{self.where}: the manifest's weight_layout is malformed (not lists of parameter indices in "
                              f"[0, {len(weights)})); the engine is corrupt.")
        combined = None if layout is None else [joined([weights[i] for i in out]) for out in layout]
        uploaded: dict[int, tvm.runtime.Tensor] = {}  # tied weights arrive as the same array twice
        if combined is not None and all(c is not None for c in combined):
            params = [uploaded.setdefault(id(c), self._to_device(c)) for c in combined]
            return params, sum(_shares_memory(t, c) for t, c in zip(params, combined))
        params = [uploaded.setdefault(id(w), self._to_device(w)) for w in weights]
        return list(self.vm["transform_params"](params)), 0

    def _library_layout(self, claimed):
        """The layout the library was compiled with (None: it records none, so transform_params runs).

        The manifest's copy (``claimed``) is data anyone can edit: it must agree, or the engine is refused.
        """
        data = read_constant(self.vm, WEIGHT_LAYOUT_FUNCTION)
        built = None if data is None else json.loads(data.decode())
        if claimed is not None and claimed != built:
            raise EngineError(f"{self.where}: the manifest's weight_layout disagrees with the layout the compiled library "
                              "was built for; the manifest was edited or the library comes from another build. Refusing "
                              "to run it; rebuild the engine.")
        return built

    def _to_device(self, array: np.ndarray) -> "tvm.runtime.Tensor":
        """``array`` as a TVM tensor: on the CPU, the same memory when aligned as TVM requires."""
        if self.device.dlpack_device_type() == _CPU and array.ctypes.data % 64 == 0 and array.flags.c_contiguous \
                and array.flags.writeable:
            if array.dtype.name == "bfloat16":  # DLPack from NumPy knows no bfloat16: the bits as uint16
                return tvm.runtime.from_dlpack(array.view(np.uint16))._create_view(array.shape, "bfloat16")
            return tvm.runtime.from_dlpack(array)
        return tvm.runtime.tensor(array, self.device)

    def new_cache(self):
        shape = [1, self.max_context, self.max_context, PAGE_SIZE, 0]
        cache = self._thread_vm().create(*(ShapeTuple([v]) for v in shape))
        _add_sequence(cache, 0)
        return cache

    def forward(self, cache, ids: np.ndarray) -> tuple[np.ndarray, list]:
        """Append ``ids`` (int64, [n]) to the sequence, in chunks of at most ``prefill_chunk``.

        Returns the last position's logits and (MoE engines) each sparse layer's routing, still as
        device tensors ([n, top_k] experts per token, one per chunk): copied out only if someone
        asks for them.
        """
        routing: list = []
        for start in range(0, int(ids.shape[0]), self.prefill_chunk):
            logits, chunk_routing = self._forward(cache, ids[start:start + self.prefill_chunk])
            routing = [r + [c] for r, c in zip(routing, chunk_routing)] if routing else [[c] for c in chunk_routing]
        return logits, routing

    def _forward(self, cache, ids: np.ndarray) -> tuple[np.ndarray, list]:
        n = int(ids.shape[0])
        vm = self._thread_vm()
        _begin_forward(cache, _SEQUENCE_IDS, _ONE_TOKEN if n == 1 else ShapeTuple([n]))
        fn = vm.decode if n == 1 else vm.prefill
        out = fn(tvm.runtime.tensor(ids.reshape(1, n), self.device), cache, *self.params)
        _end_forward(cache)
        if isinstance(out, tvm.runtime.Tensor):
            return out.numpy().reshape(-1), []
        return out[0].numpy().reshape(-1), list(out[1:])


class _VmFunctions:
    """One VM and the functions a session calls, looked up once."""

    def __init__(self, vm: VirtualMachine):
        self.vm, self.prefill, self.decode, self.create = vm, vm["prefill"], vm["decode"], vm["create_kv_cache"]


WEIGHT_LAYOUT_FUNCTION = "qwen2c_weight_layout"  # pipelines/record_weight_layout.py
FINGERPRINT_FUNCTION = "qwen2c_fingerprint"  # qwen2c/fingerprint.py; embedded by targets/tvm/fingerprint.py


def read_fingerprint(vm: VirtualMachine) -> bytes | None:
    """The fingerprint the library was compiled with (canonical JSON bytes), or None if it has none."""
    return read_constant(vm, FINGERPRINT_FUNCTION)


def read_constant(vm: VirtualMachine, name: str) -> bytes | None:
    """The bytes the library's constant function ``name`` returns (``fingerprint.add_constant_function``),
    or None if it has no such function. It runs no kernel and reads no input."""
    if not vm.module.implements_function(name):
        return None
    return vm[name]().numpy().tobytes()
