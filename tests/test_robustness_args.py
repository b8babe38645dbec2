"""Every CLI option and API argument is checked before work starts: one line, exit 2, no traceback."""

import pytest

import qwen2c
from qwen2c.cli import main
from qwen2c.errors import ConfigError


@pytest.fixture
def no_work(monkeypatch):
    """A command that gets past its argument checks into real work fails the test."""
    from qwen2c import builder

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(builder, "load_reference", refuse)
    monkeypatch.setattr("qwen2c.verify.load_reference", refuse)
    monkeypatch.setattr("qwen2c.bench.run_bench", refuse)
    monkeypatch.setattr("qwen2c.bench.build_engines", refuse)


def _bad(argv, capsys, expect: str) -> None:
    with pytest.raises(SystemExit) as exit_info:  # argparse's checks exit here
        code = main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert expect in err, err


@pytest.mark.parametrize("argv, expect", [
    (["build", "--model", "{ckpt}", "-o", "{out}", "--max-context", "2"], "--max-context"),
    (["build", "--model", "{ckpt}", "-o", "{out}", "--max-context", "7"], "below 8"),
    (["build", "--model", "{ckpt}", "-o", "{out}", "--max-context", "0"], "--max-context"),
    (["build", "--model", "{ckpt}", "-o", "{out}", "--max-context", "-3"], "--max-context"),
    (["build", "--model", "{ckpt}", "-o", "{out}", "--max-context", "12.5"], "integer"),
    (["build", "--model", "{ckpt}", "-o", "{out}", "--max-context", "257"], "context (256"),
    (["build", "--model", "{ckpt}", "-o", "{out}", "--parity-steps", "300"], "does not fit"),
    (["build", "--model", "{ckpt}", "-o", "{out}", "--max-context", "8", "--parity-steps", "7"], "at most 6"),
    (["build", "--model", "{ckpt}", "-o", "{out}", "--parity-steps", "0"], "at least 1"),
    (["build", "--model", "{ckpt}", "-o", "{out}", "--dtype", "int3"], "--dtype"),
    (["build", "--model", "{ckpt}", "-o", "{out}", "--sign-key", "{out}.missing"], "--sign-key"),
    (["build", "--model", "{ckpt}", "-o", "{out}", "--target", "tpu"], "tpu"),
    (["verify", "{engine}", "--decode-steps", "-2"], "--decode-steps"),
    (["verify", "{engine}", "--decode-steps", "63"], "does not fit"),
    (["bench", "{engine}", "--repeats", "0"], "--repeats"),
    (["bench", "{engine}", "--rounds", "0"], "--rounds"),
    (["bench", "{engine}", "--prefill", "0,8"], "--prefill"),
    (["bench", "{engine}", "--decode-tokens", "x"], "integer"),
    (["inspect", "--model", "{ckpt}", "--max-context", "0"], "--max-context"),
    (["run", "{engine}", "--prompt-ids", "1,2", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["run", "{engine}", "--prompt-ids", "1,2", "--max-new-tokens", "2.5"], "--max-new-tokens"),
    (["run", "{engine}", "--prompt-ids", "1,2", "--trusted-key", "{out}.missing"], "trusted key"),
    (["run", "{engine}", "--prompt-ids", ""], "empty"),
    (["run", "{engine}", "--prompt-ids", ",".join(["1"] * 65)], "maximum context"),
    (["run", "{out}", "--prompt-ids", "1"], "no such engine"),
    (["pack", "{engine}", "-o", "{out}", "--python", "three"], "--python"),
    (["keygen"], "--output"),
    (["frobnicate"], "invalid choice"),
    ([], "command"),
])
def test_bad_arguments_fail_in_one_line_with_exit_2(tmp_path, tiny_checkpoint, tiny_engine, no_work, capsys,
                                                    argv, expect):
    fill = {"ckpt": str(tiny_checkpoint), "out": str(tmp_path / "out"), "engine": str(tiny_engine)}
    _bad([a.format(**fill) for a in argv], capsys, expect)
    assert not (tmp_path / "out").exists()


def test_version_and_exit_codes_in_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"qwen2c {qwen2c.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for code in ("0 ", "1 ", "2 ", "3 ", "130"):
        assert f"  {code}" in out


def test_an_internal_error_is_one_line_with_exit_1(monkeypatch, tiny_engine, capsys):
    import qwen2c.runtime

    def broken(*args, **kwargs):
        raise RuntimeError("something inside went wrong\nwith a second line")

    monkeypatch.setattr(qwen2c.runtime, "load", broken)
    assert main(["run", str(tiny_engine), "--prompt-ids", "1"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "internal error" in err and "--verbose" in err


@pytest.mark.parametrize("kwargs, expect", [
    (dict(max_context=2), "--max-context"),
    (dict(max_context=0), "--max-context"),
    (dict(max_context=16.0), "integer"),
    (dict(max_context=True), "integer"),
    (dict(max_context=16, parity_steps=15), "--parity-steps"),
    (dict(max_context=16, parity_steps=2.5), "integer"),
    (dict(max_context=16, parity_steps=-1), "at least 1"),
])
def test_build_api_checks_its_arguments_first(tmp_path, tiny_checkpoint, no_work, kwargs, expect):
    with pytest.raises(ConfigError, match=expect):
        qwen2c.build(str(tiny_checkpoint), "llvm", tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_default_parity_steps_fit_a_short_context(tmp_path, tiny_checkpoint):
    manifest = qwen2c.build(str(tiny_checkpoint), "llvm", tmp_path / "e", max_context=8)
    assert manifest["parity"]["passed"] and manifest["parity"]["decode_steps"] == 6
    engine = qwen2c.load(tmp_path / "e")
    out = engine.generate([1, 2, 3], 10)
    assert len(out) == 6 and out.stop_reason == "max_context"
