"""CUDA engines built on a machine without a GPU: compiled device code, every kernel scheduled,
parity recorded as not run, and the pipeline's dispatch steps."""

import json
import shutil

import pytest
import tvm
from tvm import relax

import qwen2c
from conftest import write_checkpoint, write_moe_checkpoint
from qwen2c.errors import BackendUnavailableError, Qwen2cError
from qwen2c.targets.registry import TARGETS
from qwen2c.targets.tvm.device_code import fatbin_elf_arches

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH: CUDA device code cannot be compiled here")


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cuda") / "ckpt", seed=4, dtype="bfloat16", hidden_size=96,
                            num_attention_heads=6, num_key_value_heads=2)


def test_dense_cuda_engine_holds_a_fatbin_for_every_requested_arch(tmp_path, bf16_checkpoint):
    manifest = qwen2c.build(str(bf16_checkpoint), "cuda", tmp_path / "engine", arch="sm_80,sm_90", max_context=64)
    assert manifest["dtype"] == "bfloat16"  # a GPU target takes the checkpoint's dtype
    assert manifest["target"]["arches"] == ["sm_80", "sm_90"]
    assert manifest["parity"] == "not run (no cuda device)"
    library = (tmp_path / "engine" / "model.so").read_bytes()
    arches = sorted({a for _, found in fatbin_elf_arches(library) for a in found})
    assert arches == ["sm_80", "sm_90"] == manifest["device_code"]["arches"]
    assert b"__global__" not in library  # no CUDA source left to compile at load
    launches = manifest["launches"]
    assert launches["kv_cache_calls"] == 2  # one per layer
    assert launches["graph_replays"] >= 1 and launches["host_launches"] < launches["kernels"]


def test_moe_cuda_engine_builds_with_the_gpu_moe_kernels(tmp_path):
    ckpt = write_moe_checkpoint(tmp_path / "moe", dtype="bfloat16", num_experts=8, num_experts_per_tok=2)
    manifest = qwen2c.build(str(ckpt), "cuda", tmp_path / "engine", max_context=64)
    assert manifest["device_code"]["arches"] == ["sm_90"]
    library = (tmp_path / "engine" / "model.so").read_bytes()
    for kernel in (b"moe_route", b"moe_group", b"moe_grouped_swiglu", b"moe_grouped_down", b"moe_combine", b"rms_norm"):
        assert kernel in library  # names of the compiled kernels in the fatbin's symbol tables


def _cuda_pipeline_output(checkpoint, dtype: str) -> tvm.IRModule:
    """The checkpoint's module after the CUDA pipeline (before the build)."""
    from qwen2c.checkpoint import load_reference, resolve_model
    from qwen2c.graphs.export import export_model
    from qwen2c.graphs.pipeline import run_passes
    from qwen2c.targets.tvm.pipelines import pipeline_for, run_pipeline
    from qwen2c.targets.tvm.relax_module import build_relax_module

    config, model = load_reference(resolve_model(str(checkpoint)), dtype)
    program = export_model(model, 32)
    run_passes(program, config, dtype, check_lengths=())
    spec = TARGETS.resolve("cuda")
    with spec.tvm_target():
        return run_pipeline(pipeline_for(spec), build_relax_module(program, config, dtype))


def test_float16_cuda_engine_uses_tensor_cores_for_prompts(bf16_checkpoint):
    mod = _cuda_pipeline_output(bf16_checkpoint, "float16")
    scripts = [f.script() for gv, f in mod.functions_items() if "NT_matmul" in gv.name_hint]
    assert any("wmma" in s for s in scripts)  # DLight's tensor-core rule served the prefill matmuls


def test_unknown_arch_and_arch_on_a_cpu_target_are_refused(tmp_path, bf16_checkpoint):
    with pytest.raises(Qwen2cError, match="sm_90"):
        qwen2c.build(str(bf16_checkpoint), "cuda", tmp_path / "e", arch="sm_70")
    with pytest.raises(Qwen2cError, match="GPU targets"):
        qwen2c.build(str(bf16_checkpoint), "llvm", tmp_path / "e", arch="sm_90")
    assert not (tmp_path / "e").exists()


