"""The GPU check: packed CUDA engines against PyTorch on the GPU they run on, in one call.

``tools/gpu_check.sh`` runs ``python -m qwen2c.gpu_check --pack PACK --out OUT`` on the lent GPU
machine, from a pack made by ``tools/prepare_gpu_check.sh`` (``qwen2c pack --no-weights``), so the
qwen2c that runs is the packed one. The steps, in the order of ``make_plan``:

1. ``reference``: transformers' cached decode agrees with a full forward (the parity reference is
   only as good as the installed transformers' cache handling).
2. ``bandwidth``: the card's copy bandwidth (a 2 GiB device-to-device copy, bytes read + written).
3. For each engine in the pack: ``weights`` (a seeded transformers model in the engine's config and
   dtype, made on the GPU, saved as the engine's model.safetensors: the compiled library does not
   depend on weight values, and that same model is the reference), ``load``, ``parity`` (step by
   step, routing for MoE), ``prefill`` (N tokens) and ``decode`` (new tokens after a prompt, batch
   1) timed for the engine and for transformers eager.
4. ``torch.compile``: the same prefill and decode through ``torch.compile(mode="max-autotune")``
   in a subprocess with a deadline (what the budget leaves), so a slow or failing compile is
   recorded, not fatal.
5. ``roofline``: weight bytes one decode token reads over the measured bandwidth: the floor of a
   decode step, and each contender's decode as a percentage of it.

Results go to OUT/results.json, rewritten after every step so a run cut short keeps what it had;
a table is printed last. ``--dry-run`` runs what needs no GPU here (the reference check, weights
made on the CPU and checked against each manifest, the engine loaded up to its first CUDA call
with TVM's runtime only) and plans the rest without touching CUDA.

The pieces the steps are made of (timing, the bandwidth copy, the roofline, seeded weights, the
torch.compile child) are in ``qwen2c/gpu_measure.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from . import engine_dir
from .errors import BackendUnavailableError, Qwen2cError, read_json_object
from .gpu_measure import (COMPILE_MODE, EAGER_DECODE_RUNS, PREFILL_RUNS, Sizes, agree, decode_rate, dynamic_cache,
                          json_default, rate, check_reference_cache, compile_worker, decode_weight_bytes,
                          environment, measure_bandwidth, roofline, run_compile_worker, save_weights, seeded_model,
                          time_engine_decode, time_runs, time_torch_decode, time_torch_prefill, tvm_runtime_check)
from .parity import check_parity, format_report, parity_prompt

COPY_BYTES = 2 << 30
DEFAULT_BUDGET_S = 440  # the device call's limit is 480 s; the rest is start-up and the copy back
END_RESERVE_S = 15  # kept back from torch.compile for the roofline and the last write
MIN_COMPILE_S = 45  # less than this left: torch.compile is skipped rather than started
RESULTS = "results.json"
# Steps --dry-run executes; every other step is planned only (it needs the GPU).
DRY_RUN_STEPS = ("reference", "weights", "load")


@dataclasses.dataclass
class _Engine:
    """One engine of the pack and what the steps have made for it so far."""

    name: str
    directory: Path
    manifest: dict[str, Any]
    model: Any = None  # the transformers reference, in the engine's dtype
    engine: Any = None  # the loaded qwen2c engine
    eager_tokens: list[int] | None = None  # transformers eager's greedy decode, to compare the others with
    broken: str | None = None  # why the remaining steps are skipped


def make_plan(engines: list[_Engine], sizes: Sizes) -> list[dict[str, Any]]:
    """Every step of the check, in the order it runs."""
    plan: list[dict[str, Any]] = [{"step": "reference"}, {"step": "bandwidth", "bytes": COPY_BYTES}]
    for e in engines:
        plan += [
            {"step": "weights", "engine": e.name},
            {"step": "load", "engine": e.name},
            {"step": "parity", "engine": e.name, "routing": bool(e.manifest.get("moe"))},
            *({"step": "prefill", "engine": e.name, "tokens": n, "contenders": ["engine", "eager"]}
              for n in sizes.prefill),
            {"step": "decode", "engine": e.name, "prompt": sizes.prompt, "new_tokens": sizes.new_tokens,
             "contenders": ["engine", "eager"]},
        ]
    plan += [{"step": "torch.compile", "engine": e.name, "mode": COMPILE_MODE,
              "measures": ["decode", *(f"prefill {n}" for n in sizes.prefill)]} for e in engines]
    plan += [{"step": "roofline", "engine": e.name,
              "weight_bytes_per_token": decode_weight_bytes(e.manifest["model"]["config"], e.manifest["dtype"])}
             for e in engines]
    return plan


class GpuCheck:
    """Runs the plan over a pack's engines and keeps the results (see the module docstring)."""

    def __init__(self, pack: Path, out: Path, sizes: Sizes, dry_run: bool = False, budget_s: float = DEFAULT_BUDGET_S,
                 seed: int = 0, device: str = "cuda"):
        """``device``: the kind the engines run on, and where the reference runs (a dry run: the CPU)."""
        self.pack, self.out, self.sizes, self.dry_run, self.seed = pack, out, sizes, dry_run, seed
        self.device = "cpu" if dry_run else device
        self.deadline = time.monotonic() + budget_s
        self.start = time.monotonic()
        if self.device == "cuda" and not torch.cuda.is_available():
            raise Qwen2cError("PyTorch sees no CUDA device here: run on the GPU machine, or pass --dry-run.")
        self.info = read_json_object(pack / "pack.json", Qwen2cError)
        if not dry_run and self.info["python"] != _python_version():
            raise Qwen2cError(f"{pack} is packed for Python {self.info['python']} and this is {_python_version()}: "
                              "its tvm_ffi would not import. Pack again with --python " + _python_version() + ".")
        self.engines = {e.name: e for e in _pack_engines(pack, self.info, sizes, device)}
        self.results: dict[str, Any] = {
            "mode": "dry-run" if dry_run else "gpu",
            "pack": {"path": str(pack), "python": self.info["python"], "versions": self.info["versions"]},
            "sizes": dataclasses.asdict(sizes),
            "environment": environment(self.device),
            "plan": make_plan(list(self.engines.values()), sizes),
            "engines": {name: {"model": _model_summary(e.manifest), "launches": e.manifest.get("launches")}
                        for name, e in self.engines.items()},
            "errors": [],
            "skipped": [],
        }

    def run(self) -> int:
        """Every step of the plan; 0 when all ran and parity passed, 3 on a parity failure, 1 on errors."""
        self.out.mkdir(parents=True, exist_ok=True)
        for step in self.results["plan"]:
            self._run_step(step)
            self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
            self._write()
        parity = [r.get("parity") for r in self.results["engines"].values()]
        if any(isinstance(p, dict) and not p["passed"] for p in parity):
            return 3
        return 1 if self.results["errors"] else 0

    def _run_step(self, step: dict[str, Any]) -> None:
        e = self.engines.get(step.get("engine", ""))
        if self.dry_run and step["step"] not in DRY_RUN_STEPS:
            return
        if e is not None and e.broken:
            self.results["skipped"].append({**step, "reason": e.broken})
            return
        self.say(step["step"] + (f" {e.name}" if e else ""))
        try:
            getattr(self, "_" + step["step"].replace(".", "_"))(step, e)
        except Exception as err:  # one failing step must not cost the rest of the lease
            traceback.print_exc()
            self.results["errors"].append({**step, "error": f"{type(err).__name__}: {err}"})
            if e is not None and step["step"] in ("weights", "load"):
                e.broken = f"{step['step']} failed"

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)

    def _write(self) -> None:
        tmp = self.out / f".{RESULTS}.tmp"
        tmp.write_text(json.dumps(self.results, indent=2, default=json_default) + "\n")
        os.replace(tmp, self.out / RESULTS)

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    # -- steps -------------------------------------------------------------------------------

    def _reference(self, step, _e) -> None:
        self.results["reference"] = check_reference_cache(self.device)
        if not self.results["reference"]["passed"]:
            raise Qwen2cError("transformers' cached decode disagrees with its full forward: parity's reference is "
                              f"wrong with this transformers ({self.results['reference']})")

    def _bandwidth(self, step, _e) -> None:
        self.results["bandwidth"] = measure_bandwidth(step["bytes"])

    def _weights(self, step, e: _Engine) -> None:
        if engine_dir.WEIGHTS in e.manifest["files"]:
            raise Qwen2cError(f"{e.directory}: carries its own weights; the GPU check makes them from a seed, so "
                              "pack the engine with --no-weights.")
        if self.dry_run:  # the pack stays as it is: weights go beside links to the engine's files
            e.directory = _staged_copy(e.directory, self.out / "dry-run-engines" / e.name)
        e.model = seeded_model(e.manifest["model"]["config"], e.manifest["dtype"], self.device, self.seed)
        saved = save_weights(e.model, e.manifest, e.directory / engine_dir.WEIGHTS)
        engine_dir.read_manifest(e.directory)  # the loader's own check: every expected tensor, dtype, shape
        self.results["engines"][e.name]["weights"] = {**saved, "seed": self.seed, "device": self.device,
                                                      "matches_manifest": True}

    def _load(self, step, e: _Engine) -> None:
        import qwen2c

        result: dict[str, Any] = {}
        if self.dry_run and self.info["python"] != _python_version():
            result["stopped"] = (f"not loaded: the pack is for Python {self.info['python']} and this is "
                                 f"{_python_version()} (its tvm_ffi core would not import)")
        elif self.dry_run:
            try:
                qwen2c.load(e.directory)
                raise Qwen2cError("the engine opened on a machine without a GPU; the dry run expected it not to")
            except BackendUnavailableError as err:  # as far as a machine without a GPU goes
                result["stopped"] = f"at the first CUDA call, as expected here: {err}"
            result["tvm"] = tvm_runtime_check(self.pack / "site")
        else:
            start = time.perf_counter()
            e.engine = qwen2c.load(e.directory)
            result["seconds"] = round(time.perf_counter() - start, 2)
            result["tvm"] = tvm_runtime_check(self.pack / "site")
        self.results["engines"][e.name]["load"] = result
        tvm_check = result.get("tvm")
        if tvm_check and not tvm_check["passed"]:
            raise Qwen2cError(f"TVM did not run from the pack's runtime alone: {tvm_check}")

    def _parity(self, step, e: _Engine) -> None:
        if not self.results.get("reference", {}).get("passed"):
            raise Qwen2cError("not run: the reference itself failed its check (see 'reference')")
        report = check_parity(e.engine, e.model, e.manifest["dtype"])
        self.say(format_report(report))
        self.results["engines"][e.name]["parity"] = report

    def _prefill(self, step, e: _Engine) -> None:
        ids = parity_prompt(e.engine.vocab_size, step["tokens"], seed=1)
        engine_t, _ = time_runs(lambda session: session.prefill(ids), e.engine.session, *PREFILL_RUNS, self._sync)
        eager_t = time_torch_prefill(e.model, ids, *PREFILL_RUNS)
        timings = {"engine": rate(engine_t, len(ids)), "eager": rate(eager_t, len(ids))}
        self.results["engines"][e.name].setdefault("prefill", {})[str(step["tokens"])] = timings

    def _decode(self, step, e: _Engine) -> None:
        prompt = parity_prompt(e.engine.vocab_size, step["prompt"], seed=1)
        engine_t, engine_tokens = time_engine_decode(e.engine, prompt, step["new_tokens"], self._sync)
        eager_t, e.eager_tokens = time_torch_decode(e.model, e.model, dynamic_cache(e.model), prompt,
                                                    step["new_tokens"], EAGER_DECODE_RUNS)
        self.results["engines"][e.name]["decode"] = {
            "engine": {**decode_rate(engine_t, step["new_tokens"]),
                       "agrees_with_eager_for": agree(engine_tokens, e.eager_tokens)},
            "eager": decode_rate(eager_t, step["new_tokens"]),
        }

    def _torch_compile(self, step, e: _Engine) -> None:
        timeout = self.deadline - time.monotonic() - END_RESERVE_S
        if timeout < MIN_COMPILE_S:
            self.results["skipped"].append({**step, "reason": f"{timeout + END_RESERVE_S:.0f} s of the budget left"})
            return
        result = run_compile_worker(e.directory, self.sizes, self.out, e.name, timeout)
        record = self.results["engines"][e.name]
        decode = result.pop("decode", None)
        if decode is not None:
            tokens = decode.pop("tokens")
            record.setdefault("decode", {})["torch.compile"] = {**decode,
                                                               "agrees_with_eager_for": agree(tokens, e.eager_tokens)}
        for n in self.sizes.prefill:
            if f"prefill {n}" in result:
                record.setdefault("prefill", {}).setdefault(str(n), {})["torch.compile"] = result.pop(f"prefill {n}")
        record["torch.compile"] = result  # a failed or cut-short compile is a result, not an error of the check

    def _roofline(self, step, e: _Engine) -> None:
        record = self.results["engines"][e.name]
        bandwidth = self.results.get("bandwidth")
        if bandwidth is None or "decode" not in record:
            raise Qwen2cError("no bandwidth or decode measurement to compare")
        record["roofline"] = roofline(e.manifest["model"]["config"], e.manifest["dtype"], bandwidth["GB_s"],
                                      {k: v["ms_per_token"] for k, v in record["decode"].items()})


