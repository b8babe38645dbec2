"""Load an engine directory and generate with it.

```python
engine = qwen2c.load(DIR)               # verifies the manifest's checksums before opening the library
engine.generate(ids, max_new_tokens=16) # greedy by default
s = engine.session(); s.prefill(ids); s.decode(token)
```

Threads: one Engine serves any number of sessions from any number of threads at once (its
weights are in memory once; each thread runs its own VM over them, ``targets/tvm/runtime.py``).
A Session is one sequence: calls on one session are serialized by its lock, in whatever order
the threads make them.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import engine_dir
from .errors import EngineError

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, directory: str | Path, verify: bool = True, trusted_keys: Iterable | None = None,
                 manifest: dict | None = None):
        """``trusted_keys``: Ed25519 public keys (``signing.public_key_bytes`` forms); when given, an
        engine not signed by one of them is refused before its library is opened. ``manifest``: the
        manifest of an engine being built (its staging folder has none yet)."""
        self.directory = Path(directory)
        if manifest is None:
            manifest = engine_dir.read_manifest(self.directory, verify=False)
            if trusted_keys is not None:
                from .signing import check_signature

                check_signature(self.directory, manifest, trusted_keys)
            if verify:
                engine_dir.verify_files(self.directory, manifest)
        self.manifest = manifest
        self._read_fields()
        self._program = self._open_program()
        self._tokenizer = None

    def _read_fields(self) -> None:
        """The fields the runtime uses, each checked for type (a corrupt manifest is an EngineError;
        their values are checked against the library's fingerprint when it opens)."""
        m = self.manifest
        cfg = (m.get("model") or {}).get("config") if isinstance(m.get("model"), dict) else None
        moe = m.get("moe") or {}
        if not isinstance(cfg, dict) or not isinstance(moe, dict):
            raise EngineError(f"{self.directory}: the manifest's model config is missing; the engine is corrupt.")
        self.vocab_size, self.max_context = cfg.get("vocab_size"), m.get("max_context")
        self.eos_token_id = cfg.get("eos_token_id")
        self.moe_layers = moe.get("layers", [])
        for name, value in (("model.config.vocab_size", self.vocab_size), ("max_context", self.max_context)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EngineError(f"{self.directory}: the manifest's {name} is {value!r}; the engine is corrupt.")
        chunk = m.get("prefill_chunk")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= self.max_context):
            raise EngineError(f"{self.directory}: the manifest's prefill_chunk is {chunk!r} (not a token count within "
                              "the context); the engine is corrupt.")
        if not isinstance(self.moe_layers, list) or not isinstance(m.get("target"), dict) \
                or not isinstance(m["target"].get("device"), str):
            raise EngineError(f"{self.directory}: the manifest's target or MoE layers are malformed; the engine is corrupt.")

    def _open_program(self):
        """The backend the manifest names opens the engine (``targets/backends.py``)."""
        from qwen2c.targets.backends import BACKENDS

        backend = BACKENDS.for_engine(self.directory, self.manifest)
        return backend.load().open_program(self.directory, self.manifest)

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    def session(self) -> "Session":
        return Session(self)

    def generate(self, ids: Sequence[int], max_new_tokens: int = 16, stop_at_eos: bool = False) -> "Generation":
        """Greedy generation: up to ``max_new_tokens`` tokens after ``ids``.

        Stops early at the engine's maximum context (or at EOS with ``stop_at_eos``) and returns
        what it generated; ``.stop_reason`` says why it stopped.
        """
        if isinstance(max_new_tokens, (bool, np.bool_)) or not isinstance(max_new_tokens, (int, np.integer)):
            raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if max_new_tokens == 0:
            self._check_ids(ids, 0)
            return Generation([], "max_new_tokens")
        session = self.session()
        logits = session.prefill(ids)
        out: list[int] = []
        while True:
            token = int(np.argmax(logits))
            out.append(token)
            if len(out) == max_new_tokens:
                return Generation(out, "max_new_tokens")
            if stop_at_eos and token == self.eos_token_id:
                return Generation(out, "eos")
            if session.length >= self.max_context:  # the token is generated; feeding it back would not fit
                return Generation(out, "max_context")
            logits = session.decode(token)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.directory)
        return self._tokenizer

    def _check_ids(self, ids: Iterable[int], already: int) -> np.ndarray:
        try:
            arr = np.asarray(list(ids))
        except TypeError:
            raise ValueError("token ids must be a sequence of integers") from None
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("the prompt is empty: give at least one token id")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got {arr.dtype}")
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.vocab_size})")
        if already + arr.size > self.max_context:
            raise ValueError(
                f"the sequence would be {already + arr.size} tokens; this engine's maximum context is "
                f"{self.max_context} (rebuild with a larger --max-context)"
            )
        return arr.astype(np.int64)


class Generation(list):
    """The generated token ids (a list), and why generation stopped: ``stop_reason`` is
    "max_new_tokens", "eos" or "max_context" (the engine's maximum context was reached)."""

    def __init__(self, tokens: Iterable[int], stop_reason: str):
        super().__init__(tokens)
        self.stop_reason = stop_reason


class Session:
    """One sequence and its KV cache."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cache = engine._program.new_cache()
        self._routing: list = []
        self._lock = threading.Lock()  # one call at a time on this sequence's cache
        self.length = 0

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Append a prompt (or a further chunk of it); return the logits after its last token."""
        with self._lock:
            arr = self.engine._check_ids(ids, self.length)
            logits, self._routing = self.engine._program.forward(self._cache, arr)
            self.length += arr.size
            return logits

    @property
    def routing(self) -> list[np.ndarray]:
        """MoE engines: for each sparse layer (``engine.moe_layers``), the experts the tokens of the
        last prefill/decode call were routed to, [tokens, top_k], highest weight first. Dense: []."""
        # A backend's routing per layer: one array per forward (ONNX Runtime), or the chunks of a
        # chunked prefill (TVM tensors).
        return [np.concatenate([np.asarray(c if isinstance(c, np.ndarray) else c.numpy()) for c in r])
                if isinstance(r, (list, tuple)) else (r if isinstance(r, np.ndarray) else r.numpy())
                for r in self._routing]

    def decode(self, token: int) -> np.ndarray:
        """Append one token; return the logits for the next."""
        if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
            raise ValueError(f"decode takes one integer token id, got {token!r}")
        if self.length == 0:
            raise ValueError("decode before prefill: start the sequence with prefill(prompt_ids)")
        return self.prefill([int(token)])


def load(directory: str | Path, trusted_keys: Iterable | None = None) -> Engine:
    """Open an engine directory, verifying its manifest checksums first and, with ``trusted_keys``
    (Ed25519 public keys: PEM files or text, raw bytes, hex), that one of them signed it; then that
    the compiled library was built for what the manifest and weights file say."""
    return Engine(directory, trusted_keys=trusted_keys)
