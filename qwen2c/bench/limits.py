"""This machine's limits, measured in the benchmark's own run: memory read bandwidth and GEMM peak.

Decode of a dense model is bound by reading its weights once per token, so its limit is bytes read
per token ÷ bandwidth; prefill is bound by arithmetic, so its limit is FLOPs ÷ GEMM peak.

The bandwidth comes from a streaming read kernel in C (compiled here with the system's C compiler,
`-O3 -march=native`, one pthread per benchmark thread, each summing its own slice with independent
vector accumulators), not from a torch reduction: a `torch.sum` over a large tensor reaches well
under what llama.cpp's own weight-streaming loops reach, which would flatter every result. Pages
are first touched by the thread that later reads them. The GEMM peak is torch's (oneDNN/MKL)
square matmul at the same thread count, in float32 and bfloat16, or the arithmetic roof (a C kernel
of register-only float32 multiply-adds) where that is higher: torch's sgemm does not reach the
roof on every CPU, and a prefill measured against it could pass 100%.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError

# Each thread sums its slice with 4 vectors of 16 floats in flight (independent chains, so the
# adds never wait on each other and the loads stay the bottleneck); -fassociative-math lets the
# compiler keep them as vectors. Not -ffast-math: linked with it, a shared library carries
# crtfastmath's constructor, which turns on flush-to-zero for the whole process that loads it
# (every later float computation in `qwen2c bench`'s process would lose its subnormals). The buffer is written by the same threads first so its pages land near them.
_STREAM_C = r"""
#include <pthread.h>
#include <stddef.h>
#include <string.h>
#include <time.h>

typedef struct { float *p; size_t n; int reps; int fill; float sum; } job_t;

static void *run(void *arg) {
    job_t *j = (job_t *)arg;
    if (j->fill) { for (size_t i = 0; i < j->n; i++) j->p[i] = (float)(i & 1023) * 1e-3f; return 0; }
    float acc[64] = {0};
    for (int r = 0; r < j->reps; r++) {
        const float *p = j->p;
        size_t i = 0;
        for (; i + 64 <= j->n; i += 64)
            for (int k = 0; k < 64; k++) acc[k] += p[i + k];
        for (; i < j->n; i++) acc[0] += p[i];
    }
    float s = 0; for (int k = 0; k < 64; k++) s += acc[k];
    j->sum = s;
    return 0;
}

static double go(float *buf, size_t n, int threads, int reps, int fill, float *sink) {
    pthread_t t[256]; job_t jobs[256];
    if (threads > 256) threads = 256;
    size_t per = (n / threads) & ~(size_t)63;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < threads; i++) {
        jobs[i].p = buf + per * i; jobs[i].n = (i == threads - 1) ? n - per * i : per;
        jobs[i].reps = reps; jobs[i].fill = fill; jobs[i].sum = 0;
        pthread_create(&t[i], 0, run, &jobs[i]);
    }
    float s = 0;
    for (int i = 0; i < threads; i++) { pthread_join(t[i], 0); s += jobs[i].sum; }
    clock_gettime(CLOCK_MONOTONIC, &b);
    *sink = s;
    return (b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec);
}

double stream_fill(float *buf, size_t n, int threads) { float s; return go(buf, n, threads, 0, 1, &s); }
double stream_read(float *buf, size_t n, int threads, int reps, float *sink) { return go(buf, n, threads, reps, 0, sink); }
"""

# The arithmetic roof: each thread runs 16 independent chains of 16-float multiply-adds on registers
# (enough to cover the FMA latency of two 512-bit pipes), no memory traffic. A prompt kernel can beat
# a library's GEMM (torch's sgemm here is oneDNN's, which on some CPUs does not use all of AVX-512),
# never this.
_FMA_C = r"""
#include <pthread.h>
#include <time.h>

typedef struct { long iters; float out; } fjob_t;

static void *fma_run(void *arg) {
    fjob_t *j = (fjob_t *)arg;
    float acc[16][16], x[16], y[16];
    for (int v = 0; v < 16; v++) { x[v] = 1.0f + 1e-7f * v; y[v] = 1e-7f * v; }
    for (int c = 0; c < 16; c++) for (int v = 0; v < 16; v++) acc[c][v] = (float)c;
    for (long i = 0; i < j->iters; i++)
        for (int c = 0; c < 16; c++)
            for (int v = 0; v < 16; v++) acc[c][v] = acc[c][v] * x[v] + y[v];
    float s = 0; for (int c = 0; c < 16; c++) for (int v = 0; v < 16; v++) s += acc[c][v];
    j->out = s;
    return 0;
}

