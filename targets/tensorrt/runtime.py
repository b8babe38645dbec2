"""Run a TensorRT engine: two execution contexts (prefill and decode profiles), the KV cache in torch
CUDA tensors passed from one call's present outputs to the next call's past inputs.

Never executed here (no TensorRT in this workplace); written against TensorRT 10's documented
``Runtime.deserialize_cuda_engine``, ``IExecutionContext.set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


class TrtProgram:
    def __init__(self, plan: Path, io: dict[str, Any], dtype: str):
        import tensorrt as trt
        import torch

        self._torch = torch
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine")
        self.stream = torch.cuda.Stream()
        self.contexts = []
        for index in range(2):  # profile 0: prefill, 1: decode (profiles.py)
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.contexts.append(context)
        self.input_names, self.output_names = io["inputs"], io["outputs"]
        self.routing_outputs = io["routing_outputs"]
        self._past_shape = (1, io["kv_heads"], 0, io["head_dim"])
        self._dtype = getattr(torch, _TORCH_DTYPES[dtype])

    def new_cache(self) -> list:
        return [self._torch.zeros(self._past_shape, dtype=self._dtype, device="cuda") for _ in self.input_names[1:]]

    def forward(self, cache: list, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        torch = self._torch
        n = int(ids.shape[0])
        context = self.contexts[1 if n == 1 and cache[0].shape[2] > 0 else 0]
        inputs = [torch.from_numpy(ids.reshape(1, n)).to("cuda"), *cache]
        for name, tensor in zip(self.input_names, inputs):
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self.output_names:
            shape = tuple(context.get_tensor_shape(name))
            dtype = torch.int64 if name.startswith("routing") else torch.float32 if name == "logits" else self._dtype
            out = torch.empty(shape, dtype=dtype, device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine")
        self.stream.synchronize()
        routed = 1 + self.routing_outputs
        cache[:] = outputs[routed:]
        logits = outputs[0].cpu().numpy().reshape(-1)
        return logits, [o.cpu().numpy() for o in outputs[1:routed]]
