"""ONNX Runtime as a peer: the plain ``torch.onnx.export(dynamo=True)`` of the transformers model
with its KV cache as inputs and outputs, run by ONNX Runtime's CPU execution provider.

"Plain": the export is transformers' own forward, wrapped only so the cache crosses the graph
boundary as tensors (``past_keys``/``past_values`` [layers, 1, kv_heads, past, head_dim] in,
``present_*`` out, the last position's logits); no ORT fusions or contrib ops are applied by hand,
though ORT applies its own graph optimisations at load (ORT_ENABLE_ALL, its default).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"


def _with_cache(model):
    import torch
    from transformers import DynamicCache

    from ..parity import cache_kwargs

    layers = model.config.num_hidden_layers

    class WithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, past_keys, past_values):
            cache = DynamicCache(config=model.config)
            for i in range(layers):
                cache.update(past_keys[i], past_values[i], i)
            past = past_keys.shape[3]
            positions = torch.arange(past, past + input_ids.shape[1]).unsqueeze(0)
            out = self.model(input_ids=input_ids, **cache_kwargs(model, cache), position_ids=positions, use_cache=True,
                             logits_to_keep=1)
            cache = out.past_key_values
            keys = torch.stack([cache.layers[i].keys for i in range(layers)])
            values = torch.stack([cache.layers[i].values for i in range(layers)])
            return out.logits[:, -1], keys, values

    return WithCache().eval()


def export_onnx(source: str, out_dir: Path, max_context: int) -> float:
    """Export the float32 transformers model of ``source`` (checkpoint dir or preset) to
    ``out_dir/model.onnx`` (weights as external data); return the seconds it took."""
    import torch

    from ..checkpoint import load_reference, resolve_model

    start = time.perf_counter()
    _, model = load_reference(resolve_model(source), "float32", copies=2.5)
    cfg = model.config
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    wrapped = _with_cache(model)
    past = torch.zeros(cfg.num_hidden_layers, 1, kv, 3, hd)
    seq = torch.export.Dim("seq", min=1, max=max_context)
    past_len = torch.export.Dim("past", min=0, max=max_context)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapped, (torch.tensor([[1, 2, 3, 4, 5]]), past, past.clone()), dynamo=True, verbose=False,
            input_names=["input_ids", "past_keys", "past_values"], output_names=["logits", "present_keys", "present_values"],
            dynamic_shapes={"input_ids": {1: seq}, "past_keys": {3: past_len}, "past_values": {3: past_len}})
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / (ONNX_FILE + ".partial")
    program.save(str(staging), external_data=True)
    staging.rename(out_dir / ONNX_FILE)  # the data file keeps the name the graph refers to
    return time.perf_counter() - start


class OnnxRunner:
    def __init__(self, spec: dict[str, Any]):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(spec["path"], options, providers=["CPUExecutionProvider"])
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        layers, _, kv, _, hd = shapes["past_keys"]
        self.empty = np.zeros((layers, 1, kv, 0, hd), np.float32)
        self.max_context = spec["max_context"]
        self.path = spec["path"]

    def describe(self) -> dict[str, Any]:
        import onnx

        from .runners import weight_bytes_per_token

        model = onnx.load(self.path, load_external_data=False)
        sizes = {t.name: _initializer_bytes(t) for t in model.graph.initializer}
        return {"weight_bytes_per_token": weight_bytes_per_token(sizes, "embed_tokens.weight", "lm_head.weight"),
                "dtype": "float32"}

    def start(self) -> None:
        self.keys, self.values = self.empty, self.empty

    def feed(self, ids: list[int]) -> int:
        logits, self.keys, self.values = self.session.run(
            None, {"input_ids": np.asarray([ids], np.int64), "past_keys": self.keys, "past_values": self.values})
        return int(np.argmax(logits))


def _initializer_bytes(tensor) -> int:
    from onnx import helper

    n = int(np.prod(tensor.dims)) if tensor.dims else 1
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def export_in_child(source: str, out_dir: Path, max_context: int) -> float:
    """``export_onnx`` in a child process, so the exporter's memory (a copy of the model, its traced
    graph) is returned to the system before the benchmark's workers start. Raises Qwen2cError with
    the exporter's last words when it fails."""
    import subprocess
    import sys

    from ..errors import Qwen2cError

    done = subprocess.run([sys.executable, "-m", "qwen2c.bench.onnx_peer", source, str(out_dir), str(max_context)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise Qwen2cError(f"the ONNX export of {source} failed: {done.stderr.strip()[-800:]}")
    return float(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import sys

    print(export_onnx(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])))
