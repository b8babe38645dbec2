"""Ctrl-C during a build: always a clean stop, never a half-published engine.

Python runs a SIGINT handler only between bytecodes of the main thread. During a build much of
the time is spent inside TVM's C++ (passes, LLVM), which calls back into qwen2c's Python: a
KeyboardInterrupt raised in such a callback comes out of TVM as a RuntimeError, and a callback
that catches exceptions (a schedule rule that declines) can swallow it, so the build would carry
on and publish. So the handler here also records the interrupt: the build checks the record after
every step (``checkpoint``), turns whatever exception the interrupt caused into a
KeyboardInterrupt (``interrupt_guard``), and publishes with interrupts deferred, undoing the
publish if one arrived meanwhile. Only the first Ctrl-C raises; later ones are recorded, so the
cleanup after the first is not itself interrupted.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_seen = [False]  # a Ctrl-C has raised already (process-wide: the CLI's handler and a guard's)


def raise_once(signum=None, frame=None):
    """SIGINT handler: KeyboardInterrupt the first time, nothing after."""
    if not _seen[0]:
        _seen[0] = True
        raise KeyboardInterrupt


def install_cli_handler() -> None:
    signal.signal(signal.SIGINT, raise_once)


class InterruptGuard:
    def __init__(self):
        self.requested = False
        self._deferring = 0

    def _handler(self, signum, frame):
        self.requested = True
        if not self._deferring:
            raise_once()

    def checkpoint(self) -> None:
        """Raise KeyboardInterrupt if one arrived since the guard was installed."""
        if self.requested:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        """Interrupts inside only set ``requested``; the caller checks it."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1


@contextlib.contextmanager
def interrupt_guard():
    """Install the guard's SIGINT handler for the block (main thread only; elsewhere the guard is
    inert, since Python delivers signals to the main thread). Any exception leaving the block after
    an interrupt arrived becomes KeyboardInterrupt."""
    guard = InterruptGuard()
    installed = threading.current_thread() is threading.main_thread()
    if installed:
        _seen[0] = False
        previous = signal.signal(signal.SIGINT, guard._handler)
    try:
        yield guard
    except BaseException as e:
        if guard.requested and not isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    finally:
        if installed:
            signal.signal(signal.SIGINT, previous)