/* Seconds for `threads` threads each running `run` for `iters` iterations; their results summed to *sink. */
static double timed_jobs(void *(*run)(void *), int threads, long iters, float *sink) {
    pthread_t t[256]; fjob_t jobs[256];
    if (threads > 256) threads = 256;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < threads; i++) { jobs[i].iters = iters; pthread_create(&t[i], 0, run, &jobs[i]); }
    float s = 0;
    for (int i = 0; i < threads; i++) { pthread_join(t[i], 0); s += jobs[i].out; }
    clock_gettime(CLOCK_MONOTONIC, &b);
    *sink = s;
    return (b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec);
}

double fma_peak(int threads, long iters, float *sink) { return timed_jobs(fma_run, threads, iters, sink); }
"""

# The int8 roof: register-only vpdpbusd (64 multiply-adds each), what VNNI prompt kernels (qwen2c's,
# llama.cpp's Q8_0/Q4_0) are bound by. Without AVX-512 VNNI it reports -1 (no roof measured).
_DOT_C = r"""
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
/* Inline assembly: with an array of accumulators GCC copies every one between registers each
   iteration (and spills two), which halved what it measured. */
#define DOT(r) __asm__ volatile("vpdpbusd %1, %2, %0" : "+v"(r) : "v"(b), "v"(a))
static void *dot_run(void *arg) {
    fjob_t *j = (fjob_t *)arg;
    __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
    __m512i r0 = _mm512_set1_epi32(0), r1 = r0, r2 = r0, r3 = r0, r4 = r0, r5 = r0, r6 = r0, r7 = r0,
            r8 = r0, r9 = r0, r10 = r0, r11 = r0, r12 = r0, r13 = r0, r14 = r0, r15 = r0;
    for (long i = 0; i < j->iters; i++) {
        DOT(r0); DOT(r1); DOT(r2); DOT(r3); DOT(r4); DOT(r5); DOT(r6); DOT(r7);
        DOT(r8); DOT(r9); DOT(r10); DOT(r11); DOT(r12); DOT(r13); DOT(r14); DOT(r15);
    }
    __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(r0, r1), _mm512_add_epi32(r2, r3)),
                                 _mm512_add_epi32(_mm512_add_epi32(r4, r5), _mm512_add_epi32(r6, r7)));
    s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(r8, r9), _mm512_add_epi32(r10, r11)),
                                             _mm512_add_epi32(_mm512_add_epi32(r12, r13), _mm512_add_epi32(r14, r15))));
    j->out = (float)_mm512_reduce_add_epi32(s);
    return 0;
}
double dot_peak(int threads, long iters, float *sink) { return timed_jobs(dot_run, threads, iters, sink); }
#else
double dot_peak(int threads, long iters, float *sink) { (void)threads; (void)iters; *sink = 0; return -1; }
#endif
"""

STREAM_BYTES = 1 << 30  # 32x this machine's L3 and far above any cache seen on these machines
GEMM_SIZE = 2048


def _compile_stream(folder: Path) -> ctypes.CDLL:
    source, library = folder / "stream.c", folder / "stream.so"
    source.write_text(_STREAM_C + _FMA_C + _DOT_C)
    cmd = [os.environ.get("CC", "cc"), "-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros",
           "-fno-trapping-math", "-ffp-contract=fast", "-fPIC", "-shared", "-pthread",
           str(source), "-o", str(library)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise BackendUnavailableError("measuring memory bandwidth needs a C compiler (cc, or $CC); none was found.") from None
    except subprocess.CalledProcessError as e:
        raise BackendUnavailableError(f"the bandwidth kernel did not compile ({' '.join(cmd)}): {e.stderr.strip()}") from None
    lib = ctypes.CDLL(str(library))
    lib.stream_fill.restype = lib.stream_read.restype = ctypes.c_double
    lib.stream_fill.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.stream_read.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
    lib.fma_peak.restype = ctypes.c_double
    lib.fma_peak.argtypes = lib.dot_peak.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.POINTER(ctypes.c_float)]
    lib.dot_peak.restype = ctypes.c_double
    return lib


def measure_bandwidth(threads: int, nbytes: int = STREAM_BYTES, repeats: int = 10) -> dict[str, Any]:
    """Read bandwidth (bytes read ÷ seconds) of the streaming kernel over ``nbytes``: best and median."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="qwen2c-stream-") as tmp:
        lib = _compile_stream(Path(tmp))
        n = nbytes // 4
        buf = np.empty(n, dtype=np.float32)  # untouched until the threads fill it
        lib.stream_fill(buf.ctypes.data, n, threads)
        sink = ctypes.c_float()
        lib.stream_read(buf.ctypes.data, n, threads, 1, ctypes.byref(sink))  # warm-up
        times = [lib.stream_read(buf.ctypes.data, n, threads, 1, ctypes.byref(sink)) for _ in range(repeats)]
        expected = float(np.sum(buf, dtype=np.float64))
    if not abs(sink.value - expected) <= 1e-3 * abs(expected):  # the kernel really read every element
        raise RuntimeError(f"bandwidth kernel summed {sink.value}, NumPy {expected}")
    gb_s = [n * 4 / t / 1e9 for t in times]
    return {"GB_s": max(gb_s), "median_GB_s": statistics.median(gb_s), "min_GB_s": min(gb_s), "bytes": n * 4,
            "threads": threads, "repeats": repeats, "kernel": "C streaming read, -O3 -march=native, pthreads"}


