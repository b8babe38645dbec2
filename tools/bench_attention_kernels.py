"""Time qwen2c's CPU attention kernels against the ones they replace, in one process, on the same data.

    python tools/bench_attention_kernels.py [--decode 16,1000,4000] [--prefill 128,1024,4096]

Geometry of qwen2-0.5b (2 kv heads, 14 query heads, head_dim 64, float32). Decode: qwen2c's
``batch_decode_paged_kv_cpu`` vs TVM's, one query over a context of N tokens in 16-slot pages.
Prefill: the blocked ragged kernel vs the per-(query, head) one it replaced (schedules/cpu_attention.py),
causal over N tokens, with torch's scaled_dot_product_attention and an sgemm of the same run for scale.
Prints medians, per layer and for 24 layers; the machine may be shared, so read the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import tvm

from qwen2c.schedules.cpu_attention import ragged_prefill_kernel
from qwen2c.schedules.cpu_blocked_attention import blocked_ragged_prefill_kernel
from qwen2c.schedules.cpu_decode_attention import decode_kernel
from qwen2c.targets.registry import TARGETS

HKV, HQ, D, PAGE, LAYERS = 2, 14, 64, 16, 24


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def _compile(func, target):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]


def _median_s(fn, args, repeats: int) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _i32(a):
    return tvm.runtime.tensor(np.array(a, np.int32))


def bench_decode(lengths, target, lanes) -> None:
    from tvm.relax.frontend.nn.llm.kv_cache import _attention_decode_cpu

    ours = _compile(decode_kernel(HKV, HQ, D, lanes, PAGE), target)
    theirs = _compile(_attention_decode_cpu(HKV, HQ, D, "float32", False, {}), target)
    rng = np.random.default_rng(0)
    for m in lengths:
        pages = -(-m // PAGE)
        args = [tvm.runtime.tensor(rng.standard_normal((1, HQ, D), dtype=np.float32)),
                tvm.runtime.tensor(rng.standard_normal((pages + 1, 2, HKV, PAGE, D), dtype=np.float32)),
                _i32([0, pages]), _i32(np.arange(pages)), _i32([m - (pages - 1) * PAGE]), _i32([0]), _i32([0]),
                tvm.runtime.tensor(np.zeros((1, HQ, D), np.float32)), tvm.runtime.tensor(np.zeros((1, HQ), np.float32)),
                0, 1.0, 1e6, 0.125]
        t_tvm, t_ours = _median_s(theirs, args, 21), _median_s(ours, args, 21)
        mb = m * HKV * D * 2 * 4 / 1e6
        print(f"decode after {m:5d}: TVM {1e3 * t_tvm:7.3f} ms/layer, qwen2c {1e3 * t_ours:6.3f} ms/layer "
              f"({t_tvm / t_ours:4.1f}x); {LAYERS} layers {1e3 * LAYERS * t_tvm:6.1f} vs {1e3 * LAYERS * t_ours:5.2f} ms; "
              f"qwen2c reads the cache at {mb / 1e3 / t_ours:.1f} GB/s")


def bench_prefill(lengths, target, lanes) -> None:
    import torch

    old = _compile(ragged_prefill_kernel(HKV, HQ, D, lanes), target)
    new = _compile(blocked_ragged_prefill_kernel(HKV, HQ, D, lanes), target)
    torch.set_num_threads(int(os.environ.get("TVM_NUM_THREADS", len(os.sched_getaffinity(0)))))
    rng = np.random.default_rng(0)
    for n in lengths:
        q, k, v = (rng.standard_normal((n, h, D), dtype=np.float32) for h in (HQ, HKV, HKV))
        args = [tvm.runtime.tensor(q), _i32([0, n]), tvm.runtime.tensor(k), tvm.runtime.tensor(v), _i32([0, n]),
                _i32(np.arange(n)), _i32([0]), tvm.runtime.tensor(np.zeros((n, HQ, D), np.float32)),
                tvm.runtime.tensor(np.zeros((n, HQ), np.float32)), 1, 0, 1.0, 1e6, 0.125]
        repeats = 5 if n <= 1024 else 1
        t_old, t_new = _median_s(old, args, repeats), _median_s(new, args, repeats)
        tq, tk, tv = (torch.from_numpy(a).transpose(0, 1)[None] for a in (q, k, v))
        t_sdpa = _median_s(lambda: torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, is_causal=True, enable_gqa=True), [], repeats)
        a, w = torch.randn(n, 896), torch.randn(896, 896)
        t_gemm = _median_s(lambda: a @ w, [], repeats)
        flop = 4 * D * HQ * n * (n + 1) / 2  # causal: QK^T and PV over the visible half
        print(f"prefill {n:5d} tokens: per-query kernel {1e3 * t_old:8.1f} ms/layer, blocked {1e3 * t_new:7.1f} ms/layer "
              f"({t_old / t_new:4.1f}x); {LAYERS} layers {LAYERS * t_old:6.2f} vs {LAYERS * t_new:5.2f} s; blocked "
              f"{flop / t_new / 1e9:5.1f} GFLOP/s, torch SDPA {flop / t_sdpa / 1e9:5.1f}, "
              f"torch sgemm {n}x896x896 {2 * n * 896 * 896 / t_gemm / 1e9:5.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decode", type=_ints, default=[16, 1000, 4000])
    p.add_argument("--prefill", type=_ints, default=[128, 1024, 4096])
    args = p.parse_args()
    spec = TARGETS.resolve("llvm")
    lanes = spec.vector_bits // 32
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    bench_decode(args.decode, spec.tvm_target(), lanes)
    bench_prefill(args.prefill, spec.tvm_target(), lanes)


if __name__ == "__main__":
    main()
