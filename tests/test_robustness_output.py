"""The destination is checked before any slow step (writable, room for the engine); a disk that
fills anyway ends in one clear error with nothing left behind."""

import collections
import contextlib
import subprocess

import pytest

import qwen2c
from qwen2c import builder, engine_dir
from qwen2c.cli import main
from qwen2c.errors import OutputError


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a build gets as far as loading the model (the slow steps start there)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the build loaded the model before checking its destination")

    monkeypatch.setattr(builder, "load_reference", refuse)


@contextlib.contextmanager
def _tmpfs(path, options: str):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_an_unwritable_destination_is_refused_before_any_work(tmp_path, tiny_checkpoint, no_loading, capsys):
    for out in ("/proc/x", str(tmp_path / "file" / "engine")):
        (tmp_path / "file").write_text("not a folder")
        assert main(["build", "--model", str(tiny_checkpoint), "-o", out, "--max-context", "16"]) == 2
        err = capsys.readouterr().err
        assert "cannot write" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_read_only_mount_is_refused_before_any_work(tmp_path, tiny_checkpoint, no_loading):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(OutputError, match="cannot write"):
            qwen2c.build(str(tiny_checkpoint), "llvm", ro / "engine", max_context=16)


def test_too_little_free_space_is_refused_before_any_work(tmp_path, tiny_checkpoint, no_loading, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(engine_dir.shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - (5 << 20), 5 << 20))
    with pytest.raises(OutputError, match=r"needs about 256 MiB.*has 5 MiB free"):
        qwen2c.build(str(tiny_checkpoint), "llvm", tmp_path / "engine", max_context=16)
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_during_the_build_ends_cleanly(tmp_path, tiny_checkpoint, monkeypatch):
    # 1 MiB passes the (disabled) margin check and holds the weights, not the library as well.
    monkeypatch.setattr(engine_dir, "SPACE_MARGIN", 0)
    with _tmpfs(tmp_path / "small", "size=1m") as small:
        with pytest.raises(OutputError, match="disk filled"):
            qwen2c.build(str(tiny_checkpoint), "llvm", small / "engine", max_context=16, parity_steps=2)
        assert list(small.iterdir()) == []
