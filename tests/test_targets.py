"""Accelerator targets built here: the device code in each library, the refusals, `qwen2c targets`.

Each build is a tiny checkpoint with --max-context 64; nothing runs (no device here). A test whose
toolchain is missing here skips with the build's own message (.ci/run installs them).
"""

import json
import re
import struct
import subprocess
import sys

import pytest

import qwen2c
from conftest import write_moe_checkpoint
from qwen2c.cli import main
from qwen2c.engine_dir import LIBRARY
from qwen2c.errors import BackendUnavailableError, Qwen2cError
from qwen2c.targets.registry import TARGETS, linker_for
from qwen2c.targets.tvm import rocm

EM_AARCH64 = 183


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    return write_moe_checkpoint(tmp_path_factory.mktemp("moe") / "moe")


def _build(checkpoint, target, out, arch=None) -> tuple[dict, bytes]:
    manifest = qwen2c.build(str(checkpoint), target, out, max_context=64, arch=arch)
    return manifest, (out / LIBRARY).read_bytes()


def _needs(check, *args):
    try:
        check(*args)
    except BackendUnavailableError as e:
        pytest.skip(str(e))


# ROCm


@pytest.mark.parametrize("arch", [None, "gfx90a"])
def test_rocm_dense_library_holds_a_code_object_for_the_arch(tmp_path, tiny_checkpoint, arch):
    spec = TARGETS.resolve("rocm", arch)
    _needs(rocm.check_rocm_toolchain, spec)
    manifest, library = _build(tiny_checkpoint, "rocm", tmp_path / "e", arch)
    objects = rocm.code_objects(library)
    assert [o["arch"] for o in objects] == list(spec.arches) == manifest["target"]["arches"]
    assert objects[0]["code_object_version"] == 6  # LLVM 22's default, hence ld.lld >= 19
    assert rocm.describe_code_objects(library, spec)["arches"] == list(spec.arches)
    assert manifest["parity"] == "not run (no rocm device)"


def test_rocm_moe_library_holds_a_code_object(tmp_path, moe_checkpoint):
    spec = TARGETS.resolve("rocm")
    _needs(rocm.check_rocm_toolchain, spec)
    _, library = _build(moe_checkpoint, "rocm", tmp_path / "e")
    assert [o["arch"] for o in rocm.code_objects(library)] == ["gfx942"]


def test_rocm_refuses_several_arches_in_one_build():
    with pytest.raises(Qwen2cError, match="one architecture"):
        TARGETS.resolve("rocm", "gfx90a,gfx942")
    assert TARGETS.resolve("cuda", "sm_80,sm_90").arches == ("sm_80", "sm_90")


def test_rocm_describe_refuses_a_library_without_the_arch():
    import _ctypes  # any host shared object: an ELF, but no AMDGPU code object

    with open(_ctypes.__file__, "rb") as f:
        host_library = f.read()
    assert rocm.code_objects(host_library) == []
    with pytest.raises(BackendUnavailableError, match="no AMD GPU code object for gfx942"):
        rocm.describe_code_objects(host_library, TARGETS.resolve("rocm"))


def test_rocm_toolchain_errors_name_what_to_install(monkeypatch):
    spec = TARGETS.resolve("rocm")
    monkeypatch.setattr(rocm, "find_bitcode_dir", lambda: None)
    monkeypatch.setattr(rocm, "find_lld", lambda: ("/usr/bin/ld.lld", 14))
    with pytest.raises(BackendUnavailableError) as e:
        rocm.check_rocm_toolchain(spec)
    message = str(e.value)
    assert "ocml.bc" in message and "ROCM_PATH" in message and "LLD 14" in message
    assert "apt install rocm-device-libs" in message and "apt install lld-19" in message


def test_rocm_bitcode_takes_the_arch_isa_file_or_its_family_fallback(tmp_path):
    names = ["ocml", "oclc_daz_opt_off", "oclc_unsafe_math_off", "oclc_finite_only_off",
             "oclc_correctly_rounded_sqrt_on", "oclc_wavefrontsize64_on", "oclc_abi_version_500",
             "oclc_isa_version_90a", "oclc_isa_version_940"]
    for name in names:
        (tmp_path / f"{name}.bc").touch()
    files, missing = rocm.bitcode_files(tmp_path, "gfx942")
    assert missing is None and files[-1].endswith("oclc_isa_version_940.bc")
    (tmp_path / "oclc_isa_version_942.bc").touch()
    assert rocm.bitcode_files(tmp_path, "gfx942")[0][-1].endswith("oclc_isa_version_942.bc")
    (tmp_path / "oclc_isa_version_90a.bc").unlink()
    files, missing = rocm.bitcode_files(tmp_path, "gfx90a")
    assert "oclc_isa_version_90a.bc (for gfx90a)" in missing


# Metal and OpenCL: the library carries kernel source, compiled by the driver at load.

KERNEL_DEFINITION = {"metal": rb"kernel void (\w+)\(", "opencl": rb"__kernel void (\w+)\([^;{]*\)\s*\{"}


