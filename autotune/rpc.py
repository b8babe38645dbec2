"""Measuring on another machine through TVM's RPC tracker (``--rpc-tracker HOST:PORT --rpc-key KEY``).

This is how TVM tunes for phones and accelerators: each device runs ``python -m tvm.exec.rpc_server
--tracker HOST:PORT --key KEY``, registering with a tracker (``python -m tvm.exec.rpc_tracker``);
the tuner asks the tracker for a free device of that key, uploads a compiled library, and times a
function there. ``Remote`` does that for qwen2c's own-kernel tuner; ``metaschedule_runner`` gives
MetaSchedule a runner that does the same for TVM's TIR kernels.

The library is compiled here, by this machine's toolchain: a remote device of another architecture
needs a target and a cross linker for it, which qwen2c does not set up.
"""

from __future__ import annotations

import socket
import tempfile
import time as _time
from pathlib import Path
from typing import Any

import numpy as np

from qwen2c.errors import BackendUnavailableError, ConfigError

DEFAULT_TIMEOUT = 60.0  # seconds to wait for the tracker to hand out a device, and per remote session


def parse_tracker(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); a ConfigError naming ``--rpc-tracker`` otherwise."""
    host, sep, port = (text or "").strip().rpartition(":")
    host = host.strip("[]")  # [::1]:9190
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--rpc-tracker {text!r}: expected HOST:PORT of a TVM RPC tracker (for example "
                          "127.0.0.1:9190), the address `python -m tvm.exec.rpc_tracker` listens on.")
    return host, int(port)


class Remote:
    """A device of ``key`` lent by the tracker at ``tracker`` (host, port), to time compiled functions.

    Raises BackendUnavailableError, naming the tracker and the key, when the tracker cannot be
    reached, has no device registered under the key, or none comes free within ``timeout`` seconds.
    ``device``: "cpu" or "cuda" (the device the code was compiled for); None reads it from each library.
    """

    def __init__(self, tracker: tuple[str, int], key: str, timeout: float = DEFAULT_TIMEOUT,
                 device: str | None = None):
        self.tracker, self.key, self.timeout, self.device = tuple(tracker), key, float(timeout), device
        self._session = None
        self._where = f"RPC tracker {tracker[0]}:{tracker[1]} (--rpc-tracker), key {key!r} (--rpc-key)"

    def session(self):
        """The RPC session (requested from the tracker on first use, then kept)."""
        if self._session is None:
            self._session = self._request()
        return self._session

    def _request(self):
        from tvm import rpc

        try:  # a plain connect first: TVM's own client retries a refused connection for 60 s
            socket.create_connection(self.tracker, timeout=min(self.timeout, 10.0)).close()
        except OSError as e:
            raise BackendUnavailableError(
                f"cannot reach the {self._where}: {e.strerror or e}. Start one with `python -m tvm.exec.rpc_tracker "
                f"--host 0.0.0.0 --port {self.tracker[1]}`, or check the address.") from None
        tracker = rpc.connect_tracker(*self.tracker)
        try:
            if not self._registered(tracker):
                raise BackendUnavailableError(
                    f"the {self._where} has no device registered under that key. Register one with "
                    f"`python -m tvm.exec.rpc_server --tracker {self.tracker[0]}:{self.tracker[1]} --key {self.key}`.")
            tracker._sock.settimeout(self.timeout)  # a request waits for a free device: bounded here
            try:
                return tracker.request(self.key, priority=1, session_timeout=0, max_retry=1)
            except (RuntimeError, OSError) as e:
                raise BackendUnavailableError(
                    f"no device of the {self._where} came free within {self.timeout:g} s "
                    f"({str(e).splitlines()[0][:200]}).") from None
        finally:
            tracker.close()

    def _registered(self, tracker) -> bool:
        servers = tracker.summary().get("server_info", [])
        return any(str(s.get("key", "")).split(":", 1)[-1] == self.key for s in servers)

    def load(self, lib) -> Any:
        """``lib`` (a compiled ``tvm.runtime.Module``, or the path of an exported library) on the remote."""
        sess = self.session()
        with tempfile.TemporaryDirectory(prefix="qwen2c-rpc-") as tmp:
            if isinstance(lib, (str, Path)):
                path = Path(lib)
            else:
                path = Path(tmp) / "kernel.so"
                lib.export_library(str(path))
            name = f"qwen2c-{_time.monotonic_ns()}{path.suffix}"
            sess.upload(str(path), name)
        return sess.load_module(name)

    def _device(self, lib):
        kind = self.device or _device_kind(lib)
        sess = self.session()
        return sess.cuda(0) if kind == "cuda" else sess.rocm(0) if kind == "rocm" else sess.cpu(0)

    def time(self, lib, func_name: str, args: list[np.ndarray], number: int = 1, repeat: int = 5,
             min_repeat_ms: int = 0) -> list[float]:
        """Seconds per call of ``func_name`` of ``lib`` on the remote device, one per repeat."""
        seconds, _ = self._evaluate(lib, func_name, args, number, repeat, min_repeat_ms)
        return seconds

    def run(self, lib, func_name: str, args: list[np.ndarray], min_repeat_seconds: float,
            repeats: int) -> tuple[float, list[np.ndarray]]:
        """The median seconds per call, and the last argument (the output) after a call, as NumPy."""
        seconds, outputs = self._evaluate(lib, func_name, args, 1, repeats, int(min_repeat_seconds * 1e3))
        return float(np.median(seconds)), outputs[-1:]

    def _evaluate(self, lib, func_name, args, number, repeat, min_repeat_ms):
        from tvm import runtime

        module = self.load(lib)
        dev = self._device(lib)
        tensors = [runtime.tensor(np.ascontiguousarray(a), dev) for a in args]
        module[func_name](*tensors)  # the outputs, and a first run outside the timing
        outputs = [t.numpy() for t in tensors]
        timer = module.time_evaluator(func_name, dev, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
        return [float(s) for s in timer(*tensors).results], outputs

    def close(self) -> None:
        self._session = None  # the server ends the session when its connection closes


def _device_kind(lib) -> str:
    """"cuda" / "rocm" when the library carries device code for them, else "cpu"."""
    if isinstance(lib, (str, Path)):
        return "cpu"
    kinds = {str(getattr(m, "kind", "") or getattr(m, "type_key", "")) for m in getattr(lib, "imports", [])}
    return "cuda" if "cuda" in kinds else "rocm" if any("hsaco" in k or "rocm" in k for k in kinds) else "cpu"


def metaschedule_runner(tracker: tuple[str, int], key: str, timeout: float = DEFAULT_TIMEOUT,
                        number: int = 3, repeat: int = 1, min_repeat_ms: int = 100):
    """A MetaSchedule runner measuring each candidate on a device of ``key`` lent by ``tracker``.

    Checked first like ``Remote`` (tracker reachable, the key registered), so a wrong address fails
    with one clear error instead of every candidate failing inside MetaSchedule.
    """
    from tvm.s_tir import meta_schedule as ms

    probe = Remote(tracker, key, timeout)
    probe.session()
    probe.close()
    return ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(tracker_host=tracker[0], tracker_port=int(tracker[1]), tracker_key=key,
                                       session_timeout_sec=int(timeout)),
        evaluator_config=ms.runner.EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms),
        max_workers=1,  # one device of the key at a time: candidates timed side by side would disturb each other
    )
