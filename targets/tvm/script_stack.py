"""A cheaper ``inspect.stack()`` for TVMScript's parser.

TVMScript's decorators (``@T.prim_func``, ``@I.ir_module``, ``@R.function``) call ``inspect.stack()``
each time they run, to find the caller's frames. ``inspect.stack()`` reads the source line of every
frame on the stack, and resolving each frame's file walks ``sys.modules``: with torch and transformers
loaded and a deep stack that costs up to 0.3 s per decorated function. Profiled under pytest, 159 s of
a 164 s CUDA pipeline went to importing ``tvm.s_tir.tensor_intrin`` (532 functions, DLight's
tensor-core rule imports it); alone it takes 24-34 s, paid by every ``qwen2c build --target cuda``.

The parser uses only the frame objects, their line numbers and the source line of the third frame
(``utils.is_defined_in_class``, ``utils.resolve_closure_vars``). ``install()`` gives the parser's
entry modules an ``inspect`` whose ``stack`` builds exactly that: source context for the first
``CONTEXT_FRAMES`` frames, the bare frame, file, line and name for the rest. Everything else is
the real ``inspect``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types

PARSER_MODULES = ("tvm.tirx.script.parser.entry", "tvm.script.parser.ir.entry", "tvm.relax.script.parser.entry")
CONTEXT_FRAMES = 3  # is_defined_in_class reads frames[2]'s source line


def stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack(context)`` with source context only for the innermost ``CONTEXT_FRAMES``."""
    frame, out = sys._getframe(1), []
    while frame is not None:
        if len(out) < CONTEXT_FRAMES:
            out.append(inspect.FrameInfo(frame, *inspect.getframeinfo(frame, context)))
        else:
            code = frame.f_code
            out.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None))
        frame = frame.f_back
    return out


class _Inspect(types.ModuleType):
    """The real ``inspect`` but for ``stack``."""

    stack = staticmethod(stack)

    def __getattr__(self, name: str):
        return getattr(inspect, name)


def install() -> None:
    """Give TVMScript's parser entry modules the cheaper ``stack`` (idempotent)."""
    shim = _Inspect("inspect")
    for name in PARSER_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "inspect", None) is inspect:
            module.inspect = shim