def test_missing_nvcc_is_refused_before_building(tmp_path, bf16_checkpoint, monkeypatch):
    import qwen2c.targets.tvm.device_code as device_code

    real_which = shutil.which
    monkeypatch.setattr(device_code.shutil, "which", lambda name, *a, **k: None if name == "nvcc" else real_which(name))
    with pytest.raises(BackendUnavailableError, match="nvcc"):
        qwen2c.build(str(bf16_checkpoint), "cuda", tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_a_fatbin_missing_a_requested_arch_is_refused():
    from qwen2c.targets.tvm.device_code import describe_device_code

    spec = TARGETS.resolve("cuda", "sm_80,sm_90")
    with pytest.raises(BackendUnavailableError, match="sm_80"):
        describe_device_code(b"extern \"C\" __global__ void k() {}", spec)


def test_cli_build_cuda_reports_parity_not_run(tmp_path, bf16_checkpoint, capsys):
    from qwen2c.cli import main

    assert main(["build", "--model", str(bf16_checkpoint), "--target", "cuda", "-o", str(tmp_path / "e"),
                 "--max-context", "32"]) == 0
    out = capsys.readouterr()
    assert "parity not run (no cuda device)" in out.out
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["parity"] == "not run (no cuda device)"


# --- the pipeline's dispatch and scheduling checks ---------------------------------------------

def _kernel_call_module(name):
    from qwen2c.targets.tvm.pipelines.dispatch_kernels import kernel_call

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        out = kernel_call(bb, name, [x], [], [((4, 8), "float32")])
        bb.emit_func_output(out)
    return bb.get()


def test_a_kernel_no_device_serves_fails_naming_it_and_the_device():
    from qwen2c.targets.tvm.pipelines.dispatch_kernels import dispatch_kernels

    from qwen2c.targets.tvm.pipelines import run_pipeline

    with pytest.raises(BackendUnavailableError, match="no cuda kernel for qwen2c's 'frobnicate'"):
        run_pipeline([dispatch_kernels({"rms_norm": None}, "cuda")], _kernel_call_module("frobnicate"))


def test_an_unscheduled_gpu_kernel_fails_the_build_naming_it():
    from tvm.script import tirx as T

    from qwen2c.targets.tvm.pipelines.check_scheduled import check_scheduled

    @T.prim_func(private=True)
    def serial_add(a: T.Buffer((8,), "float32"), b: T.Buffer((8,), "float32")):
        for i in range(8):
            b[i] = a[i] + T.float32(1)

    from qwen2c.targets.tvm.pipelines import run_pipeline

    mod = tvm.IRModule({"serial_add": serial_add})
    with pytest.raises(BackendUnavailableError, match="serial_add"):
        run_pipeline([check_scheduled("cuda")], mod)


def test_every_kernel_of_a_moe_gpu_build_is_bound_to_threads(tmp_path):
    ckpt = write_moe_checkpoint(tmp_path / "moe", num_experts=6, num_experts_per_tok=3, norm_topk_prob=True)
    mod = _cuda_pipeline_output(ckpt, "bfloat16")
    kernels = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any(k.startswith("moe_grouped_swiglu") for k in kernels)  # check_scheduled ran inside the pipeline


@pytest.mark.parametrize("name, make", [
    ("moe_route", lambda: __import__("qwen2c.schedules.gpu_moe", fromlist=["x"]).route_kernel(64, 8, True, "bfloat16")),
    ("moe_dense_route", lambda: __import__("qwen2c.schedules.gpu_moe", fromlist=["x"]).dense_route_kernel(64, 8)),
    ("moe_group", lambda: __import__("qwen2c.schedules.gpu_moe", fromlist=["x"]).group_kernel(64, 1024)),
    ("moe_grouped_swiglu", lambda: __import__("qwen2c.schedules.gpu_moe", fromlist=["x"]).grouped_swiglu_kernel(
        64, 128, 64, 8, "bfloat16")),
    ("moe_grouped_down", lambda: __import__("qwen2c.schedules.gpu_moe", fromlist=["x"]).grouped_down_kernel(
        64, 128, 64, "bfloat16")),
    ("moe_combine", lambda: __import__("qwen2c.schedules.gpu_moe", fromlist=["x"]).combine_kernel(128, 8, "bfloat16")),
    ("rms_norm", lambda: __import__("qwen2c.schedules.gpu_norm", fromlist=["x"]).rms_norm_kernel(896, 1e-6, "bfloat16")),
])
def test_gpu_kernels_keep_their_scratch_per_thread_or_per_block(name, make):
    """Scratch allocated at a TIR root block becomes one global buffer every thread shares (a race
    no CPU test can see): each kernel's CUDA signature must hold only its own arguments."""
    import re

    from qwen2c.targets.tvm.device_code import device_codegen

    func = make()
    spec = TARGETS.resolve("cuda")
    with device_codegen(spec):  # as a build compiles them (nvcc; TVM's default is NVRTC, absent here)
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=spec.tvm_target())
    source = lib.mod.imports[0].inspect_source("cuda")
    signature = re.search(r"main_kernel\(([^)]*)\)", source).group(1)
    pointers = set(re.findall(r"(\w+)_ptr\b", signature))
    script = func.script()
    arguments = set(re.findall(r"(\w+) = T\.match_buffer", script)) | set(re.findall(r"(\w+): T\.Buffer", script))
    assert pointers <= arguments, f"{name}: scratch passed as global buffers: {sorted(pointers - arguments)}"


