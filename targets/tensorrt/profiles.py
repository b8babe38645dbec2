"""The optimization profiles a TensorRT engine is built with: the shapes prefill and decode take.

TensorRT plans kernels per profile, for shapes between a profile's min and max and tuned for its
``opt``. qwen2c's graph serves two very different calls, so the engine gets one profile for each:

- prefill: ``input_ids`` [1, 1..max_context] tuned for a 128-token prompt (or the whole context
  when shorter), with a past of 0..max_context-1 (a prompt may arrive in chunks) tuned for none;
- decode: one token, after a past of 1..max_context-1 tuned for half the context.

Pure data: built and tested without TensorRT.
"""

from __future__ import annotations

import dataclasses

PREFILL_OPT_TOKENS = 128


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)

    def to_json(self) -> dict:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


def optimization_profiles(io: dict, max_context: int) -> list[Profile]:
    """``io``: the export's ``io_manifest()`` (input names, kv heads, head dim)."""
    if max_context < 2:
        raise ValueError(f"max_context must be at least 2, got {max_context}")
    kv, dim = io["kv_heads"], io["head_dim"]
    pasts = io["inputs"][1:]

    def past(lo: int, opt: int, hi: int) -> tuple:
        return ((1, kv, lo, dim), (1, kv, opt, dim), (1, kv, hi, dim))

    prompt = min(PREFILL_OPT_TOKENS, max_context)
    prefill = {"input_ids": ((1, 1), (1, prompt), (1, max_context)), **{n: past(0, 0, max_context - 1) for n in pasts}}
    decode = {"input_ids": ((1, 1), (1, 1), (1, 1)),
              **{n: past(1, max(1, max_context // 2), max_context - 1) for n in pasts}}
    return [Profile("prefill", prefill), Profile("decode", decode)]
