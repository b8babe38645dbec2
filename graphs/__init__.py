"""From transformers to a rewritten ExportedProgram: export, the fused ops, the passes."""

from . import ops  # noqa: F401  (registers qwen2c::* custom ops)
