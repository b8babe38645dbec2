"""Kernel schedules and hand-written kernels for the fused ops, per target."""

from qwen2c.targets.tvm import script_stack

# Every kernel here (and DLight's tensor intrinsics) is TVMScript: parse them without the parser's
# walk over every frame's source (targets/tvm/script_stack.py).
script_stack.install()

# Scratch buffers of the CPU kernels are declared in TVM's default ("global") scope, not "local":
# TVM 0.27's LowerTVMBuiltin keeps a constant-size global allocation under 1 KB on the stack (where
# LLVM can keep it in registers) but lowers every "local" one to TVMBackendAllocWorkspace, a call
# and a free in every parallel task. Measured on the decode step's VNNI GEMV (896 x 1152, int4,
# weights in cache, two threads): 13 us with "local" accumulators, 6 us on the stack.
