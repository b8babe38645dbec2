"""Run a compiled TVM engine: the VM, its weights, and one paged KV cache per sequence.

Per token, the work outside compiled code is: two KV-state calls, one VM call, and a copy of the
logits to NumPy. Weights are uploaded once and stay in the engine's memory in their dtype.
"""

from __future__ import annotations

import os
from pathlib import Path

# TVM sizes its worker pool on first use and, by default, to half the logical CPUs (it assumes
# hyper-threading): on a 2-core machine without SMT that is one thread, and half the memory
# bandwidth decode needs (measured: 42 ms vs 20 ms for the 0.5B vocabulary projection).
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.runtime import ShapeTuple  # noqa: E402

from qwen2c.schedules.cpu_attention import CACHE_PAGE_SIZE as PAGE_SIZE  # noqa: E402

_add_sequence = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
_begin_forward = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
_end_forward = tvm.get_global_func("vm.builtin.kv_state_end_forward")


def _device(kind: str):
    return {"cpu": tvm.cpu, "cuda": tvm.cuda, "rocm": tvm.rocm, "metal": tvm.metal, "opencl": tvm.opencl}[kind](0)


class TvmProgram:
    def __init__(self, library: Path, device: str, weights: list[np.ndarray], max_context: int):
        self.device = _device(device)
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), self.device)
        uploaded: dict[int, tvm.runtime.Tensor] = {}
        # Tied weights arrive as the same array twice; upload it once.
        self.params = [uploaded.setdefault(id(w), tvm.runtime.tensor(w, self.device)) for w in weights]
        self.max_context = max_context
        self._prefill = self.vm["prefill"]
        self._decode = self.vm["decode"]
        self._create = self.vm["create_kv_cache"]

    def new_cache(self):
        shape = [1, self.max_context, self.max_context, PAGE_SIZE, 0]
        cache = self._create(*(ShapeTuple([v]) for v in shape))
        _add_sequence(cache, 0)
        return cache

    def forward(self, cache, ids: np.ndarray) -> tuple[np.ndarray, list]:
        """Append ``ids`` (int64, [n]) to the sequence.

        Returns the last position's logits and (MoE engines) each sparse layer's routing, still as
        device tensors ([n, top_k] experts per token): copied out only if someone asks for them.
        """
        n = int(ids.shape[0])
        _begin_forward(cache, ShapeTuple([0]), ShapeTuple([n]))
        fn = self._decode if n == 1 else self._prefill
        out = fn(tvm.runtime.tensor(ids.reshape(1, n), self.device), cache, *self.params)
        _end_forward(cache)
        if isinstance(out, tvm.runtime.Tensor):
            return out.numpy().reshape(-1), []
        return out[0].numpy().reshape(-1), list(out[1:])
