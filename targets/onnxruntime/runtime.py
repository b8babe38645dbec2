"""Run an ONNX Runtime engine: one session, the KV cache as ONNX Runtime values kept between calls.

Each call binds the previous call's ``present.*`` outputs as the next ``past_key_values.*`` inputs
through an I/O binding, so the cache never goes through NumPy (on CUDA it stays on the GPU); only
the last logits (and MoE routing) are copied out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qwen2c.errors import BackendUnavailableError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_ORT_DEVICE = {"cpu": "cpu", "cuda": "cuda"}
_ONNX_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16}  # onnx.TensorProto's element types


def provider_available(device: str) -> bool:
    return PROVIDERS.get(device) in ort.get_available_providers()


def thread_count() -> int:
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0))


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    # Same thread count as the TVM engines (targets/tvm/runtime.py): every core this process may use,
    # unless TVM_NUM_THREADS or OMP_NUM_THREADS says fewer, as TVM's thread pool reads them (the
    # benchmark's workers set both, so a sweep's thread knob reaches ONNX Runtime engines too).
    options.intra_op_num_threads = thread_count()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initializers and the like stay quiet
    return options


class _Cache:
    __slots__ = ("values",)

    def __init__(self, values: list):
        self.values = values


class OrtProgram:
    def __init__(self, model: Path, device: str, io: dict[str, Any], dtype: str):
        if not provider_available(device):
            raise BackendUnavailableError(
                f"this engine runs on ONNX Runtime's {PROVIDERS.get(device, device)}, which the installed onnxruntime "
                f"({ort.__version__}) does not have (it has {', '.join(ort.get_available_providers())})"
                + ("; install onnxruntime-gpu." if device == "cuda" else ".")
            )
        self.device = _ORT_DEVICE[device]
        self.session = ort.InferenceSession(str(model), session_options(), providers=[PROVIDERS[device]])
        self.input_names: list[str] = io["inputs"]
        self.output_names: list[str] = io["outputs"]
        self.routing_outputs: int = io["routing_outputs"]
        self._past_shape = (1, io["kv_heads"], 0, io["head_dim"])
        self._dtype = dtype

    def new_cache(self) -> _Cache:
        # By shape and ONNX element type: ONNX Runtime takes no bfloat16 NumPy arrays (ml_dtypes).
        element = _ONNX_TYPES[self._dtype]
        values = [ort.OrtValue.ortvalue_from_shape_and_type(self._past_shape, element, self.device, 0)
                  for _ in self.input_names[1:]]
        return _Cache(values)

    def forward(self, cache: _Cache, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Append ``ids`` (int64, [n]); return the last position's logits and (MoE) the routing."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids.reshape(1, -1)))
        for name, value in zip(self.input_names[1:], cache.values):
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        routed = 1 + self.routing_outputs
        cache.values = outputs[routed:]
        logits = outputs[0].numpy().reshape(-1)  # float32 in every engine (targets/onnx/export.py)
        return logits, [o.numpy() for o in outputs[1:routed]]
