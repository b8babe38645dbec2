"""Run a step whose native code may abort the process in a forked child.

LLVM writes the engine's object files itself and, when a write fails (a disk that fills during
the build), calls ``report_fatal_error``: "LLVM ERROR: IO failure on output stream", then abort().
In-process that kills the build with no message of ours and no cleanup. Forked, only the child
dies; the parent sees how, and reports a full disk as one, with its staging folder removed as
for any other failure.

The child inherits the parent's memory copy-on-write (the compiled module is not copied) and
runs only the step given; it leaves with ``os._exit``, running no atexit handlers or finalizers
of the parent's objects. Native code that calls C ``exit()`` instead (LLVM's fatal errors do)
runs them anyway, and the first to run are the calling thread's ``thread_local`` destructors:
TVM's runtime destroys a condition variable there that its thread pool's threads (which do not
exist in a forked child) were waiting on, and glibc waits for them forever. So the parent watches
a child that has stopped working: one asleep with no CPU time spent and no process of its own
(a linker) for ``STALL_SECONDS`` — or for ``FULL_DISK_STALL_SECONDS`` once the disk is full — is
killed and reported as dead.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import select
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

STALL_SECONDS = 120.0
FULL_DISK_STALL_SECONDS = 3.0
FULL_DISK_BYTES = 16 << 20  # a writer that stopped with less free than this ran out of space


class ChildDied(Exception):
    """The child ended without a result: killed by a signal, or exited by native code (LLVM's fatal
    errors exit(1) or abort())."""


def _exit_on_c_exit(status: int) -> None:
    """Make a C ``exit()`` in this process end it with ``status`` before any static destructor runs:
    ``_exit`` registered through ``__cxa_atexit`` (its one pointer argument lands in ``_exit``'s int
    argument). It runs after the calling thread's ``thread_local`` destructors, which can still hang
    (see the module's docstring: the parent watches for that)."""
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


def run_forked(step: Callable[[], Any], disk: str | Path | None = None) -> Any:
    """``step()`` in a forked child: its result, or the exception it raised, or ChildDied.
    ``disk``: a folder on the disk the step writes to (a full one shortens the stall allowed)."""
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
        data, stalled = _read_watching(read, pid, disk)
        if stalled:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    except BaseException:  # interrupted while waiting: the child must not outlive the build
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    if stalled:
        raise ChildDied(f"stopped working ({stalled}) and was killed")
    if os.WIFSIGNALED(status):
        raise ChildDied(f"killed by {signal.Signals(os.WTERMSIG(status)).name}")
    if not data:
        raise ChildDied(f"ended by native code with exit status {os.WEXITSTATUS(status)}")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise value
    return value


def _read_watching(fd: int, pid: int, disk) -> tuple[bytes, str | None]:
    """Everything the child writes to ``fd`` until it closes it, or (its data so far, why it is
    stalled) once it has stopped working (see the module's docstring)."""
    chunks, last_cpu, since = [], None, time.monotonic()
    with os.fdopen(fd, "rb", buffering=0) as f:
        while True:
            ready, _, _ = select.select([f], [], [], 0.5)
            if ready:
                chunk = f.read(1 << 20)
                if not chunk:
                    return b"".join(chunks), None
                chunks.append(chunk)
                since = time.monotonic()
                continue
            state, cpu = _state(pid)
            if state is None:  # gone: the pipe's EOF follows
                continue
            if cpu != last_cpu or state not in "S" or _has_children(pid):
                last_cpu, since = cpu, time.monotonic()
                continue
            idle = time.monotonic() - since
            if idle > STALL_SECONDS:
                return b"".join(chunks), f"asleep for {idle:.0f} s without using the CPU"
            if disk is not None and idle > FULL_DISK_STALL_SECONDS and _free(disk) < FULL_DISK_BYTES:
                return b"".join(chunks), "asleep on a full disk"


def _state(pid: int) -> tuple[str | None, int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None, 0
    return fields[0], int(fields[11]) + int(fields[12])  # state, utime + stime


def _has_children(pid: int) -> bool:
    try:
        return any(Path(t, "children").read_text().strip() for t in Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False


def _free(path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0
