"""The command line: build, run, verify, and errors as one paragraph with a non-zero exit."""

import shutil

from qwen2c.cli import main


def test_build_run_verify_preset(tmp_path, capsys):
    out = tmp_path / "engine"
    assert main(["build", "--model", "qwen2-tiny", "-o", str(out), "--max-context", "64"]) == 0
    assert "parity PASS" in capsys.readouterr().out
    assert main(["run", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "5"]) == 0
    assert len(capsys.readouterr().out.strip().split("\n")[0].split(",")) == 5
    assert main(["run", str(out), "--prompt", "Hello, world", "--max-new-tokens", "3"]) == 0
    assert main(["verify", str(out)]) == 0
    assert "PASS" in capsys.readouterr().out


def test_cli_errors_are_short_and_non_zero(tmp_path, tiny_engine, capsys):
    assert main(["run", str(tiny_engine), "--prompt-ids", "1,x"]) == 2
    assert main(["run", str(tiny_engine), "--prompt-ids", "1,99999"]) == 2
    err = capsys.readouterr().err
    assert "outside the vocabulary" in err and "Traceback" not in err
    assert main(["run", str(tiny_engine), "--prompt", "hi"]) == 2  # checkpoint without tokenizer
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["build", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "e")]) == 2
    assert main(["verify", str(tmp_path)]) == 2


def test_verify_refuses_tampered_weights_even_with_fresh_checksums(tmp_path, tiny_engine, capsys):
    """A re-checksummed tamper passes the manifest check; the library's fingerprint (the parameter
    order it was compiled for) refuses it before anything runs."""
    import json

    from qwen2c.engine_dir import file_table

    copy = tmp_path / "copy"
    shutil.copytree(tiny_engine, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    # Swap the order of two same-shaped params: the library now reads the wrong weights.
    params = manifest["params"]
    i = next(i for i, p in enumerate(params) if p["name"].endswith("layers.0.self_attn.q_proj.weight"))
    j = next(i for i, p in enumerate(params) if p["name"].endswith("layers.0.self_attn.o_proj.weight"))
    params[i]["key"], params[j]["key"] = params[j]["key"], params[i]["key"]
    manifest["files"] = file_table(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == 2
    assert "parameter 1 is 'model.layers.0.self_attn.q_proj.weight' (key 'model.layers.0.self_attn.o_proj.weight')" \
        in capsys.readouterr().err


def test_moe_preset_builds_runs_and_verifies(tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["build", "--model", "qwen2-moe-tiny", "-o", str(out), "--max-context", "64"]) == 0
    assert "parity PASS" in capsys.readouterr().out
    assert main(["run", str(out), "--prompt", "Hello, world", "--max-new-tokens", "3"]) == 0
    assert main(["verify", str(out)]) == 0
    assert "routing: PASS" in capsys.readouterr().out


def test_too_large_moe_preset_is_refused_with_the_memory_it_needs(tmp_path, capsys):
    assert main(["build", "--model", "qwen2-57b-a14b", "-o", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "57.41B parameters" in err and "GiB" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()
