"""The building blocks of the GPU check (qwen2c/gpu_check.py), each knowing nothing of its plan:
timing (CUDA events for the copy, synchronised wall time for the contenders), the copy bandwidth,
roofline arithmetic, seeded weights and the reference's own check, the environment and TVM runtime
checks, and the torch.compile child process with its deadline.

The child is started as ``python -m qwen2c.gpu_check --compile-worker ENGINE ...``: the check's
command line parses its sizes and hands them to ``compile_worker`` here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import engine_dir
from .checkpoint import TORCH_DTYPES, hf_config, load_reference, resolve_model
from .errors import Qwen2cError
from .memory import DTYPE_BYTES
from .model_config import MODEL_CLASSES, active_param_count, is_moe
from .parity import cache_kwargs, parity_prompt, reference_steps

COMPILE_MODE = "max-autotune"
# (warm-up runs, timed runs) per measurement: fewer where one run is long.
PREFILL_RUNS = (2, 10)
ENGINE_DECODE_RUNS = (1, 5)
EAGER_DECODE_RUNS = (1, 3)
COMPILED_DECODE_RUNS = (2, 5)  # the first compiles, the second records the CUDA graphs


@dataclasses.dataclass(frozen=True)
class Sizes:
    prompt: int  # decode starts after a prompt this long
    new_tokens: int  # decode steps timed
    prefill: tuple[int, ...]  # prompt lengths timed for prefill

    def check(self, name: str, max_context: int) -> None:
        need = max(self.prompt + self.new_tokens, *self.prefill)
        if need > max_context:
            raise Qwen2cError(f"engines/{name}: the check needs {need} tokens of context and the engine serves "
                              f"{max_context}; rebuild it with --max-context {need} or more.")



def environment(device: str) -> dict[str, Any]:
    """Versions, and on the GPU the card this ran on."""
    import transformers

    import qwen2c

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "numpy": np.__version__,
                           "qwen2c": str(Path(qwen2c.__file__).parent)}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                      "memory_gib": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return env


def tvm_runtime_check(site: Path) -> dict[str, Any]:
    """Whether TVM came from the pack, with its CUDA runtime library, and left its compiler library
    unmapped (runtime only)."""
    import tvm

    maps = Path("/proc/self/maps").read_text()
    package = Path(tvm.__file__).resolve().parent
    checks = {"from_pack": package.is_relative_to(site.resolve()), "compiler_unmapped": "libtvm_compiler" not in maps,
              "runtime_mapped": "libtvm_runtime.so" in maps,
              "cuda_runtime_present": (package / "lib" / "libtvm_runtime_cuda.so").is_file()}
    return {"tvm": str(package), **checks, "passed": all(checks.values())}


def check_reference_cache(device: str, steps: int = 3) -> dict[str, Any]:
    """parity.reference_steps (decode through the KV cache) against one forward over the whole sequence,
    on a tiny float32 Qwen2: they agree when this transformers honours the cache as parity passes it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2)).eval()
    prompt = parity_prompt(256, 8)
    stepped, fed, _ = reference_steps(model, prompt, steps)
    with torch.no_grad():
        full = model(input_ids=torch.tensor([prompt + fed], device=device)).logits[0, len(prompt) - 1:]
    full = full.float().cpu().numpy()
    err = float(max(np.abs(s - f).max() for s, f in zip(stepped, full)))
    return {"max_abs_err": err, "passed": err < 1e-3}


def seeded_model(config: dict[str, Any], dtype: str, device: str, seed: int):
    """A transformers model for ``config`` in ``dtype``, with weights drawn from ``seed`` on ``device``.

    As tests/conftest.py does for its checkpoints: biases and norm weights are perturbed
    (transformers starts them at 0 and 1, which would hide a kernel that drops them), and MoE routers
    scaled up so routing is decisive (near zero, every expert is about equally likely and rounding
    would choose).
    """
    import transformers

    hf = hf_config(config)
    model_class = getattr(transformers, MODEL_CLASSES[config["model_type"]][1])
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(TORCH_DTYPES[dtype])  # drawn in the dtype: no float32 copy to convert
    try:
        with torch.device(device):
            model = model_class(hf)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_moe(hf) and name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 3.0 / hf.hidden_size**0.5)
            elif name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_weights(model, manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    """Save the tensors the engine's manifest names (tied weights once, under the key it gives)."""
    from safetensors.torch import save_file

    state = model.state_dict()
    keys = list(dict.fromkeys(p["key"] for p in manifest["params"]))
    missing = [k for k in keys if k not in state]
    if missing:
        raise Qwen2cError(f"{path.parent}: the manifest names weights this transformers' model lacks: "
                          f"{', '.join(missing[:5])}")
    save_file({k: state[k].detach().contiguous() for k in keys}, str(path), metadata={"format": "pt"})
    return {"file": str(path), "tensors": len(keys), "bytes": path.stat().st_size}


def measure_bandwidth(nbytes: int, warmup: int = 3, repeats: int = 20) -> dict[str, Any]:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (median, CUDA events)."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")  # not zeros: see METHOD.md
    dst = torch.empty_like(src)
    times = []
    for i in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    median = statistics.median(times)
    return {"bytes_moved": 2 * nbytes, "median_ms": median * 1e3, "min_ms": min(times) * 1e3,
            "GB_s": 2 * nbytes / median / 1e9, "repeats": repeats}


