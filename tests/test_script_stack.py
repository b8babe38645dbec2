"""The cheaper ``inspect.stack`` given to TVMScript's parser (``targets/tvm/script_stack.py``): the same
frames, files, lines and names as ``inspect.stack``, source context where the parser reads it, and
the parser still resolving closure variables and class-scoped functions through it."""

import inspect

from tvm.script import tirx as T

import qwen2c.schedules  # noqa: F401  (installs it)
from qwen2c.targets.tvm import script_stack


def _both():
    return inspect.stack(), script_stack.stack()


def test_the_stack_has_the_same_frames_and_context_where_the_parser_reads_it():
    full, cheap = (lambda: _both())()
    assert len(full) == len(cheap)
    for i, (a, b) in enumerate(zip(full, cheap)):
        assert (a.frame, a.filename, a.lineno, a.function) == (b.frame, b.filename, b.lineno, b.function)
        if i == 0:  # _both's own line differs by position only: the call site of each
            continue
        if i < script_stack.CONTEXT_FRAMES:
            assert a.code_context == b.code_context
        else:
            assert b.code_context is None


def test_the_parser_uses_it_and_still_resolves_closure_variables():
    from tvm.tirx.script.parser import entry

    assert entry.inspect.stack is script_stack.stack

    def make(n: int):
        @T.prim_func(private=True)
        def fill(a: T.Buffer((n,), "float32")):
            for i in range(n):
                a[i] = T.float32(n)

        return fill

    script = make(7).script()
    assert "T.Buffer((7,), \"float32\")" in script and "a[i] = T.float32(7.0)" in script
