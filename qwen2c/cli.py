"""The ``qwen2c`` command line: build, run, verify.

Every option is checked before any work starts (types and ranges here, limits that depend on the
model or engine where those are read); every failure a user can cause is one line on stderr and
a non-zero exit (``EXIT_CODES``), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from . import __version__
from .args import cli_count as _count
from .errors import Qwen2cError

log = logging.getLogger("qwen2c")

EXIT_CODES = """exit codes:
  0    success
  1    internal error (a bug in qwen2c: please report it; --verbose shows the traceback)
  2    bad argument, model, checkpoint or engine (corrupt, edited, unsigned where trust was asked);
       unwritable output or full disk; missing backend or device
  3    parity failure: the engine disagrees with transformers (build, verify)
  130  interrupted (Ctrl-C); a build then publishes nothing and leaves nothing behind"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _context(text: str) -> int:
    """An argparse type: a context length (at least MIN_CONTEXT; the model's limit is checked later)."""
    from .args import MIN_CONTEXT

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < MIN_CONTEXT:
        raise argparse.ArgumentTypeError(
            f"{value} is below {MIN_CONTEXT}, the shortest context a build can compile and check")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qwen2c", description="Compile Qwen2 models into verified engines.", epilog=EXIT_CODES,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks of internal errors")
    p.add_argument("--version", action="version", version=f"qwen2c {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
    b.add_argument("--max-context", type=_context, default=None,
                   help="longest sequence the engine serves (default 4096; at least 8, at most the model's "
                        "max_position_embeddings)")
    b.add_argument("--parity-steps", type=_count, default=None,
                   help="decode steps compared with transformers (default 8; at most the context minus 2)")
    b.add_argument("--sign-key", default=None, metavar="KEY",
                   help="Ed25519 private key (PEM, `qwen2c keygen`) that signs the engine's manifest")
    b.add_argument("--force", action="store_true", help="replace an existing engine (only once the new one is complete)")
    b.add_argument("--moe-dispatch", choices=("sparse", "dense"), default="sparse",
                   help="MoE models: 'sparse' runs each token's routed experts only (default); 'dense' runs every "
                        "expert on every token (a baseline for benchmarks)")
    b.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="weight-only quantization: int8 or int4, symmetric, one float16 scale per group of inputs "
                        "(default none); the embedding, vocabulary projection and MoE experts included")
    b.add_argument("--group-size", type=int, default=None, choices=(32, 64),
                   help="inputs per quantization scale (default 32, as llama.cpp's Q8_0/Q4_0)")
    b.add_argument("--kv-cache-dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="the KV cache's element type (default auto: float16 for quantized float32 engines, as "
                        "llama.cpp keeps its cache, which halves what a long context's decode step reads; else "
                        "the engine's dtype); parity then allows the looser tolerance of the two")
    b.add_argument("--tuning-db", action="append", default=None, metavar="DIR",
                   help="tuning database (`qwen2c tune --db`) whose records for this target set kernel parameters; "
                        "repeatable (default: the records qwen2c ships, where the target matches)")
    b.add_argument("--no-tuning", action="store_true",
                   help="every kernel with its default parameters (no tuning records, not even the shipped ones)")

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
    i.add_argument("--max-context", type=_context, default=4096)

    r = sub.add_parser("run", help="generate tokens with an engine", description="Greedy generation with an engine.")
    r.add_argument("engine", help="engine directory")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--prompt", help="prompt text (the engine must carry a tokenizer)")
    r.add_argument("--max-new-tokens", type=_count, default=16,
                   help="tokens to generate (default 16); generation stops earlier at the engine's maximum context")
    r.add_argument("--trusted-key", action="append", default=None, metavar="PUBKEY",
                   help="refuse the engine unless this Ed25519 public key (PEM) signed it; repeatable")

    v = sub.add_parser("verify", help="check an engine against the transformers reference",
                       description="Re-run the parity check of an engine against transformers on its own weights.")
    v.add_argument("engine", nargs="+", help="engine directory; two engines of one model (e.g. tvm and onnxruntime) "
                                             "are also compared with each other (logits, greedy agreement)")
    v.add_argument("--decode-steps", type=_count, default=8, help="decode steps compared (default 8)")
    v.add_argument("--no-record", action="store_true",
                   help="do not write the result into the engine's manifest (default: record it)")
    v.add_argument("--trusted-key", action="append", default=None, metavar="PUBKEY",
                   help="refuse the engine unless this Ed25519 public key (PEM) signed it; repeatable")
    v.add_argument("--reference", default=None,
                   help="quantized engines: the float checkpoint (or preset) they were quantized from, when it is "
                        "no longer where the manifest's quantization.float_reference says")
    be = sub.add_parser("bench", help="an engine against its peers: prefill, decode, memory, vs this machine's limits",
                        description="Time engines (and with --compare transformers, torch.compile, ONNX Runtime and "
                                    "llama.cpp on the same weights), interleaved; a table, OUT/bench.json, OUT/bench.png.")
    from .bench.command import add_arguments as add_bench_arguments

    add_bench_arguments(be)
    tu = sub.add_parser("tune", help="tune an engine's kernels into a tuning database (and: merge, sweep)",
                        description="Measure parameter choices of qwen2c's kernels (and MetaSchedule schedules of TVM's "
                                    "TIR kernels) for a model and target; each measurement is recorded as it is made, "
                                    "so an interrupted run resumes. `qwen2c build --tuning-db DIR` applies them.")
    from qwen2c.autotune.command import add_arguments as add_tune_arguments

    add_tune_arguments(tu)
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
    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing engines",
                       description="Write a private key (PEM, readable by you only) for `build --sign-key` and its "
                                   "public key for `load(trusted_keys=...)` / `--trusted-key`.")
    k.add_argument("-o", "--output", required=True, metavar="PREFIX",
                   help="writes PREFIX.key (private) and PREFIX.pub (public)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .interrupts import install_cli_handler

    install_cli_handler()  # later Ctrl-Cs do not interrupt the cleanup after the first
    command = "qwen2c"
    try:
        args = _parser().parse_args(argv)
        command = f"qwen2c {args.command}"
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        if args.command in ("build", "verify", "bench", "inspect", "tune"):
            _import_heavy_modules()
        return {"build": _build, "export-onnx": _export_onnx, "inspect": _inspect, "run": _run, "verify": _verify,
                "bench": _bench, "tune": _tune, "pack": _pack, "targets": _targets, "keygen": _keygen}[args.command](args)
    except Qwen2cError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except ValueError as e:  # invalid user input caught by the runtime (token ids, lengths)
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted; nothing was published or left behind.", file=sys.stderr)
        return 130
    except OSError as e:  # a file the user named: unreadable, unwritable, a disk that filled
        print(f"{command}: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 2
    except Exception as e:  # a bug: one line, and the traceback only when asked for
        if "-v" in (argv or sys.argv) or "--verbose" in (argv or sys.argv):
            raise
        print(f"{command}: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(a bug in qwen2c; rerun with --verbose for the traceback and report it)", file=sys.stderr)
        return 1


def _import_heavy_modules() -> None:
    """torch, transformers and all of TVM, with Ctrl-C deferred to the end (interrupts.py: an
    interrupt inside a C++ extension's initialisation can abort the process)."""
    from .interrupts import deferred

    with deferred():
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import tvm  # noqa: F401

        from . import builder  # noqa: F401


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _build(args) -> int:
    from .builder import build

    manifest = build(args.model, args.target, args.output, dtype=args.dtype, max_context=args.max_context,
                     force=args.force, parity_steps=args.parity_steps, moe_dispatch=args.moe_dispatch,
                     arch=args.arch, progress=_progress, sign_key=args.sign_key,
                     quantize=args.quantize, group_size=args.group_size, backend=args.backend,
                     tuning_db=args.tuning_db, no_tuning=args.no_tuning, kv_cache_dtype=args.kv_cache_dtype)
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

    engine = load(args.engine, trusted_keys=args.trusted_key)
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
    reasons = {"max_new_tokens": "--max-new-tokens reached", "eos": "end of sequence",
               "max_context": f"stopped at the engine's maximum context ({engine.max_context} tokens)"}
    _progress(f"{len(ids)} prompt + {len(new)} new tokens in {elapsed:.2f}s; {reasons[new.stop_reason]}")
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
    report = verify(args.engine[0], decode_steps=args.decode_steps, record=not args.no_record,
                    trusted_keys=args.trusted_key, reference=args.reference)
    from .verify import format_verify

    print(format_verify(report))
    return 0 if report["passed"] else 3


def _inspect(args) -> int:
    from .inspect_graph import format_inspect, inspect_graph

    print(format_inspect(inspect_graph(args.model, args.max_context)))
    return 0


def _bench(args) -> int:
    from .bench.command import run_command

    return run_command(args, _progress)


def _tune(args) -> int:
    from qwen2c.autotune.command import run_command

    return run_command(args, _progress)


def _pack(args) -> int:
    from .pack import format_pack, pack

    summary = pack(args.engines, args.output, python=args.python, weights=not args.no_weights,
                   tokenizer=not args.no_tokenizer, force=args.force, progress=_progress)
    print(format_pack(summary, args.output))
    return 0


def _keygen(args) -> int:
    from pathlib import Path

    from .signing import generate_key_pair

    private, public = Path(f"{args.output}.key"), Path(f"{args.output}.pub")
    key = generate_key_pair(private, public)
    print(f"wrote {private} (private: keep it secret) and {public} (public key {key[:16]}...)")
    return 0


def _targets(args) -> int:
    from .target_support import format_support, target_support, to_json

    support = target_support()
    print(to_json(support) if args.json else format_support(support))
    return 0


def entry() -> None:
    """The ``qwen2c`` program. It ends at once when ``main`` returns: what it wrote is complete and
    closed, and the seconds that tearing down TVM's and torch's objects take are a window in which
    a Ctrl-C would kill it by signal (after an interrupt, that teardown also prints C++ warnings
    after the one line that says what happened). Ctrl-C is held back from here on."""
    code = main()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
