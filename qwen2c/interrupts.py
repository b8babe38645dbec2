"""Ctrl-C during a build: always a clean stop, never a half-published engine.

Python runs a SIGINT handler only between bytecodes of the main thread. During a build much of
the time is spent inside TVM's C++ (passes, LLVM), which calls back into qwen2c's Python: a
KeyboardInterrupt raised in such a callback comes out of TVM as a RuntimeError, and a callback
that catches exceptions (a schedule rule that declines) can swallow it, so the build would carry
on and publish. So the handler here also records the interrupt: the build checks the record after
every step (``checkpoint``), turns whatever exception the interrupt caused into a
KeyboardInterrupt (``interrupt_guard``), and publishes with interrupts deferred, undoing the
publish if one arrived meanwhile.

Interrupts are also deferred (recorded, raised when the block ends) while heavy modules are
imported (``deferred``): a KeyboardInterrupt inside a C++ extension's initialisation (torch, TVM)
was seen to abort the process (SIGABRT) instead of raising. Only the first Ctrl-C raises; later
ones are recorded, so the cleanup after the first is not itself interrupted.

A KeyboardInterrupt raised while Python runs a finaliser (an object's ``__del__``, a weakref or gc
callback) cannot propagate: Python prints it as "Exception ignored in ..." with a traceback and
drops it. Such an interrupt is caught by ``sys.unraisablehook`` here, printed as nothing, and
delivered again (``_thread.interrupt_main`` from a helper thread), so it raises in the main thread
once the finaliser has returned, where the build stops cleanly.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading
import time

REDELIVER_AFTER_S = 0.005

# Process-wide, as signal handlers are: whether a Ctrl-C has raised already, how many blocks defer
# interrupts, and whether one arrived while they did.
# ``exc`` is the KeyboardInterrupt the handler raised last, so the unraisable hook knows its own.
_state = {"raised": False, "deferring": 0, "pending": False, "exc": None}
_guards: list["InterruptGuard"] = []


def _handler(signum=None, frame=None):
    """SIGINT handler: record the interrupt; raise KeyboardInterrupt the first time, unless deferring."""
    for guard in _guards:
        guard.requested = True
    if _state["deferring"]:
        _state["pending"] = True
    elif not _state["raised"]:
        _state["raised"] = True
        _state["exc"] = exc = KeyboardInterrupt()
        raise exc


def _unraisable(hook_args, previous) -> None:
    """The handler's KeyboardInterrupt, dropped because it was raised inside a finaliser: raise it
    again where it can propagate (the handler runs anew at the next bytecode of the main thread)."""
    if hook_args.exc_value is not None and hook_args.exc_value is _state["exc"]:
        _state["exc"] = None
        _state["raised"] = False
        # From another thread, a moment later: called here, the main thread would run the handler
        # at once, still inside the finaliser. Should the redelivered one land in a finaliser
        # again, it comes back here and is redelivered again.
        try:
            _thread.start_new_thread(_redeliver, ())
        except RuntimeError:  # the interpreter is shutting down: there is nothing left to interrupt
            pass
        return
    previous(hook_args)


def _redeliver() -> None:
    time.sleep(REDELIVER_AFTER_S)
    _thread.interrupt_main(signal.SIGINT)


def _install_unraisable_hook() -> None:
    """Chain ``_unraisable`` in front of whatever hook is installed (once)."""
    if getattr(sys.unraisablehook, "qwen2c_interrupts", False):
        return
    previous = sys.unraisablehook

    def hook(hook_args):
        _unraisable(hook_args, previous)

    hook.qwen2c_interrupts = True
    sys.unraisablehook = hook


def install_cli_handler() -> None:
    _install_unraisable_hook()
    signal.signal(signal.SIGINT, _handler)


@contextlib.contextmanager
def deferred():
    """Interrupts inside are recorded; one that arrived raises KeyboardInterrupt when the block ends."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    if not _state["deferring"] and _state["pending"]:
        _state["pending"] = False
        if not _state["raised"]:
            _state["raised"] = True
            raise KeyboardInterrupt


class InterruptGuard:
    def __init__(self):
        self.requested = False

    def checkpoint(self) -> None:
        """Raise KeyboardInterrupt if one arrived since the guard was installed."""
        if self.requested:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        """Interrupts inside only set ``requested``; the caller checks it (no raise on leaving)."""
        _state["deferring"] += 1
        try:
            yield
        finally:
            _state["deferring"] -= 1
            _state["pending"] = False


@contextlib.contextmanager
def interrupt_guard():
    """Record interrupts for the block (and, in the main thread, handle SIGINT with ``_handler``;
    elsewhere the guard is inert, since Python delivers signals to the main thread). Any exception
    leaving the block after an interrupt arrived becomes KeyboardInterrupt."""
    guard = InterruptGuard()
    installed = threading.current_thread() is threading.main_thread()
    if installed:
        _state["raised"] = False
        _install_unraisable_hook()
        previous = signal.signal(signal.SIGINT, _handler)
    _guards.append(guard)
    try:
        yield guard
    except BaseException as e:
        if guard.requested and not isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    finally:
        _guards.remove(guard)
        if installed:
            signal.signal(signal.SIGINT, previous)