def time_runs(run: Callable[[Any], Any], setup: Callable[[], Any] | None, warmup: int, repeats: int,
              sync: Callable[[], None]) -> tuple[dict[str, Any], Any]:
    """Median wall time of ``run(setup())`` (``setup`` untimed), synchronised on both sides; and the last
    run's result."""
    times, result = [], None
    for i in range(warmup + repeats):
        state = setup() if setup else None
        sync()
        start = time.perf_counter()
        result = run(state)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "warmup": warmup, "repeats": repeats}, result


def _torch_sync(model) -> Callable[[], None]:
    return torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)


def dynamic_cache(model) -> Callable[[], Any]:
    from transformers import DynamicCache

    return lambda: DynamicCache(config=model.config)


def time_torch_prefill(forward, ids: list[int], warmup: int, repeats: int,
                       step_begin: Callable[[], None] | None = None) -> dict[str, Any]:
    """A transformers prefill, last position's logits only; no KV cache is kept (its writes are a
    negligible part of a prefill, and a compiled graph then needs no cache object)."""
    model = getattr(forward, "_orig_mod", forward)
    t = torch.tensor([ids], device=next(model.parameters()).device)

    def run(_):
        if step_begin:
            step_begin()
        return forward(input_ids=t, use_cache=False, logits_to_keep=1)

    with torch.no_grad():
        timing, _ = time_runs(run, None, warmup, repeats, _torch_sync(model))
    return timing


