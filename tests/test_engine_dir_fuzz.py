"""Property-based fuzz of the engine-directory reader: whatever a hostile or damaged engine
directory holds (manifest, signature, weights header), loading it either works or raises a
qwen2c error naming what is wrong; never another exception, never a crash."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwen2c
from qwen2c import engine_dir
from qwen2c.errors import Qwen2cError

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# QWEN2C_FUZZ_EXAMPLES=1500 for a longer run (each property held for 1,500 examples on 2026-11-29).
EXAMPLES = int(os.environ.get("QWEN2C_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@pytest.fixture(scope="module")
def victim(tmp_path_factory, tiny_checkpoint):
    # An engine of its own: the session's tiny_engine is shared with tests that record into it.
    copy = tmp_path_factory.mktemp("fuzz") / "engine"
    qwen2c.build(str(tiny_checkpoint), "llvm", copy, max_context=64)
    return copy, json.loads((copy / "manifest.json").read_text()), (copy / "model.safetensors").read_bytes()


def _load_or_refuse(directory) -> None:
    try:
        engine = qwen2c.load(directory)
    except Qwen2cError:
        return
    assert len(engine.generate([1, 2, 3], 2)) == 2  # what loads, runs


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, path + (i,))


def _set(value, path, new):
    if not path:
        return new
    value = json.loads(json.dumps(value))
    node = value
    for key in path[:-1]:
        node = node[key]
    if new is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = new
    return value


_DELETE = object()


@FUZZ
@given(data=st.data())
def test_a_mutated_manifest_loads_or_is_refused(victim, data):
    directory, manifest, _ = victim
    paths = list(_paths(manifest))
    mutated = manifest
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        new = data.draw(st.just(_DELETE) | JSON) if path else data.draw(JSON)
        if new is _DELETE and not path:
            continue
        try:
            mutated = _set(mutated, path, new)
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed the path
            continue
    (directory / "manifest.json").write_text(json.dumps(mutated))
    try:
        _load_or_refuse(directory)
    finally:
        (directory / "manifest.json").write_text(json.dumps(manifest))


@FUZZ
@given(raw=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_manifest_bytes_are_refused(victim, raw):
    directory, manifest, _ = victim
    (directory / "manifest.json").write_bytes(raw)
    try:
        with pytest.raises(Qwen2cError):
            engine_dir.read_manifest(directory)
    finally:
        (directory / "manifest.json").write_text(json.dumps(manifest))


@FUZZ
@given(header=JSON, tail=st.binary(max_size=64), length_delta=st.integers(-8, 8))
def test_a_damaged_weights_header_is_refused(victim, header, tail, length_delta):
    """With expected_weights (a pack without weights), the supplied file's header is parsed."""
    directory, manifest, weights = victim
    expected = engine_dir.weights_spec(directory / "model.safetensors")
    packed = {k: v for k, v in manifest.items() if k != "files"}
    packed["files"] = {k: v for k, v in manifest["files"].items() if k != "model.safetensors"}
    packed["expected_weights"] = expected
    body = json.dumps(header).encode()
    blob = (len(body) + length_delta).to_bytes(8, "little", signed=True) + body + tail
    (directory / "manifest.json").write_text(json.dumps(packed))
    (directory / "model.safetensors").write_bytes(blob)
    try:
        with pytest.raises(Qwen2cError):
            qwen2c.load(directory)
    finally:
        (directory / "manifest.json").write_text(json.dumps(manifest))
        (directory / "model.safetensors").write_bytes(weights)


@FUZZ
@given(record=JSON | st.binary(max_size=100))
def test_a_damaged_signature_is_refused(victim, record, tmp_path_factory):
    from qwen2c.signing import generate_key_pair

    directory, manifest, _ = victim
    keys = tmp_path_factory.mktemp("k")
    generate_key_pair(keys / "k.key", keys / "k.pub")
    (directory / "signature.json").write_bytes(record if isinstance(record, bytes) else json.dumps(record).encode())
    try:
        with pytest.raises(Qwen2cError):
            qwen2c.load(directory, trusted_keys=[keys / "k.pub"])
    finally:
        (directory / "signature.json").unlink()
