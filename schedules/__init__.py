"""Kernel schedules and hand-written kernels for the fused ops, per target."""

from qwen2c.targets.tvm import script_stack

# Every kernel here (and DLight's tensor intrinsics) is TVMScript: parse them without the parser's
# walk over every frame's source (targets/tvm/script_stack.py).
script_stack.install()
