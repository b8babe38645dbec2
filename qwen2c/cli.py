"""The ``qwen2c`` command line: build, run, verify."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import Qwen2cError

log = logging.getLogger("qwen2c")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen2c", description="Compile Qwen2 models into verified engines.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build an engine directory from a checkpoint or preset",
                       description="Export, rewrite, compile and check a Qwen2 model; write an engine directory.")
    b.add_argument("--model", required=True,
                   help="checkpoint directory (config.json + *.safetensors) or preset: qwen2-tiny, qwen2-0.5b, "
                        "qwen2-1.5b, qwen2-7b, qwen2-72b, qwen2-moe-tiny, qwen2-57b-a14b")
    b.add_argument("--target", default="llvm",
                   help="compile target (default: llvm, this machine's CPU; cuda, rocm, metal, opencl, ...: "
                        "`qwen2c targets` lists them)")
    b.add_argument("--arch", default=None,
                   help="GPU architectures, comma-separated (cuda: sm_75, sm_80, sm_86, sm_89, sm_90, default sm_90, "
                        "several go into one fatbin; rocm: gfx90a, gfx942)")
    b.add_argument("--backend", default=None,
                   help="backend where the target has several: tvm (default), onnxruntime (llvm, cuda), "
                        "tensorrt (cuda)")
    b.add_argument("-o", "--output", required=True, help="engine directory to create")
    b.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="weight and activation dtype (default: float32 on CPUs; on GPUs the checkpoint's, "
                        "bfloat16 for presets)")
    b.add_argument("--max-context", type=int, default=None, help="longest sequence the engine serves (default 4096)")
    b.add_argument("--parity-steps", type=int, default=8, help="decode steps compared with transformers (default 8)")
    b.add_argument("--force", action="store_true", help="replace an existing engine (only once the new one is complete)")
    b.add_argument("--moe-dispatch", choices=("sparse", "dense"), default="sparse",
                   help="MoE models: 'sparse' runs each token's routed experts only (default); 'dense' runs every "
                        "expert on every token (a baseline for benchmarks)")

    x = sub.add_parser("export-onnx", help="the fused ONNX of a model, for your own runtime",
                       description="Trace, rewrite and export a model to ONNX (opset 23): each fused op one node, "
                                   "the KV cache as past/present inputs and outputs.")
    x.add_argument("--model", required=True, help="checkpoint directory or preset")
    x.add_argument("-o", "--output", required=True, help="folder to create")
    x.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    x.add_argument("--max-context", type=int, default=None, help="longest sequence (RoPE tables); default 4096")
    x.add_argument("--ops", default="onnxruntime", choices=("onnxruntime", "standard"),
                   help="onnxruntime: GroupQueryAttention and MoE contrib ops (default); standard: opset-23 "
                        "RotaryEmbedding + Attention (what TensorRT parses)")
    x.add_argument("--force", action="store_true", help="replace an existing export (only once the new one is complete)")

    i = sub.add_parser("inspect", help="trace and rewrite a model at full size without loading weights",
                       description="Export a model on meta tensors (no memory for weights), run the graph passes "
                                   "and report what they fused and the shapes the rewritten program produces.")
    i.add_argument("--model", required=True, help="checkpoint directory or preset (any size)")
    i.add_argument("--max-context", type=int, default=4096)

    r = sub.add_parser("run", help="generate tokens with an engine", description="Greedy generation with an engine.")
    r.add_argument("engine", help="engine directory")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--prompt", help="prompt text (the engine must carry a tokenizer)")
    r.add_argument("--max-new-tokens", type=int, default=16)

    v = sub.add_parser("verify", help="check an engine against the transformers reference",
                       description="Re-run the parity check of an engine against transformers on its own weights.")
    v.add_argument("engine", nargs="+", help="engine directory; two engines of one model (e.g. tvm and onnxruntime) "
                                             "are also compared with each other")
    v.add_argument("--decode-steps", type=int, default=8)
    v.add_argument("--no-record", action="store_true",
                   help="do not write the result into the engine's manifest (default: record it)")
    be = sub.add_parser("bench", help="engine vs transformers eager, same weights and threads",
                        description="Measure prefill and decode tokens/s of an engine and of transformers eager.")
    be.add_argument("engine", nargs="+", help="engine directory; with two engines of one model, both side by side")
    be.add_argument("--prompt-tokens", type=int, default=128)
    be.add_argument("--decode-tokens", type=int, default=32)
    be.add_argument("--repeats", type=int, default=3)
    be.add_argument("--dense-experts", action="store_true",
                    help="MoE engines: compare with the same model built to run all experts on every token")
    pk = sub.add_parser("pack", help="one folder that runs engines where TVM is not installed",
                        description="Copy engines, qwen2c, TVM's runtime (not its compiler) and tvm_ffi for a given "
                                    "Python into one folder that runs them offline, with numpy (and torch, "
                                    "transformers for verify); `. DIR/env.sh` sets it up.")
    pk.add_argument("engines", nargs="+", metavar="ENGINE", help="engine directories")
    pk.add_argument("-o", "--output", required=True, help="folder to create")
    pk.add_argument("--python", default=None,
                    help="X.Y version of the Python that will run it (default: this one); another version fetches "
                         "tvm_ffi's wheel for it once")
    pk.add_argument("--no-weights", action="store_true",
                    help="leave out the weights; a model.safetensors with the tensors the manifest expects is "
                         "supplied later")
    pk.add_argument("--no-tokenizer", action="store_true", help="leave out the tokenizer files")
    pk.add_argument("--force", action="store_true", help="replace an existing pack (only once the new one is complete)")
    t = sub.add_parser("targets", help="list the targets and what this machine can do for each",
                       description="For every registered target: 'build and run', 'build' (engines run elsewhere) "
                                   "or 'neither', with the reason, from the same checks a build makes.")
    t.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"build": _build, "export-onnx": _export_onnx, "inspect": _inspect, "run": _run, "verify": _verify, "bench": _bench,
                "pack": _pack, "targets": _targets}[args.command](args)
    except Qwen2cError as e:
        print(f"qwen2c {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except ValueError as e:  # invalid user input caught by the runtime (token ids, lengths)
        print(f"qwen2c {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qwen2c {args.command}: interrupted; nothing was left half-written.", file=sys.stderr)
        return 130


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _build(args) -> int:
    from .builder import build

    manifest = build(args.model, args.target, args.output, dtype=args.dtype, max_context=args.max_context,
                     force=args.force, parity_steps=args.parity_steps, moe_dispatch=args.moe_dispatch,
                     arch=args.arch, progress=_progress, backend=args.backend)
    parity = manifest["parity"]
    status = "parity PASS" if isinstance(parity, dict) else f"parity {parity}"
    print(f"built {args.output} ({manifest['target']['name']}, {manifest['backend']}, {manifest['dtype']}, {status})")
    return 0


def _export_onnx(args) -> int:
    from .export_onnx import export_onnx_dir

    info = export_onnx_dir(args.model, args.output, dtype=args.dtype, max_context=args.max_context, op_set=args.ops,
                           force=args.force, progress=_progress)
    print(f"exported {args.output}: " + ", ".join(f"{k} {v}" for k, v in info["nodes"].items()))
    return 0


def _run(args) -> int:
    import time

    from .runtime import load

    engine = load(args.engine)
    if args.prompt is not None:
        ids = engine.tokenizer.encode(args.prompt)
    else:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise Qwen2cError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
    start = time.perf_counter()
    new = engine.generate(ids, max_new_tokens=args.max_new_tokens)
    elapsed = time.perf_counter() - start
    print(",".join(map(str, new)))
    if args.prompt is not None:
        print(engine.tokenizer.decode(new))
    _progress(f"{len(ids)} prompt + {len(new)} new tokens in {elapsed:.2f}s")
    return 0


def _verify(args) -> int:
    from .verify import verify

    if len(args.engine) > 2:
        raise Qwen2cError(f"verify takes one engine, or two to compare; got {len(args.engine)}.")
    if len(args.engine) == 2:
        from .compare import format_verify_pair, verify_pair

        result = verify_pair(*args.engine, decode_steps=args.decode_steps)
        print(format_verify_pair(result))
        return 0 if result["passed"] else 3
    report = verify(args.engine[0], decode_steps=args.decode_steps, record=not args.no_record)
    from .parity import format_report

    print(format_report(report))
    return 0 if report["passed"] else 3


def _inspect(args) -> int:
    from .inspect_graph import format_inspect, inspect_graph

    print(format_inspect(inspect_graph(args.model, args.max_context)))
    return 0


def _bench(args) -> int:
    from .bench import bench, bench_moe_dispatch, format_bench, format_moe_bench

    if len(args.engine) > 2 or (len(args.engine) == 2 and args.dense_experts):
        raise Qwen2cError("bench takes one engine, or two of one model to compare (without --dense-experts).")
    if len(args.engine) == 2:
        from .compare import bench_pair, format_bench_pair

        print(format_bench_pair(bench_pair(*args.engine, args.prompt_tokens, args.decode_tokens, args.repeats)))
        return 0
    engine = args.engine[0]
    if args.dense_experts:
        from .engine_dir import read_manifest

        if read_manifest(engine, verify=False).get("backend") != "tvm":
            raise Qwen2cError("--dense-experts rebuilds the engine with TVM's dense MoE dispatch; give a tvm engine.")
        result = bench_moe_dispatch(engine, args.prompt_tokens, args.decode_tokens, args.repeats, _progress)
        print(format_moe_bench(result))
        return 0
    print(format_bench(bench(engine, args.prompt_tokens, args.decode_tokens, args.repeats)))
    return 0


def _pack(args) -> int:
    from .pack import format_pack, pack

    summary = pack(args.engines, args.output, python=args.python, weights=not args.no_weights,
                   tokenizer=not args.no_tokenizer, force=args.force, progress=_progress)
    print(format_pack(summary, args.output))
    return 0


def _targets(args) -> int:
    from .target_support import format_support, target_support, to_json

    support = target_support()
    print(to_json(support) if args.json else format_support(support))
    return 0


if __name__ == "__main__":
    sys.exit(main())
