"""Backends as plug-ins: each lives in ``targets/<name>/backend.py`` and registers here by name.

A backend module provides, as module-level functions (see ``Backend`` for the contract):

- ``prepare(spec, dtype, options)``: refuse, before the model is loaded, what it cannot build here
  (a missing package or toolchain, a dtype it has no kernels for); raises a ``Qwen2cError``.
- ``lower(program, config, spec, dtype, max_context, options, progress) -> object``: turn the
  pass-rewritten ``torch.export`` program into what it will write (compiled, in memory).
- ``write(lowered, staging, progress) -> dict``: write its files into the engine directory being
  staged; return the manifest fields it owns (including ``versions`` of what built it).
- ``runs_here(spec) -> bool``: whether its engines for ``spec`` execute on this machine (parity at
  build time).
- ``open_program(directory, manifest) -> program``: open an engine for ``prefill``/``decode``; the
  program has ``new_cache()`` and ``forward(cache, ids) -> (last logits, routing)``.

The engine directory's common files (manifest, the weights as a transformers checkpoint, config,
tokenizer) are written by ``qwen2c.builder``; a backend writes only its own. Modules are imported
when first used, so loading a TVM engine never imports ONNX, and the reverse.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from qwen2c.errors import EngineError, Qwen2cError


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    module: str  # the module implementing the functions above
    main_file: str  # the file an engine of this backend cannot be without (the manifest must list it)
    description: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


class BackendRegistry:
    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}

    def register(self, backend: Backend) -> None:
        if backend.name in self._backends:
            raise ValueError(f"backend {backend.name!r} is registered twice")
        self._backends[backend.name] = backend

    def names(self) -> list[str]:
        return sorted(self._backends)

    def get(self, name: str) -> Backend:
        try:
            return self._backends[name]
        except KeyError:
            raise Qwen2cError(f"unknown backend {name!r}. Known backends: {', '.join(self.names())}.") from None

    def for_engine(self, directory, manifest: dict) -> Backend:
        """The backend an engine's manifest names; EngineError naming it when this qwen2c has none such."""
        name = manifest.get("backend")
        if not isinstance(name, str) or name not in self._backends:
            raise EngineError(
                f"{directory}: the manifest names backend {name!r}, which this qwen2c does not have "
                f"(it runs {', '.join(self.names())}); rebuild the engine or use the qwen2c that built it."
            )
        return self._backends[name]


BACKENDS = BackendRegistry()
BACKENDS.register(Backend(
    "tvm", "qwen2c.targets.tvm.backend", "model.so",
    "TVM Relax: qwen2c's own kernels on CPUs, DLight and qwen2c's kernels on GPUs, TVM's paged KV cache",
))
BACKENDS.register(Backend(
    "onnxruntime", "qwen2c.targets.onnxruntime.backend", "model.onnx",
    "ONNX Runtime (CPU execution provider; CUDA with onnxruntime-gpu) on the fused ONNX export",
))
BACKENDS.register(Backend(
    "tensorrt", "qwen2c.targets.tensorrt.backend", "model.plan",
    "a serialized TensorRT engine built from the fused ONNX export (needs TensorRT's Python API)",
))
