"""Loading an engine at memory speed: weights mapped from the file and used by TVM in place (no copy),
combined weights (q/k/v, gate/up) read from the file rather than concatenated at load, checksums
verified once and remembered only while the file is unchanged, tampered files still refused, and
engines whose weights file is not laid out for mapping still load (by copying)."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

import qwen2c
from qwen2c import engine_dir
from qwen2c.errors import EngineError
from qwen2c.weights_file import joined, map_weights, write_aligned


def _file_mappings(path) -> list[dict]:
    """What this process maps from ``path`` (from /proc/self/smaps, not from qwen2c): address range
    and the kB of anonymous memory (pages copied on write) in it."""
    regions, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's first line
                current = None
                if len(fields) >= 6 and os.path.realpath(fields[5]) == os.path.realpath(path):
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    current = {"lo": lo, "hi": hi, "anonymous_kb": 0}
                    regions.append(current)
            elif current is not None and fields[0] == "Anonymous:":
                current["anonymous_kb"] = int(fields[1])
    return regions


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(engine_dir.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_every_weight_is_used_in_place_from_the_mapped_file(tiny_engine, tiny_checkpoint):
    from safetensors.torch import load_file

    engine = qwen2c.load(tiny_engine)
    program = engine._program
    assert program.weights_in_place == len(program.params)
    engine.generate([1, 2, 3], 4)
    mapped = _file_mappings(tiny_engine / "model.safetensors")
    assert mapped, "the weights file is not mapped"
    for t in program.params:
        assert any(m["lo"] <= t.data_ptr() and t.data_ptr() + t.numpy().nbytes <= m["hi"] for m in mapped)
    # ... and still the file's pages (page cache), not private copies made on write.
    assert all(m["anonymous_kb"] == 0 for m in mapped)
    # The combined q/k/v weight the VM uses is transformers' three weights, end to end in the file.
    ref = load_file(tiny_checkpoint / "model.safetensors")
    layer0 = [ref[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    want = torch.cat(layer0).numpy()
    assert any(t.shape == tuple(want.shape) and np.array_equal(t.numpy(), want) for t in program.params)
    assert engine.generate([1, 2, 3], 4) == qwen2c.load(tiny_engine).generate([1, 2, 3], 4)


def test_the_weights_file_is_still_a_safetensors_checkpoint(tiny_engine, tiny_checkpoint):
    from safetensors.torch import load_file

    ours, theirs = load_file(tiny_engine / "model.safetensors"), load_file(tiny_checkpoint / "model.safetensors")
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: stored once
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name


def test_write_aligned_places_groups_end_to_end_and_aligned(tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(0)
    t = {"q": rng.standard_normal((64, 48), dtype=np.float32), "k": rng.standard_normal((16, 48), dtype=np.float32),
         "v": rng.standard_normal((16, 48), dtype=np.float32), "odd": rng.standard_normal((7,), dtype=np.float32),
         "h": rng.standard_normal((5, 32)).astype(ml_dtypes.bfloat16), "n": rng.standard_normal((48,), dtype=np.float32)}
    path = tmp_path / "w.safetensors"
    write_aligned(t, path, [["q", "k", "v"]])
    m = map_weights(path)
    for name, want in t.items():
        assert m[name].dtype == want.dtype and np.array_equal(m[name], want), name
    for name in ("q", "k", "v", "h", "n"):  # sizes that are multiples of 64 bytes keep alignment
        assert m[name].ctypes.data % 64 == 0, name
    qkv = joined([m["q"], m["k"], m["v"]])
    assert np.shares_memory(qkv, m["q"]) and np.array_equal(qkv, np.concatenate([t["q"], t["k"], t["v"]]))
    assert joined([m["k"], m["q"]]) is None and joined([m["q"], m["v"]]) is None


def test_reopening_an_unchanged_engine_does_not_hash_it_again(tmp_path, tiny_engine, cache_dir, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_engine, copy)
    time.sleep(1.1)  # files younger than a second are never remembered (see engine_dir)
    hashed = []
    real = engine_dir.sha256
    monkeypatch.setattr(engine_dir, "sha256", lambda p: hashed.append(p.name) or real(p))
    qwen2c.load(copy)
    assert "model.safetensors" in hashed
    hashed.clear()
    qwen2c.load(copy)
    assert hashed == []
    monkeypatch.setenv(engine_dir.VERIFY_CACHE_ENV, "0")
    qwen2c.load(copy)
    assert "model.safetensors" in hashed


@pytest.mark.parametrize("keep_times", [False, True], ids=["plain-write", "mtime-restored"])
def test_a_weights_file_tampered_after_a_verified_load_is_refused(tmp_path, tiny_engine, cache_dir, keep_times):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_engine, copy)
    time.sleep(1.1)
    qwen2c.load(copy)
    assert any((cache_dir / "verified").iterdir())  # the first load was remembered
    weights = copy / "model.safetensors"
    st = weights.stat()
    with open(weights, "r+b") as f:  # same size, same inode: one byte of a weight changed in place
        f.seek(st.st_size - 100)
        byte = f.read(1)
        f.seek(st.st_size - 100)
        f.write(bytes([byte[0] ^ 0x01]))
    if keep_times:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert weights.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(EngineError, match="checksum mismatch"):
        qwen2c.load(copy)


def test_an_engine_whose_weights_are_not_laid_out_for_mapping_still_loads(tmp_path, tiny_engine):
    """Weights written by safetensors itself (another order, unaligned) and no recorded layout: the
    engine copies what it cannot map and concatenates with transform_params, with the same results."""
    from safetensors.numpy import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(tiny_engine, copy)
    tensors = load_file(copy / "model.safetensors")
    save_file({k: tensors[k] for k in sorted(tensors, reverse=True)}, copy / "model.safetensors")
    manifest = json.loads((copy / "manifest.json").read_text())
    for drop_layout in (False, True):
        if drop_layout:
            manifest.pop("weight_layout")
        engine_dir.write_manifest(copy, {k: v for k, v in manifest.items() if k not in ("files", "format_version")})
        engine = qwen2c.load(copy)
        assert engine._program.weights_in_place == 0
        assert engine.generate([5, 6, 7], 6) == qwen2c.load(tiny_engine).generate([5, 6, 7], 6)
