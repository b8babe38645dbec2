"""Kernel schedules and hand-written kernels for the fused ops, per target."""
