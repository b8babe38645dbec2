"""qwen2c's GPU kernels, run on the CPU: TVM's generated CUDA C compiled with g++, each block's
threads as real concurrent threads (tests/gpu_emulation/harness.cpp), checked against NumPy.

No GPU is needed: this tests what the kernels compute (indices, guards for sizes that do not divide
the block sizes, reductions, the stable counting sort, routing order and ties) before any GPU runs
them. Kernels are generated in float32 (the half-precision variants differ only in their loads).
"""

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm

from qwen2c.schedules import gpu_moe, gpu_norm
from qwen2c.schedules.activations import activation_index
from qwen2c.targets.registry import TARGETS

HARNESS = Path(__file__).parent / "gpu_emulation" / "harness.cpp"

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("g++") is None,
                                reason="needs nvcc (TVM compiles the CUDA it prints) and g++")


def _cuda_source(func) -> str:
    from qwen2c.targets.tvm.device_code import device_codegen

    spec = TARGETS.resolve("cuda")
    with device_codegen(spec):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=spec.tvm_target())
    return lib.mod.imports[0].inspect_source("cuda")


def _as_cpp(name: str, source: str) -> str:
    body = source[source.rindex('extern "C" __global__'):]
    body = body.replace('extern "C" __global__ void', "static void").replace("main_kernel(", f"k_{name}(")
    body = re.sub(r"__launch_bounds__\(\d+\)", "", body)
    return re.sub(r"alignas\(\d+\) ", "", body)  # after __shared__, which the harness makes `static`


@pytest.fixture(scope="module", params=[
    # experts, top_k, hidden, moe_intermediate, group threads, tokens, norm_topk_prob
    dict(E=6, K=3, H=100, I=30, MT=4, T=7, norm=True),  # nothing divides a block; experts > group threads
    dict(E=64, K=8, H=128, I=64, MT=1024, T=70, norm=False),  # qwen2-moe-tiny's routing; two route blocks
    dict(E=6, K=3, H=100, I=30, MT=4, T=7, norm=True, act="gelu_tanh"),  # a model with hidden_act gelu_pytorch_tanh
], ids=["odd-sizes", "64x8", "gelu-tanh"])
def kernels(request, tmp_path_factory):
    c = request.param
    funcs = {
        "route": gpu_moe.route_kernel(c["E"], c["K"], c["norm"], "float32"),
        "dense": gpu_moe.dense_route_kernel(c["E"], c["K"]),
        "group": gpu_moe.group_kernel(c["E"], c["MT"]),
        "swiglu": gpu_moe.grouped_swiglu_kernel(c["E"], c["H"], c["I"], c["K"], dtype="float32",
                                                act=activation_index(c.get("act", "silu"))),
        "down": gpu_moe.grouped_down_kernel(c["E"], c["H"], c["I"], dtype="float32"),
        "combine": gpu_moe.combine_kernel(c["H"], c["K"], "float32"),
        "norm": gpu_norm.rms_norm_kernel(c["H"], 1e-6, "float32"),
    }
    folder = tmp_path_factory.mktemp("emulated")
    (folder / "kernels.inc").write_text("\n".join(_as_cpp(n, _cuda_source(f)) for n, f in funcs.items()))
    lib = folder / "kernels.so"
    subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f'-DKINC="{folder / "kernels.inc"}"',
                    str(HARNESS), "-o", str(lib)], check=True, capture_output=True)
    return c, ctypes.CDLL(str(lib))


