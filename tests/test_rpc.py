"""Remote measurement through TVM's RPC tracker: a tracker and a device server on loopback, started here."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tvm
import tvm.rpc.tracker
from tvm import rpc
from tvm.script import tirx as T

from qwen2c.autotune import metaschedule, metaschedule_db
from qwen2c.autotune.rpc import Remote, metaschedule_runner, parse_tracker
from qwen2c.errors import BackendUnavailableError, ConfigError, Qwen2cError
from qwen2c.targets.registry import TARGETS

KEY = "qwen2c-test"


@T.prim_func(s_tir=True)
def scaled_add(a: T.Buffer((256,), "float32"), b: T.Buffer((256,), "float32"), c: T.Buffer((256,), "float32")):
    T.func_attr({"tirx.noalias": True})
    for i in range(256):
        with T.sblock("c"):
            vi = T.axis.remap("S", [i])
            c[vi] = a[vi] * T.float32(2) + b[vi]


@pytest.fixture(scope="module")
def tracker():
    """A tracker and one CPU server registered under KEY, both on 127.0.0.1; stopped afterwards."""
    tracker = rpc.tracker.Tracker("127.0.0.1", port=9190, port_end=9390, silent=True)
    server = rpc.Server("127.0.0.1", port=9400, port_end=9600, key=KEY, tracker_addr=("127.0.0.1", tracker.port),
                        silent=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the server registers itself a moment after it starts
            summary = rpc.connect_tracker("127.0.0.1", tracker.port).summary()
            if any(s["key"].endswith(KEY) for s in summary["server_info"]):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the RPC server did not register with the tracker: {summary}")
        yield ("127.0.0.1", tracker.port)
    finally:
        server.terminate()
        tracker.terminate()


def _target():
    return TARGETS.resolve("llvm").tvm_target()


def test_a_function_timed_remotely_computes_numpys_result(tracker):
    lib = tvm.compile(tvm.IRModule({"main": scaled_add.with_attr("global_symbol", "main")}), target=_target()).mod
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(256).astype("float32"), rng.standard_normal(256).astype("float32")
    remote = Remote(tracker, KEY, timeout=30)
    seconds = remote.time(lib, "main", [a, b, np.zeros(256, "float32")], number=10, repeat=3)
    assert len(seconds) == 3 and all(0 < s < 0.01 for s in seconds)
    median, (out,) = remote.run(lib, "main", [a, b, np.zeros(256, "float32")], 0.001, 3)
    assert median > 0
    np.testing.assert_allclose(out, a * 2 + b, rtol=1e-6)
    remote.close()


def test_a_bad_tracker_address_names_the_option():
    for bad in ("localhost", "host:port", ":9190", "host:0", ""):
        with pytest.raises(ConfigError, match="--rpc-tracker"):
            parse_tracker(bad)
    assert parse_tracker("10.0.0.2:9190") == ("10.0.0.2", 9190)


def test_an_unreachable_tracker_or_unknown_key_is_a_clear_error(tracker):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(BackendUnavailableError, match=f"cannot reach the RPC tracker 127.0.0.1:{free}"):
        Remote(("127.0.0.1", free), KEY, timeout=5).session()
    with pytest.raises(BackendUnavailableError, match="no-such-device.*--rpc-key.*no device registered under that key"):
        Remote(tracker, "no-such-device", timeout=5).session()


def test_a_busy_device_is_waited_for_a_bounded_time(tracker):
    holder = Remote(tracker, KEY, timeout=30)
    holder.session()  # the only server of KEY is now lent out
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError, match="came free within 3 s"):
            Remote(tracker, KEY, timeout=3).session()
        assert time.monotonic() - started < 30
    finally:
        holder.close()


def test_metaschedule_measures_through_the_tracker(tracker, tmp_path):
    db = tmp_path / "db"
    task = metaschedule.tir_task("scaled_add", scaled_add, _target())
    runner = metaschedule_runner(tracker, KEY, timeout=60)
    (result,) = metaschedule.tune_tir([task], _target(), db, trials=2, runner=runner, progress=lambda _: None,
                                      cost_model="random", batch=2, seed=0, strategy="replay-trace")
    assert result.trials >= 1 and result.best_us is not None  # a candidate ran on the remote device
    loaded = metaschedule_db.load([db], _target())
    assert loaded.records == result.trials


def test_the_runner_refuses_an_unknown_key_at_once(tracker):
    with pytest.raises(Qwen2cError, match="no-such-device"):
        metaschedule_runner(tracker, "no-such-device", timeout=5)