def test_cuda_builds_a_moe_with_yarn_sliding_windows_and_gelu(tmp_path):
    """The configurations of test_model_variants.py build for CUDA too: qwen2c's RoPE kernel and
    TVM's sliding-window attention kernels are in the fatbin; every kernel was scheduled."""
    ckpt = write_moe_checkpoint(tmp_path / "moe", dtype="bfloat16", hidden_act="gelu_pytorch_tanh",
                                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                                max_position_embeddings=64, use_sliding_window=True, sliding_window=8,
                                max_window_layers=3)
    manifest = qwen2c.build(str(ckpt), "cuda", tmp_path / "engine", max_context=96)
    assert manifest["prefill_chunk"] == 8 and manifest["parity"] == "not run (no cuda device)"
    library = (tmp_path / "engine" / "model.so").read_bytes()
    for kernel in (b"fused_rope_kernel", b"batch_prefill_paged_kv_sliding_window_kernel",
                   b"batch_decode_paged_kv_sliding_window_kernel", b"moe_grouped_swiglu_kernel"):
        assert kernel in library


def test_the_cuda_rope_kernel_uses_accurate_cos_and_sin():
    """Angles reach position x frequency (hundreds of thousands of radians with YaRN's contexts):
    CUDA's fast __cosf/__sinf lose them, cosf/sinf do not."""
    from tvm.s_tir import dlight as dl

    from qwen2c.schedules.rope import split_rotary_kernel
    from qwen2c.targets.tvm.device_code import device_codegen

    spec = TARGETS.resolve("cuda")
    mod = tvm.IRModule({"main": split_rotary_kernel(4, 2, 16, "bfloat16").with_attr("global_symbol", "main")})
    with spec.tvm_target():
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(mod)
    with device_codegen(spec):
        source = tvm.compile(mod, target=spec.tvm_target()).mod.imports[0].inspect_source("cuda")
    assert "cosf(" in source and "sinf(" in source
    assert "__cosf" not in source and "__sinf" not in source


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_cuda_builds_dense_models_with_other_activations_and_linear_rope(tmp_path, act):
    ckpt = write_checkpoint(tmp_path / "ckpt", dtype="bfloat16", hidden_act=act,
                            rope_scaling={"rope_type": "linear", "factor": 2.0})
    manifest = qwen2c.build(str(ckpt), "cuda", tmp_path / "engine", max_context=64)
    assert manifest["device_code"]["arches"] == ["sm_90"]