def measure_gemm_peak(threads: int, size: int = GEMM_SIZE, repeats: int = 5) -> dict[str, Any]:
    """torch's square matmul throughput at ``threads`` threads, float32 and bfloat16: best and median."""
    import torch

    torch.set_num_threads(threads)
    out: dict[str, Any] = {"size": size, "threads": threads}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        flops = 2 * size ** 3
        out[name] = {"GFLOP_s": flops / min(times) / 1e9, "median_GFLOP_s": flops / statistics.median(times) / 1e9}
    return out


def measure_fma_peak(threads: int, iters: int = 2_000_000, repeats: int = 5) -> dict[str, Any]:
    """float32 multiply-adds per second of the register-only C kernel: the arithmetic roof."""
    with tempfile.TemporaryDirectory(prefix="qwen2c-fma-") as tmp:
        lib = _compile_stream(Path(tmp))
        sink = ctypes.c_float()
        lib.fma_peak(threads, iters // 10, ctypes.byref(sink))  # warm-up (clocks ramp)
        times = [lib.fma_peak(threads, iters, ctypes.byref(sink)) for _ in range(repeats)]
    flops = 2 * 16 * 16 * iters * threads
    return {"GFLOP_s": flops / min(times) / 1e9, "median_GFLOP_s": flops / statistics.median(times) / 1e9,
            "threads": threads, "kernel": "C register-only float32 multiply-adds, -O3 -march=native, pthreads"}


def measure_int8_dot_peak(threads: int, iters: int = 2_000_000, repeats: int = 5) -> dict[str, Any] | None:
    """int8 multiply-adds per second (as 2 ops each) of register-only VNNI dot products: the roof of
    8- and 4-bit prompts, which round activations to int8; None without AVX-512 VNNI."""
    with tempfile.TemporaryDirectory(prefix="qwen2c-dot-") as tmp:
        lib = _compile_stream(Path(tmp))
        sink = ctypes.c_float()
        if lib.dot_peak(threads, iters // 10, ctypes.byref(sink)) < 0:  # also the warm-up
            return None
        times = [lib.dot_peak(threads, iters, ctypes.byref(sink)) for _ in range(repeats)]
    ops = 2 * 64 * 16 * iters * threads
    return {"GOP_s": ops / min(times) / 1e9, "median_GOP_s": ops / statistics.median(times) / 1e9,
            "threads": threads, "kernel": "C register-only vpdpbusd, -O3 -march=native, pthreads"}


def measure_limits(threads: int) -> dict[str, Any]:
    return {"bandwidth": measure_bandwidth(threads), "gemm": measure_gemm_peak(threads),
            "fma": measure_fma_peak(threads), "int8_dot": measure_int8_dot_peak(threads)}


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, the vector features that matter here, cores, caches."""
    info: dict[str, Any] = {"cpu": platform_cpu(), "threads_available": len(os.sched_getaffinity(0))}
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
        info["features"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
                                        "amx_int8") if f in flags]
        family = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("cpu family"))
        info["cpu_family"] = int(family)
    except (OSError, StopIteration, ValueError):
        pass
    caches = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(caches.glob("index*")) if caches.is_dir() else []:
        try:
            if (index / "level").read_text().strip() == "3":
                info["l3"] = (index / "size").read_text().strip()
        except OSError:
            pass
    try:
        info["memory_gib"] = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / (1 << 30), 1)
    except (OSError, ValueError):
        pass
    return info


def platform_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
