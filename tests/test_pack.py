"""``qwen2c pack``: a folder that runs engines with its own qwen2c and TVM runtime, weights optional."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import qwen2c
from qwen2c.cli import main
from qwen2c.errors import EngineError, Qwen2cError
from qwen2c.pack import WheelFetchError, pack

PROMPT = [5, 77, 300, 2]
RUNNING_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"

# Runs after `. env.sh`, from a folder outside the repository: everything must come from the pack.
LOAD_FROM_PACK = """
import json, sys
import qwen2c, qwen2c.targets.tvm.runtime, tvm, tvm_ffi
tokens = qwen2c.load(sys.argv[1]).generate(json.loads(sys.argv[2]), max_new_tokens=8)
print(json.dumps({
    "tokens": tokens,
    "files": [m.__file__ for m in (qwen2c, qwen2c.targets.tvm.runtime, tvm, tvm_ffi)],
    "mapped": sorted({line.split()[-1] for line in open("/proc/self/maps") if "libtvm" in line}),
}))
"""


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_engine) -> Path:
    out = tmp_path_factory.mktemp("pack") / "pack"
    pack([tiny_engine], out)
    return out


def run_from_pack(pack_dir: Path, engine: Path, cwd: Path) -> dict:
    script = f'. "{pack_dir}/env.sh" && exec "{sys.executable}" -c "$0" "$@"'
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(["bash", "-c", script, LOAD_FROM_PACK, str(engine), json.dumps(PROMPT)],
                         capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pack_runs_with_its_own_qwen2c_and_tvm_runtime(packed, tiny_engine, tmp_path):
    result = run_from_pack(packed, packed / "engines" / tiny_engine.name, tmp_path)
    assert result["tokens"] == qwen2c.load(tiny_engine).generate(PROMPT, max_new_tokens=8)
    site = str(packed / "site") + "/"
    assert all(f.startswith(site) for f in result["files"]), result["files"]
    assert result["mapped"] and all(m.startswith(site) for m in result["mapped"]), result["mapped"]
    assert not any("libtvm_compiler" in m for m in result["mapped"])


def test_pack_layout_and_record(packed, tiny_engine):
    site = packed / "site"
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    for package in pyproject["tool"]["setuptools"]["packages"]:
        assert (site.joinpath(*package.split(".")) / "__init__.py").is_file(), package
    assert {p.name for p in (site / "tvm" / "lib").iterdir()} == {"libtvm_runtime.so", "libtvm_runtime_cuda.so"}
    assert not list(packed.rglob("libtvm_compiler*"))
    assert list(site.glob(f"tvm_ffi/core.cpython-{RUNNING_PYTHON.replace('.', '')}-*.so"))
    env = (packed / "env.sh").read_text()
    assert "export TVM_USE_RUNTIME_LIB=1" in env and "export TVM_FFI_DISABLE_TORCH_C_DLPACK=1" in env
    record = json.loads((packed / "pack.json").read_text())
    assert record["python"] == RUNNING_PYTHON
    assert [e["name"] for e in record["engines"]] == [tiny_engine.name]
    assert record["engines"][0]["files"]["model.safetensors"] == (tiny_engine / "model.safetensors").stat().st_size
    assert record["bytes"]["total"] < 64 * 2**20


def test_pack_without_weights_checks_the_weights_supplied_later(tmp_path, tiny_engine):
    out = tmp_path / "pack"
    pack([tiny_engine], out, weights=False, tokenizer=False)
    engine = out / "engines" / tiny_engine.name
    assert not (engine / "model.safetensors").exists() and not (engine / "generation_config.json").exists()
    with pytest.raises(EngineError, match="packed without its weights"):
        qwen2c.load(engine)

    shutil.copy(tiny_engine / "model.safetensors", engine / "model.safetensors")
    expected = qwen2c.load(tiny_engine).generate(PROMPT, max_new_tokens=8)
    assert qwen2c.load(engine).generate(PROMPT, max_new_tokens=8) == expected

    tensors = load_file(str(tiny_engine / "model.safetensors"))
    name = sorted(tensors)[0]
    wrong = np.zeros((3, *tensors[name].shape), tensors[name].dtype)
    save_file({**tensors, name: wrong}, str(engine / "model.safetensors"))
    with pytest.raises(EngineError, match=rf"tensor '{name}' is F32 \[3, .*the engine expects F32"):
        qwen2c.load(engine)
    save_file({k: v for k, v in tensors.items() if k != name}, str(engine / "model.safetensors"))
    with pytest.raises(EngineError, match=rf"tensor '{name}' is missing"):
        qwen2c.load(engine)
    (engine / "model.safetensors").write_bytes((tiny_engine / "model.safetensors").read_bytes()[:-8])
    with pytest.raises(EngineError, match="truncated or corrupt"):
        qwen2c.load(engine)


def test_pack_refuses_to_overwrite_and_leaves_nothing_on_failure(tmp_path, tiny_engine):
    out = tmp_path / "pack"
    out.mkdir()
    with pytest.raises(Qwen2cError, match="already exists"):
        pack([tiny_engine], out)
    with pytest.raises(Qwen2cError, match=r"not a qwen2c pack \(no pack.json\)"):
        pack([tiny_engine], out, force=True)
    with pytest.raises(Qwen2cError, match="would both be engines/"):
        pack([tiny_engine, tiny_engine], tmp_path / "twice")
    (tmp_path / "broken").mkdir()
    with pytest.raises(EngineError, match="no manifest.json"):
        pack([tiny_engine, tmp_path / "broken"], tmp_path / "failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "pack"]
    with pytest.raises(Qwen2cError, match="--python '3.10'"):
        pack([tiny_engine], tmp_path / "old", python="3.10")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="building a CUDA engine needs nvcc")
def test_cuda_engine_pack_keeps_its_fatbin_and_fits_a_device_run(tmp_path, tiny_checkpoint, capsys):
    from qwen2c.targets.tvm.device_code import fatbin_elf_arches

    engine = tmp_path / "cuda"
    qwen2c.build(str(tiny_checkpoint), "cuda", engine, max_context=64)
    assert main(["pack", str(engine), "-o", str(tmp_path / "pack"), "--no-weights"]) == 0
    printed = capsys.readouterr().out
    assert "MiB in all" in printed
    print(printed)  # shown with -s: the size of what travels to the GPU machine
    packed = tmp_path / "pack" / "engines" / "cuda" / "model.so"
    arches = [a for _, a in fatbin_elf_arches(packed.read_bytes())]
    assert arches and arches == [a for _, a in fatbin_elf_arches((engine / "model.so").read_bytes())]
    assert json.loads((tmp_path / "pack" / "pack.json").read_text())["bytes"]["total"] < 32 * 2**20


def test_pack_for_another_python_carries_its_tvm_ffi(tmp_path, tiny_engine):
    other = "3.12" if RUNNING_PYTHON != "3.12" else "3.11"
    try:
        pack([tiny_engine], tmp_path / "pack", python=other, weights=False)
    except WheelFetchError as e:
        pytest.skip(f"the package registry is unreachable from here: {e}")
    cores = [p.name for p in (tmp_path / "pack" / "site" / "tvm_ffi").glob("core.*.so")]
    assert len(cores) == 1 and cores[0].startswith(f"core.cpython-{other.replace('.', '')}-")
    record = next((tmp_path / "pack" / "site").glob("apache_tvm_ffi-*.dist-info")) / "RECORD"
    assert f"tvm_ffi/{cores[0]},," in record.read_text()
    assert json.loads((tmp_path / "pack" / "pack.json").read_text())["python"] == other