def _p(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def _route(lib, c, logits):
    t = logits.shape[0]
    weights, chosen = np.full((t, c["K"]), np.nan, np.float32), np.full((t, c["K"]), -7, np.int32)
    tb = gpu_moe.TOKENS_PER_BLOCK
    lib.route(_p(chosen), _p(logits), _p(weights), ctypes.c_int64(t), -(-t // tb), tb)
    return weights, chosen


def _group(lib, c, flat):
    s = flat.size
    offsets, rows, slot_of = (np.full(n, -7, np.int32) for n in (c["E"] + 1, s, s))
    lib.group(_p(flat), _p(offsets), _p(rows), _p(slot_of), ctypes.c_int64(s), min(c["E"], c["MT"]))
    return rows, offsets, slot_of


def test_route_picks_the_top_k_highest_first_ties_to_the_lower_expert(kernels):
    c, lib = kernels
    logits = np.random.default_rng(0).standard_normal((c["T"], c["E"])).astype(np.float32)
    logits[0, :] = 0.5  # every expert ties
    logits[2, 3] = logits[2, 1] = 5.0  # the top two tie
    weights, chosen = _route(lib, c, logits)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :c["K"]]
    expected = np.take_along_axis(probs, order, 1)
    if c["norm"]:
        expected /= expected.sum(1, keepdims=True)
    np.testing.assert_array_equal(chosen, order)
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)


def test_group_is_a_stable_counting_sort(kernels):
    c, lib = kernels
    flat = np.random.default_rng(1).integers(0, c["E"], c["T"] * c["K"]).astype(np.int32)
    flat[: c["K"]] = 0  # one expert with many slots, and (for 64 experts) some with none
    rows, offsets, slot_of = _group(lib, c, flat)
    np.testing.assert_array_equal(rows, np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=c["E"]))]))
    np.testing.assert_array_equal(rows[slot_of], np.arange(flat.size))


def test_the_moe_block_matches_its_definition(kernels):
    """route -> group -> grouped gated MLP -> grouped down -> combine, against fused_moe's definition."""
    import torch

    from qwen2c.graphs.ops import activation
    c, lib = kernels
    E, K, H, I, T = c["E"], c["K"], c["H"], c["I"], c["T"]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((T, H)).astype(np.float32)
    gate_up = (rng.standard_normal((E, 2 * I, H)) * 0.1).astype(np.float32)
    down = (rng.standard_normal((E, H, I)) * 0.1).astype(np.float32)
    weights, chosen = _route(lib, c, rng.standard_normal((T, E)).astype(np.float32))
    rows, offsets, slot_of = _group(lib, c, np.ascontiguousarray(chosen.reshape(-1)))
    warps, lanes = gpu_moe.COLS, gpu_moe.WARP
    h = np.full((T * K, I), np.nan, np.float32)  # NaN: an element no thread writes fails the check
    lib.swiglu(_p(offsets), _p(h), _p(rows), _p(gate_up), _p(x), -(-I // warps), E, lanes, warps)
    y = np.full((T * K, H), np.nan, np.float32)
    lib.down(_p(offsets), _p(y), _p(down), _p(h), -(-H // warps), E, lanes, warps)
    out = np.full((T, H), np.nan, np.float32)
    lib.combine(_p(out), _p(slot_of), _p(weights), _p(y), ctypes.c_int64(T), ctypes.c_int64(T * H),
                -(-T * H // 256), 256)

    expected = np.zeros((T, H))
    for t in range(T):
        for j in range(K):
            e = chosen[t, j]
            gate, up = gate_up[e, :I] @ x[t], gate_up[e, I:] @ x[t]
            act = activation(c.get("act", "silu"), torch.from_numpy(gate).double()).numpy()
            expected[t] += weights[t, j] * (down[e] @ (act * up))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_dense_route_puts_every_expert_on_every_token(kernels):
    c, lib = kernels
    weights, chosen = _route(lib, c, np.random.default_rng(3).standard_normal((c["T"], c["E"])).astype(np.float32))
    dense_w, dense_e = np.full((c["T"], c["E"]), np.nan, np.float32), np.full((c["T"], c["E"]), -7, np.int32)
    tb = gpu_moe.TOKENS_PER_BLOCK
    lib.dense(_p(chosen), _p(dense_e), _p(dense_w), _p(weights), ctypes.c_int64(c["T"]), -(-c["T"] // tb), tb)
    expected = np.zeros_like(dense_w)
    np.put_along_axis(expected, chosen.astype(np.int64), weights, 1)
    np.testing.assert_array_equal(dense_e, np.broadcast_to(np.arange(c["E"]), dense_e.shape))
    np.testing.assert_array_equal(dense_w, expected)


def test_rms_norm_sums_every_element_once(kernels):
    c, lib = kernels
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((c["T"], c["H"])) * 3).astype(np.float32)
    w = rng.standard_normal(c["H"]).astype(np.float32)
    out = np.full_like(x, np.nan)
    lib.norm(_p(out), _p(w), _p(x), ctypes.c_int64(c["T"]), gpu_norm.THREADS)
    expected = x / np.sqrt((x.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
