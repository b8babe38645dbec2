"""Load an engine directory and generate with it.

```python
engine = qwen2c.load(DIR)               # verifies the manifest's checksums before opening the library
engine.generate(ids, max_new_tokens=16) # greedy by default
s = engine.session(); s.prefill(ids); s.decode(token)
```
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import engine_dir

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, directory: str | Path, verify: bool = True):
        self.directory = Path(directory)
        self.manifest = engine_dir.read_manifest(self.directory, verify=verify)
        cfg = self.manifest["model"]["config"]
        self.vocab_size: int = cfg["vocab_size"]
        self.max_context: int = self.manifest["max_context"]
        self.eos_token_id = cfg.get("eos_token_id")
        moe = self.manifest.get("moe") or {}
        self.moe_layers: list[int] = moe.get("layers", [])
        self._program = self._open_program()
        self._tokenizer = None

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

    def generate(self, ids: Sequence[int], max_new_tokens: int = 16, stop_at_eos: bool = False) -> list[int]:
        """Greedy generation: the ``max_new_tokens`` tokens after ``ids``."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if max_new_tokens == 0:
            self._check_ids(ids, 0)
            return []
        session = self.session()
        logits = session.prefill(ids)
        out: list[int] = []
        while True:
            token = int(np.argmax(logits))
            out.append(token)
            if len(out) == max_new_tokens or (stop_at_eos and token == self.eos_token_id):
                return out
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


class Session:
    """One sequence and its KV cache."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cache = engine._program.new_cache()
        self._routing: list = []
        self.length = 0

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Append a prompt (or a further chunk of it); return the logits after its last token."""
        arr = self.engine._check_ids(ids, self.length)
        logits, self._routing = self.engine._program.forward(self._cache, arr)
        self.length += arr.size
        return logits

    @property
    def routing(self) -> list[np.ndarray]:
        """MoE engines: for each sparse layer (``engine.moe_layers``), the experts the tokens of the
        last prefill/decode call were routed to, [tokens, top_k], highest weight first. Dense: []."""
        return [r if isinstance(r, np.ndarray) else r.numpy() for r in self._routing]

    def decode(self, token: int) -> np.ndarray:
        """Append one token; return the logits for the next."""
        if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
            raise ValueError(f"decode takes one integer token id, got {token!r}")
        if self.length == 0:
            raise ValueError("decode before prefill: start the sequence with prefill(prompt_ids)")
        return self.prefill([int(token)])


def load(directory: str | Path) -> Engine:
    """Open an engine directory, verifying its manifest checksums first."""
    return Engine(directory)
