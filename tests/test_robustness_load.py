"""Load checks what it runs: edited manifests and libraries from other builds are refused, naming
the field; token ids are bounded inside the compiled code; NaN weights are refused naming the
tensor; generation stops at the context limit and keeps what it made."""

import json
import shutil

import numpy as np
import pytest

import qwen2c
from conftest import write_checkpoint
from qwen2c.cli import main
from qwen2c.engine_dir import file_table
from qwen2c.errors import ConfigError, EngineError


def _copy(engine, tmp_path, name="copy"):
    copy = tmp_path / name
    shutil.copytree(engine, copy)
    return copy


def _edit_manifest(engine, edit) -> None:
    path = engine / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    manifest["files"] = file_table(engine)  # checksums made to match: only the fingerprint can tell
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def other_builds(tmp_path_factory):
    """Engines of the tiny checkpoint's shapes and context but another RoPE theta (a constant the
    library bakes in), and of another shape."""
    root = tmp_path_factory.mktemp("other")
    same = write_checkpoint(root / "same-ckpt", seed=1, rope_theta=10000.0)
    shape = write_checkpoint(root / "shape-ckpt", seed=2, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    qwen2c.build(str(same), "llvm", root / "same", max_context=64)
    qwen2c.build(str(shape), "llvm", root / "shape", max_context=64)
    return root / "same", root / "shape"


@pytest.mark.parametrize("field, value, named", [
    (("model", "config", "vocab_size"), 100000, "model.config.vocab_size"),
    (("max_context",), 4096, "max_context"),
    (("dtype",), "bfloat16", "dtype"),
    (("target", "name"), "llvm-x86-64", "target.name"),
])
def test_an_edited_manifest_is_refused_naming_the_field(tmp_path, tiny_engine, field, value, named):
    copy = _copy(tiny_engine, tmp_path)

    def edit(m):
        node = m
        for key in field[:-1]:
            node = node[key]
        node[field[-1]] = value

    _edit_manifest(copy, edit)
    with pytest.raises(EngineError, match=named.replace(".", r"\.")):
        qwen2c.load(copy)


def test_swapped_parameter_order_is_refused(tmp_path, tiny_engine):
    copy = _copy(tiny_engine, tmp_path)

    def swap(m):
        m["params"][1], m["params"][2] = m["params"][2], m["params"][1]

    _edit_manifest(copy, swap)
    with pytest.raises(EngineError, match="parameter 1"):
        qwen2c.load(copy)


@pytest.mark.parametrize("which, named", [(0, "rope_theta"), (1, "hidden_size")])
def test_a_library_from_another_build_is_refused(tmp_path, tiny_engine, other_builds, which, named):
    copy = _copy(tiny_engine, tmp_path)
    shutil.copy(other_builds[which] / "model.so", copy / "model.so")
    _edit_manifest(copy, lambda m: None)
    with pytest.raises(EngineError, match=named):
        qwen2c.load(copy)
    assert main(["run", str(copy), "--prompt-ids", "1,2"]) == 2


def test_a_weights_file_from_another_shape_is_refused(tmp_path, tiny_engine, other_builds):
    copy = _copy(tiny_engine, tmp_path)
    shutil.copy(other_builds[1] / "model.safetensors", copy / "model.safetensors")
    _edit_manifest(copy, lambda m: None)
    with pytest.raises(EngineError, match="weights-file tensor"):
        qwen2c.load(copy)


def test_token_ids_are_bounded_inside_the_compiled_code(tiny_engine):
    """Past the Python check (as a caller of the runtime would be), ids outside the vocabulary read
    the table's first or last row: the embedding clamps, it does not read beyond the table."""
    engine = qwen2c.load(tiny_engine)
    program, vocab = engine._program, engine.vocab_size

    def logits(ids):
        return program.forward(program.new_cache(), np.array(ids, dtype=np.int64))[0]

    wild = logits([-5, 3, vocab + 10**6, -(2**40), 2**40 + 7])
    clamped = logits([0, 3, vocab - 1, 0, vocab - 1])
    assert np.array_equal(wild, clamped)
    assert np.array_equal(logits([-(2**62)]), logits([0]))  # decode (one token) too


def test_nan_or_inf_weights_are_refused_naming_the_tensor(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = write_checkpoint(tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][3, 5] = float("nan")
    tensors[name][0, 0] = float("inf")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*1 NaN and 1 infinite"):
        qwen2c.build(str(ckpt), "llvm", tmp_path / "engine", max_context=16)
    assert not (tmp_path / "engine").exists()
    assert torch.isnan(tensors[name]).sum() == 1


def test_generate_stops_at_the_context_limit_and_keeps_its_tokens(tiny_engine, tiny_checkpoint):
    import torch
    from transformers import Qwen2ForCausalLM

    engine = qwen2c.load(tiny_engine)
    prompt = list(range(1, 61))  # 60 of the 64 positions
    out = engine.generate(prompt, max_new_tokens=20)
    # Positions 61..64 hold the prompt's last token's successors; the 5th token needs no position.
    assert len(out) == engine.max_context - len(prompt) + 1 and out.stop_reason == "max_context"
    reference = Qwen2ForCausalLM.from_pretrained(tiny_checkpoint).eval()
    want = reference.generate(torch.tensor([prompt]), max_new_tokens=len(out), do_sample=False)
    assert list(out) == want[0, len(prompt):].tolist()
    assert engine.generate(prompt, max_new_tokens=3).stop_reason == "max_new_tokens"


@pytest.mark.parametrize("count", [2.5, "3", True, None, -1])
def test_generate_refuses_counts_that_are_not_non_negative_integers(tiny_engine, count):
    with pytest.raises(ValueError, match="max_new_tokens"):
        qwen2c.load(tiny_engine).generate([1, 2], count)


def test_run_past_the_context_prints_what_it_generated_and_why_it_stopped(tiny_engine, capsys):
    assert main(["run", str(tiny_engine), "--prompt-ids", ",".join(map(str, range(1, 62))),
                 "--max-new-tokens", "50"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().split(",")) == 4
    assert "maximum context (64 tokens)" in captured.err and "Traceback" not in captured.err