def _kernels(library: bytes, target: str) -> set[str]:
    return {name.decode() for name in re.findall(KERNEL_DEFINITION[target], library)}


@pytest.mark.parametrize("target", ["metal", "opencl"])
def test_source_targets_dense_library_holds_the_kernels(tmp_path, tiny_checkpoint, target):
    manifest, library = _build(tiny_checkpoint, target, tmp_path / "e")
    kernels = _kernels(library, target)
    # the KV cache's attention, and the model's own kernels (a matmul at least)
    assert {"batch_prefill_paged_kv_kernel", "batch_decode_paged_kv_kernel"} <= kernels
    assert any("matmul" in k for k in kernels)
    assert manifest["device_code"]["format"] == f"{target} source"


@pytest.mark.parametrize("target", ["metal", "opencl"])
def test_source_targets_moe_library_holds_the_moe_kernels(tmp_path, moe_checkpoint, target):
    _, library = _build(moe_checkpoint, target, tmp_path / "e")
    assert {"moe_route", "moe_group", "moe_grouped_swiglu", "moe_grouped_down", "moe_combine"} <= {
        k.removesuffix("_kernel") for k in _kernels(library, target)}


# AArch64: cross-compiled and linked with aarch64-linux-gnu-gcc


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_aarch64_library_is_an_aarch64_elf(tmp_path, tiny_checkpoint, moe_checkpoint, model):
    _needs(linker_for, TARGETS.resolve("llvm-aarch64"))
    manifest, library = _build(tiny_checkpoint if model == "dense" else moe_checkpoint, "llvm-aarch64", tmp_path / "e")
    assert library[:4] == b"\x7fELF" and struct.unpack_from("<H", library, 18)[0] == EM_AARCH64
    assert manifest["target"]["name"] == "llvm-aarch64"


# Refused targets: true on this TVM, and refused in one paragraph


def test_vulkan_is_refused_because_tvm_has_no_spirv_codegen(tmp_path, tiny_checkpoint, capsys):
    import tvm

    assert tvm.get_global_func("target.build.vulkan", allow_missing=True) is None
    assert main(["build", "--model", str(tiny_checkpoint), "--target", "vulkan", "-o", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "SPIR-V" in err and "target.build.vulkan" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "e").exists()


def test_webgpu_is_refused_because_its_codegen_has_no_int64(tmp_path, tiny_checkpoint, capsys):
    import tvm
    from tvm.script import tirx as T

    @T.prim_func
    def cast(ids: T.Buffer((64,), "int64"), out: T.Buffer((64,), "int32")):
        for i in T.thread_binding(64, thread="threadIdx.x"):
            out[i] = T.Cast("int32", ids[i])

    with pytest.raises(Exception, match="CodeGenWebGPU: do not support i64"):
        tvm.tirx.build(tvm.IRModule({"cast": cast.with_attr("global_symbol", "cast")}),
                       target=tvm.target.Target({"kind": "webgpu"}, host="llvm"))
    assert main(["build", "--model", str(tiny_checkpoint), "--target", "webgpu", "-o", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "64-bit integers" in err and err.count("\n") == 1


# qwen2c targets


def test_targets_lists_every_target_with_a_verdict():
    done = subprocess.run([sys.executable, "-m", "qwen2c.cli", "targets", "--json"],
                          capture_output=True, text=True, check=True)
    rows = {row["name"]: row for row in json.loads(done.stdout)["targets"]}
    assert set(rows) == {spec.name for spec in TARGETS.all()}
    for row in rows.values():
        assert row["verdict"] in ("build and run", "build", "neither")
        assert (row["reason"] is None) == (row["verdict"] == "build and run"), row
    assert [row["verdict"] for row in rows.values() if row["host"]] == ["build and run"]
    for refused in ("vulkan", "webgpu"):
        assert rows[refused]["verdict"] == "neither"
        assert rows[refused]["reason"] == TARGETS._targets[refused].cannot_build
    table = subprocess.run([sys.executable, "-m", "qwen2c.cli", "targets"], capture_output=True, text=True, check=True)
    for name, row in rows.items():
        assert re.search(rf"^{re.escape(name)}( \(llvm\))? +{row['verdict']} ", table.stdout, re.M), name


def test_targets_verdicts_follow_the_toolchain_checks(monkeypatch):
    """With no cross compiler, nvcc or ld.lld, the targets that need them become 'neither', saying so."""
    import shutil

    from qwen2c.target_support import target_support

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(rocm, "find_lld", lambda: None)
    rows = {s.name: s for s in target_support()}
    assert rows["llvm-aarch64"].verdict == "neither" and "aarch64-linux-gnu-gcc" in rows["llvm-aarch64"].reason
    assert rows["cuda"].verdict == "neither" and "nvcc" in rows["cuda"].reason
    assert rows["rocm"].verdict == "neither" and "lld-19" in rows["rocm"].reason
    assert rows["opencl"].verdict == "build" and "opencl runtime" in rows["opencl"].reason
