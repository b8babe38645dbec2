"""Run a step whose native code may abort the process in a forked child.

LLVM writes the engine's object files itself and, when a write fails (a disk that fills during
the build), calls ``report_fatal_error``: "LLVM ERROR: IO failure on output stream", then abort().
In-process that kills the build with no message of ours and no cleanup. Forked, only the child
dies; the parent sees how, and reports a full disk as one, with its staging folder removed as
for any other failure.

The child inherits the parent's memory copy-on-write (the compiled module is not copied) and
runs only the step given; it leaves with ``os._exit``, running no atexit handlers or finalizers
of the parent's objects. Native code that calls C ``exit()`` instead (LLVM's fatal errors do) would
run them: the static destructors of TVM's and torch's libraries, whose thread pools have no
threads in a forked child, and were seen to wait on them forever. So the child's first act is to
register ``_exit`` itself as the last C exit handler, which runs first and ends the child there.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
from typing import Any, Callable


class ChildDied(Exception):
    """The child ended without a result: killed by a signal, or exited by native code (LLVM's fatal
    errors exit(1) or abort())."""


def _exit_on_c_exit(status: int) -> None:
    """Make a C ``exit()`` in this process end it at once with ``status``: ``_exit`` registered
    through ``__cxa_atexit``, whose one pointer argument lands in ``_exit``'s int argument."""
    libc = ctypes.CDLL(None)
    register = libc.__cxa_atexit
    register.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    register.restype = ctypes.c_int
    register(ctypes.cast(libc._exit, ctypes.c_void_p), ctypes.c_void_p(status), None)


def _child(step: Callable[[], Any], write: int) -> int:
    _exit_on_c_exit(3)  # not 0: a child that ends this way has no result to give
    code = 0
    try:
        payload = pickle.dumps(("ok", step()))
    except BaseException as e:
        code = 1
        try:
            payload = pickle.dumps(("error", e))
        except Exception:  # an exception that does not pickle (TVM's): its type and text
            payload = pickle.dumps(("error", RuntimeError(f"{type(e).__name__}: {e}")))
    with os.fdopen(write, "wb") as f:
        f.write(payload)
    return code


def run_forked(step: Callable[[], Any]) -> Any:
    """``step()`` in a forked child: its result, or the exception it raised, or ChildDied."""
    read, write = os.pipe()
    # SIGINT blocked across the fork: a Ctrl-C landing in Python's at-fork handlers (filelock has
    # some) would break them. The child keeps it blocked (the parent decides what an interrupt
    # means, and kills the child); the parent gets a pending one as soon as it unblocks.
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # runs pending handlers: may raise
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        os.close(read)
        os.close(write)
        raise
    if pid == 0:  # the child: whatever happens, it ends here
        code = 1
        try:
            os.close(read)
            code = _child(step, write)
        finally:
            os._exit(code)
    os.close(write)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        with os.fdopen(read, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
    except BaseException:  # interrupted while waiting: the child must not outlive the build
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    if os.WIFSIGNALED(status):
        raise ChildDied(f"killed by {signal.Signals(os.WTERMSIG(status)).name}")
    if not data:
        raise ChildDied(f"ended by native code with exit status {os.WEXITSTATUS(status)}")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise value
    return value