# -- the pack's engines ---------------------------------------------------------------------


def _pack_engines(pack: Path, info: dict[str, Any], sizes: Sizes, device: str) -> list[_Engine]:
    """The pack's engines, as pack.json lists them; each must run on ``device`` and fit the sizes."""
    engines = []
    for entry in info.get("engines", []):
        directory = pack / "engines" / entry["name"]
        manifest = engine_dir.read_manifest(directory, verify=False)
        if manifest["target"]["device"] != device:
            raise Qwen2cError(f"{directory}: a {manifest['target']['name']} engine; this check runs {device} engines.")
        sizes.check(entry["name"], manifest["max_context"])
        engines.append(_Engine(entry["name"], directory, manifest))
    if not engines:
        raise Qwen2cError(f"{pack}/pack.json lists no engines.")
    return engines


def _model_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    return {"source": manifest["model"]["source"], "dtype": manifest["dtype"],
            "parameters": manifest["model"]["parameters"], "max_context": manifest["max_context"],
            "moe": manifest.get("moe"), "target": manifest["target"]}


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _staged_copy(source: Path, dest: Path) -> Path:
    """``dest`` holding links to ``source``'s files: an engine folder to add weights to, leaving ``source`` as is."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        link = dest / f.name
        if f.name != engine_dir.WEIGHTS and not link.exists():
            link.symlink_to(f.resolve())
    return dest


# -- output ----------------------------------------------------------------------------------


def format_plan(plan: list[dict[str, Any]]) -> str:
    lines = ["plan:"]
    for s in plan:
        detail = {k: v for k, v in s.items() if k not in ("step", "engine")}
        lines.append(f"  {s['step']:<13} {s.get('engine', ''):<16} {json.dumps(detail) if detail else ''}".rstrip())
    return "\n".join(lines)


def format_table(results: dict[str, Any]) -> str:
    """The summary printed last (the device call's reply shows only the end of the output)."""
    env, bw = results["environment"], results.get("bandwidth")
    gpu = env.get("gpu", {}).get("name", "no GPU")
    lines = [f"GPU check ({results['mode']}): {gpu}; torch {env['torch']}, transformers {env['transformers']}; "
             + (f"copy bandwidth {bw['GB_s']:.0f} GB/s; " if bw else "") + f"{results.get('elapsed_s', 0):.0f} s"]
    for name, r in results["engines"].items():
        m = r["model"]
        lines.append(f"{name} ({m['dtype']}, {m['parameters'] / 1e6:.1f}M parameters)")
        if r.get("launches"):  # as the build counted them: kernels, CUDA-graph replays, host launches
            counts = ", ".join(f"{k} {v}" for k, v in r["launches"].items() if k != "function")
            lines.append(f"  engine decode step: {counts}")
        if "weights" in r:
            lines.append(f"  weights: {r['weights']['tensors']} tensors, {r['weights']['bytes'] / 1e6:.1f} MB, "
                         "match the manifest")
        if "load" in r and "stopped" in r["load"]:
            lines.append(f"  load: {r['load']['stopped']}")
        if "parity" in r:
            p, routing = r["parity"], r["parity"].get("routing")
            routed = (f", routing {routing['agree']}/{routing['choices']}{'' if routing['passed'] else ' FAIL'}"
                      if routing else "")
            lines.append(f"  parity: {'PASS' if p['passed'] else 'FAIL'} (max abs err {p['max_abs_err']:.3g}, "
                         f"greedy {p['greedy_agreement']}{routed})")
        for n, t in r.get("prefill", {}).items():
            lines.append(f"  prefill {n:>5} tok/s: " + "  ".join(f"{k} {v['tok_s']:,.0f}" for k, v in t.items()))
        roof = r.get("roofline", {}).get("percent_of_roofline", {})
        for k, v in r.get("decode", {}).items():
            if isinstance(v, dict):
                lines.append(f"  decode {k:>13}: {v['ms_per_token']:7.3f} ms/token {v['tok_s']:8.1f} tok/s"
                             + (f"  {roof[k]:5.1f}% of roofline" if k in roof else ""))
        if "roofline" in r:
            rf = r["roofline"]
            lines.append(f"  roofline: {rf['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token -> "
                         f"floor {rf['floor_ms_per_token']:.3f} ms/token")
        if r.get("torch.compile", {}).get("error"):
            lines.append(f"  torch.compile: {r['torch.compile']['error'][:300]}")
    for s in results["skipped"]:
        lines.append(f"skipped: {s['step']} {s.get('engine', '')}: {s['reason']}")
    for e in results["errors"]:
        lines.append(f"ERROR: {e['step']} {e.get('engine', '')}: {e['error'][:300]}")
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qwen2c.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", type=Path, help="a folder made by `qwen2c pack --no-weights` holding CUDA engines")
    p.add_argument("--out", type=Path, required=True, help=f"folder for {RESULTS} and the torch.compile logs")
    p.add_argument("--dry-run", action="store_true", help="run what needs no GPU, plan the rest; never touch CUDA")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds the whole check may take")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights made for each engine")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt before the timed decode steps")
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps timed")
    p.add_argument("--prefill-tokens", default="128,1024", help="prompt lengths timed for prefill, comma-separated")
    p.add_argument("--compile-worker", type=Path, help=argparse.SUPPRESS)  # the child run_compile_worker starts
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        sizes = Sizes(args.prompt_tokens, args.new_tokens, tuple(int(n) for n in args.prefill_tokens.split(",")))
    except ValueError:
        print(f"--prefill-tokens {args.prefill_tokens!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    if args.compile_worker:
        compile_worker(args.compile_worker, args.out, sizes)
        return 0
    if args.pack is None:
        print("--pack is required", file=sys.stderr)
        return 2
    try:
        _check_runs_from_pack(args.pack)
        check = GpuCheck(args.pack, args.out, sizes, args.dry_run, args.budget_s, args.seed)
    except Qwen2cError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return e.exit_code
    check.say(format_plan(check.results["plan"]))
    code = check.run()
    print(format_table(check.results))
    print(f"results: {args.out / RESULTS}")
    return code


def _check_runs_from_pack(pack: Path) -> None:
    """The check is of the packed qwen2c: refuse to run another copy (env.sh sets PYTHONPATH)."""
    import qwen2c

    site = (pack / "site").resolve()
    if not Path(qwen2c.__file__).resolve().is_relative_to(site):
        raise Qwen2cError(f"qwen2c was imported from {Path(qwen2c.__file__).parent}, not from {site}: "
                          f"`source {pack}/env.sh` first, so the packed copy is the one checked.")


if __name__ == "__main__":
    sys.exit(main())
