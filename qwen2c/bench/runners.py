"""The systems a benchmark times, as the worker process (``worker.py``) drives them.

Every runner offers the same two calls: ``start()`` opens a new sequence (an empty KV cache) and
``feed(ids)`` appends tokens and returns the greedy next token, so prefill is ``start(); feed(prompt)``
and a decode step is ``feed([token])``. Each keeps its KV cache its own way (the engine's paged cache,
transformers' DynamicCache or StaticCache, ONNX past/present tensors, llama.cpp's context); the
logits of the last position only are computed where the system allows it, as a server would.

``weight_bytes_per_token`` is what one decode step must read of that system's own weights, as it
stores them: every tensor once, except an input embedding table that is separate from the output
projection (a token reads one row of it).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def weight_bytes_per_token(sizes: dict[str, int], input_embedding: str, output: str) -> int:
    """Bytes a decode step reads of weights stored as ``sizes`` (tensor name -> bytes). A tensor is
    the input embedding or the output projection when its name is the one given or ends with
    "." and it (exporters add prefixes)."""
    def named(name: str, key: str) -> bool:
        return name == key or name.endswith("." + key)

    total = sum(sizes.values())
    if any(named(name, output) for name in sizes):
        total -= sum(n for name, n in sizes.items() if named(name, input_embedding))
    return total


class EngineRunner:
    """A qwen2c engine directory, opened with TVM's runtime only (as a user loads it)."""

    def __init__(self, spec: dict[str, Any]):
        import qwen2c

        self.engine = qwen2c.load(spec["path"])
        self.max_context = self.engine.max_context

    def describe(self) -> dict[str, Any]:
        from safetensors import safe_open

        with safe_open(str(self.engine.directory / "model.safetensors"), "np") as f:
            sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        nbytes = {k: int(np.prod(s)) * _SAFETENSORS_BYTES[dtypes[k]] for k, s in sizes.items()}
        return {"weight_bytes_per_token": weight_bytes_per_token(nbytes, "embed_tokens.weight", "lm_head.weight"),
                "dtype": self.engine.manifest["dtype"], "build_s": self.engine.manifest.get("build_seconds")}

    def start(self) -> None:
        self.session = self.engine.session()

    def feed(self, ids: list[int]) -> int:
        return int(np.argmax(self.session.prefill(ids)))


_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class EagerRunner:
    """transformers, eager mode, with a DynamicCache; the checkpoint loaded in ``dtype``."""

    def __init__(self, spec: dict[str, Any]):
        import torch

        from ..checkpoint import load_reference, resolve_model

        torch.set_num_threads(spec["threads"])
        _, self.model = load_reference(resolve_model(spec["path"]), spec["dtype"], copies=1.2)
        self.max_context = spec.get("max_context") or self.model.config.max_position_embeddings
        self.forward = self.model
        self.dtype = spec["dtype"]

    def describe(self) -> dict[str, Any]:
        nbytes = {n: p.numel() * p.element_size() for n, p in self.model.named_parameters()}  # tied: listed once
        return {"weight_bytes_per_token": weight_bytes_per_token(nbytes, "embed_tokens.weight", "lm_head.weight"),
                "dtype": self.dtype}

    def start(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    def feed(self, ids: list[int]) -> int:
        import torch

        from ..parity import cache_kwargs

        with torch.no_grad():
            out = self.forward(input_ids=torch.tensor([ids]), **cache_kwargs(self.model, self.cache), use_cache=True,
                               logits_to_keep=1)
        return int(out.logits[0, -1].argmax())


class CompiledRunner(EagerRunner):
    """``torch.compile`` of the transformers forward with a StaticCache (the layout torch.compile is
    meant for: fixed shapes, so decode compiles once). A static cache attends over its whole length
    at every step; it is sized to the longest context this run asks for. Each new input length
    compiles once, during the worker's warm-up of that shape, never inside a timed run. Mode
    "default": on this CPU "max-autotune-no-cudagraphs" compiled a decode step that took 130 ms on
    a model whose step takes 1 ms in "default" mode (measured 2026-11-29)."""

    shape_warmup = True

    def __init__(self, spec: dict[str, Any]):
        import torch

        super().__init__(spec)
        self.cache_len = spec["cache_len"]
        self.max_context = self.cache_len
        self.forward = torch.compile(self.model, mode=spec.get("mode", "default"), dynamic=False)
        self.cache = None

    def start(self) -> None:
        from transformers import StaticCache

        if self.cache is None:
            self.cache = StaticCache(config=self.model.config, max_cache_len=self.cache_len)
        else:
            self.cache.reset()
        self.length = 0

    def feed(self, ids: list[int]) -> int:
        import torch

        from ..parity import cache_kwargs

        positions = torch.arange(self.length, self.length + len(ids))
        with torch.no_grad():
            out = self.forward(input_ids=torch.tensor([ids]), **cache_kwargs(self.model, self.cache),
                               cache_position=positions, use_cache=True, logits_to_keep=1)
        self.length += len(ids)
        return int(out.logits[0, -1].argmax())


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python, on a GGUF made by llama.cpp's own converter."""

    def __init__(self, spec: dict[str, Any]):
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.max_context = spec["max_context"]
        self.llm = llama_cpp.Llama(model_path=spec["path"], n_ctx=self.max_context, n_threads=spec["threads"],
                                   n_threads_batch=spec["threads"], n_batch=512, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.path, self.dtype = spec["path"], spec["dtype"]

    def describe(self) -> dict[str, Any]:
        from gguf import GGUFReader

        sizes = {t.name: int(t.n_bytes) for t in GGUFReader(self.path).tensors}
        return {"weight_bytes_per_token": weight_bytes_per_token(sizes, "token_embd.weight", "output.weight"),
                "dtype": self.dtype}

    def start(self) -> None:
        self.llm.reset()

    def feed(self, ids: list[int]) -> int:
        self.llm.eval(ids)
        logits = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.n_vocab,))))


def make_runner(spec: dict[str, Any]):
    from .onnx_peer import OnnxRunner

    kinds = {"qwen2c": EngineRunner, "eager": EagerRunner, "compile": CompiledRunner, "onnxruntime": OnnxRunner,
             "llama.cpp": LlamaCppRunner}
    return kinds[spec["kind"]](spec)


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (VmHWM: unlike ru_maxrss, it is not
    carried over from the parent across fork and exec)."""
    return _status_kib("VmHWM") * 1024


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _status_kib(field: str) -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