def time_torch_decode(model, forward, new_cache: Callable[[], Any], prompt: list[int], steps: int,
                      runs: tuple[int, int],
                      step_begin: Callable[[], None] | None = None) -> tuple[dict[str, Any], list[int]]:
    """``steps`` greedy decode steps through ``forward`` after an (untimed, eager) prefill of ``prompt``;
    the greedy token stays on the device. Returns the timing and the tokens fed."""
    device = next(model.parameters()).device

    def setup():
        cache = new_cache()
        out = model(input_ids=torch.tensor([prompt], device=device), **cache_kwargs(model, cache), use_cache=True,
                    logits_to_keep=1)
        return cache, out.logits[:, -1].argmax(-1, keepdim=True)

    def run(state):
        cache, token = state
        kwargs = cache_kwargs(model, cache)
        tokens = []
        for _ in range(steps):
            if step_begin:
                step_begin()
            logits = forward(input_ids=token, **kwargs, use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        return tokens

    with torch.no_grad():
        timing, tokens = time_runs(run, setup, *runs, _torch_sync(model))
    return timing, [int(t) for t in torch.cat(tokens).reshape(-1).tolist()]


def time_engine_decode(engine, prompt: list[int], steps: int, sync) -> tuple[dict[str, Any], list[int]]:
    """``steps`` greedy decode steps of a qwen2c engine after an untimed prefill of ``prompt``."""

    def setup():
        session = engine.session()
        return session, int(np.argmax(session.prefill(prompt)))

    def run(state):
        session, token = state
        tokens = []
        for _ in range(steps):
            token = int(np.argmax(session.decode(token)))
            tokens.append(token)
        return tokens

    return time_runs(run, setup, *ENGINE_DECODE_RUNS, sync)


def rate(timing: dict[str, Any], tokens: int) -> dict[str, Any]:
    return {"tok_s": tokens / timing["median_s"], **timing}


def decode_rate(timing: dict[str, Any], steps: int) -> dict[str, Any]:
    return {"ms_per_token": 1e3 * timing["median_s"] / steps, "tok_s": steps / timing["median_s"], **timing}


def agree(tokens: list[int] | None, reference: list[int] | None) -> int | None:
    """How many leading greedy tokens equal the reference's (random weights make near-ties common:
    a sanity signal, not a verdict)."""
    if tokens is None or reference is None:
        return None
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def decode_weight_bytes(config: dict[str, Any], dtype: str) -> int:
    """Weight bytes one decode token reads: the parameters it uses (MoE: its routed experts only),
    less the input embedding table when it is not tied to the output projection (a token reads one
    row of it). The KV cache is left out: at these lengths it is well under 1% of the weights."""
    hf = hf_config(config)
    params = active_param_count(hf)
    if not hf.tie_word_embeddings:
        params -= hf.vocab_size * hf.hidden_size
    return params * DTYPE_BYTES[dtype]


def roofline(config: dict[str, Any], dtype: str, gb_s: float, ms_per_token: dict[str, float]) -> dict[str, Any]:
    """The bandwidth floor of a decode step and each contender's decode as a percentage of it."""
    nbytes = decode_weight_bytes(config, dtype)
    floor_ms = nbytes / (gb_s * 1e9) * 1e3
    return {"weight_bytes_per_token": nbytes, "bandwidth_GB_s": gb_s, "floor_ms_per_token": floor_ms,
            "percent_of_roofline": {k: 100 * floor_ms / ms for k, ms in ms_per_token.items()}}


# -- torch.compile, in a subprocess with a deadline ------------------------------------------


def run_compile_worker(engine: Path, sizes: Sizes, out: Path, name: str, timeout: float) -> dict[str, Any]:
    """Time torch.compile on ``engine``'s weights in a child process killed at ``timeout`` seconds;
    what it measured before then is kept. Its log goes to OUT/compile-NAME.log."""
    result_file, log_file = out / f".compile-{name}.json", out / f"compile-{name}.log"
    result_file.unlink(missing_ok=True)
    # -P: the child imports the same (packed) qwen2c, not one in its working folder.
    cmd = [sys.executable, "-P", "-m", "qwen2c.gpu_check", "--compile-worker", str(engine), "--out", str(result_file),
           "--prompt-tokens", str(sizes.prompt), "--new-tokens", str(sizes.new_tokens),
           "--prefill-tokens", ",".join(map(str, sizes.prefill))]
    start = time.monotonic()
    with open(log_file, "w") as log:
        # Its own process group: inductor's compile workers go with it when the deadline kills it.
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    result_file.unlink(missing_ok=True)
    result.update({"seconds": round(time.monotonic() - start, 1), "timeout_s": round(timeout), "log": log_file.name})
    if child.returncode != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
        reason = f"killed at the {timeout:.0f} s deadline" if child.returncode == -signal.SIGKILL else \
            f"exit code {child.returncode}"
        result["error"] = f"{reason}; log tail: {' | '.join(tail)}"
    return result


def compile_worker(engine: Path, out: Path, sizes: Sizes, mode: str = COMPILE_MODE, device: str = "cuda") -> None:
    """In the child: torch.compile(mode) decode (a StaticCache, CUDA graphs) and prefill timings on the
    engine's weights, each written to ``out`` as soon as it is measured."""
    from transformers import StaticCache

    manifest = engine_dir.read_manifest(engine, verify=False)
    _, model = load_reference(resolve_model(str(engine)), manifest["dtype"], copies=1.2)
    model.to(device)
    compiled = torch.compile(model, mode=mode, dynamic=False)
    results: dict[str, Any] = {"mode": mode}
    vocab = manifest["model"]["config"]["vocab_size"]
    prompt = parity_prompt(vocab, sizes.prompt, seed=1)
    cache = StaticCache(config=model.config, max_cache_len=sizes.prompt + sizes.new_tokens)

    def reset_cache():
        cache.reset()  # in place: a CUDA graph keeps the cache's addresses
        return cache

    start = time.monotonic()
    timing, tokens = time_torch_decode(model, compiled, reset_cache, prompt, sizes.new_tokens, COMPILED_DECODE_RUNS,
                                       step_begin=torch.compiler.cudagraph_mark_step_begin)
    results["decode"] = {**decode_rate(timing, sizes.new_tokens), "tokens": tokens,
                         "with_compile_s": round(time.monotonic() - start, 1)}
    _write_json(out, results)
    for n in sizes.prefill:
        start = time.monotonic()
        timing = time_torch_prefill(compiled, parity_prompt(vocab, n, seed=1), *PREFILL_RUNS,
                                    step_begin=torch.compiler.cudagraph_mark_step_begin)
        results[f"prefill {n}"] = {**rate(timing, n), "with_compile_s": round(time.monotonic() - start, 1)}
        _write_json(out, results)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, default=json_default))
    os.replace(tmp, path)


def json_default(value: Any) -> Any:
    """NumPy scalars as Python numbers: a stray one must not cost a lease's results."""
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
