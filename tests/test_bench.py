"""`qwen2c bench`: the harness, its peers, the machine limits and the report, on tiny models.

Speed is never asserted; what is checked is that every system runs the same model on the same
prompts (their greedy tokens agree), that the limits and FLOP counts match independent references
(NumPy's sum, torch's FLOP counter), and that missing peers and bad arguments are reported clearly.
The pytest-benchmark suite is tests/test_benchmarks.py.
"""

import importlib.util
import json
import os

import pytest
import torch

import qwen2c
from conftest import write_checkpoint
from qwen2c.bench import Plan, format_report, run_bench
from qwen2c.bench.limits import measure_bandwidth, measure_fma_peak, measure_gemm_peak, measure_int8_dot_peak
from qwen2c.bench.roofline import prefill_flops
from qwen2c.bench.runners import weight_bytes_per_token
from qwen2c.cli import main

TINY_PLAN = Plan(threads=2, prefill=(8, 32, 100), decode_contexts=(4, 16), decode_steps=4, rounds=2, settle_s=0.0)
HAVE_ORT = all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxscript"))


@pytest.mark.parametrize("threads", [1, 2])
def test_bandwidth_kernel_reads_every_element(threads):
    # An odd element count: the slices' tails must be read too (the kernel's sum is checked against
    # NumPy's inside measure_bandwidth, which raises on a mismatch).
    result = measure_bandwidth(threads, nbytes=4 * 3_000_017, repeats=2)
    assert result["bytes"] == 4 * 3_000_017 and result["GB_s"] >= result["median_GB_s"] > 0


def test_fma_roof_is_measured_and_above_a_small_gemm():
    roof = measure_fma_peak(1, iters=100_000, repeats=2)
    assert roof["GFLOP_s"] >= roof["median_GFLOP_s"] > 0
    # A 256^3 matmul cannot out-run the register-only multiply-adds of the same thread (2x margin
    # for a noisy shared machine).
    assert measure_gemm_peak(1, size=256, repeats=2)["float32"]["GFLOP_s"] < 2 * roof["GFLOP_s"]


def test_int8_roof_is_measured_where_vnni_is_and_above_the_float_roof():
    from qwen2c.targets.registry import _cpu_flags

    roof = measure_int8_dot_peak(1, iters=100_000, repeats=2)
    if not {"avx512_vnni", "avx512bw"} <= _cpu_flags():
        assert roof is None
        return
    assert roof["GOP_s"] >= roof["median_GOP_s"] > 0
    # 64 multiply-adds per instruction against 16: at least twice the float roof (noisy machine).
    assert roof["GOP_s"] > 2 * measure_fma_peak(1, iters=100_000, repeats=2)["GFLOP_s"]


def test_gemm_peak_reports_both_dtypes():
    result = measure_gemm_peak(1, size=256, repeats=2)
    assert result["float32"]["GFLOP_s"] >= result["float32"]["median_GFLOP_s"] > 0
    assert result["bfloat16"]["GFLOP_s"] > 0


@pytest.mark.parametrize("tied", [True, False])
def test_prefill_flops_match_torch_flop_counter(tmp_path, tied):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2ForCausalLM

    ckpt = write_checkpoint(tmp_path / "ckpt", tie_word_embeddings=tied)
    # Eager attention: QKᵀ and PV as batched matmuls torch's counter sees (it has no count for the
    # CPU flash-attention kernel SDPA picks); linear layers are mm/addmm.
    model = Qwen2ForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
    config = json.loads((ckpt / "config.json").read_text())
    tokens = 24
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=torch.arange(tokens).unsqueeze(0), use_cache=False, logits_to_keep=1)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = sum(n for op, n in counts.items() if "bmm" in op)
    linear = sum(n for op, n in counts.items() if "bmm" not in op)
    assert attention > 0 and linear > 0
    # torch counts full (non-causal) attention; qwen2c counts the causal half: each token attends to
    # the positions up to it, (tokens + 1) / 2 of them on average.
    expected = linear + attention * (tokens + 1) // (2 * tokens)
    assert prefill_flops(config, tokens) == expected


def test_weight_bytes_per_token_reads_one_embedding_row():
    sizes = {"token_embd.weight": 1000, "blk.0.attn_output.weight": 10, "output_norm.weight": 1}
    assert weight_bytes_per_token(sizes, "token_embd.weight", "output.weight") == 1011  # tied: the table is read
    sizes["output.weight"] = 1000
    assert weight_bytes_per_token(sizes, "token_embd.weight", "output.weight") == 1011  # untied: one row of it
    prefixed = {"model.model.embed_tokens.weight": 8, "model.lm_head.weight": 8, "model.model.norm.weight": 1}
    assert weight_bytes_per_token(prefixed, "embed_tokens.weight", "lm_head.weight") == 9


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_engine):
    out = tmp_path_factory.mktemp("bench")
    result = run_bench([tiny_engine], TINY_PLAN, out, compare=True, peers=["eager", "onnxruntime"],
                       cache=out / "cache")
    return out, result


def test_bench_times_every_system_on_the_same_model(tiny_run):
    out, result = tiny_run
    rows = {r["name"]: r for r in result["systems"]}
    expected = {"qwen2c float32", "transformers eager float32"} | ({"onnxruntime float32"} if HAVE_ORT else set())
    assert set(rows) == expected
    for row in rows.values():
        assert "error" not in row and not row["errors"], row
        for n in ("8", "32"):
            p = row["prefill"][n]
            assert len(p["runs_s"]) == TINY_PLAN.rounds and p["tok_s"] > 0 and p["fraction_of_peak"] > 0
        assert "skipped" in row["prefill"]["100"]  # longer than the engine's 64-token context
        assert row["prefill"]["16"]["from_decode"] and not row["prefill"]["8"]["from_decode"]
        for c in ("4", "16"):
            d = row["decode"][c]
            assert d["p90_ms"] >= d["ms_per_token"] > 0 and 0 < d["fraction_of_roofline"]
            assert len(d["round_medians_ms"]) == TINY_PLAN.rounds
        assert row["peak_rss_bytes"] > 0 and row["load_s"] > 0 and row["ttft_ms"]["prompt_tokens"] == 8
    # Same weights, same prompt, float32 everywhere: the same greedy continuation.
    for c in ("4", "16"):
        tokens = {name: row["decode"][c]["tokens"] for name, row in rows.items()}
        assert len(set(map(tuple, tokens.values()))) == 1, tokens
    if not HAVE_ORT:
        assert any(s.startswith("onnxruntime: skipped") for s in result["skipped"])
    limits = result["limits"]
    assert limits["bandwidth_GB_s"] > 0 and len(limits["runs"]) == 2  # measured before and after


def test_bench_writes_json_table_and_plot(tiny_run):
    out, result = tiny_run
    saved = json.loads((out / "bench.json").read_text())
    assert saved["systems"][0]["name"] == "qwen2c float32" and saved["machine"]["cpu"]
    text = format_report(result)
    assert "qwen2c float32 / transformers eager float32" in text and "n/a" in text
    markdown = (out / "bench.md").read_text()
    assert "| qwen2c float32 / transformers eager float32 |" in markdown and saved["complete"]
    ratio = next(e for e in result["ratios"] if e["peer"] == "transformers eager float32")
    rows = {r["name"]: r for r in result["systems"]}
    assert ratio["decode"]["16"] == pytest.approx(rows["qwen2c float32"]["decode"]["16"]["tok_s"]
                                                   / rows["transformers eager float32"]["decode"]["16"]["tok_s"])
    if importlib.util.find_spec("matplotlib"):
        import matplotlib.image

        assert matplotlib.image.imread(out / "bench.png").shape[2] in (3, 4)


def test_bench_cli_names_a_missing_peer(tiny_engine, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    rc = main(["bench", str(tiny_engine), "--compare", "--peers", "llama.cpp", "--prefill", "8", "--decode-context", "4",
               "--decode-steps", "2", "--rounds", "1", "--threads", "1", "-o", str(tmp_path / "out")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "llama.cpp: skipped, llama-cpp-python not installed (pip install 'qwen2c[bench]')" in text
    assert "qwen2c float32" in text and (tmp_path / "out" / "bench.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--peers", "eager"], "add --compare"),
    (["--compare", "--peers", "tensorrt"], "--peers tensorrt: not a peer"),
    (["--model", "qwen2-tiny"], "not both or neither"),
    (["--rounds", "0"], "--rounds 0: must be at least 1"),
    (["--prefill", "0,8"], "--prefill 0,8: give positive token counts"),
])
def test_bench_cli_rejects_bad_arguments(tiny_engine, tmp_path, capsys, argv, message):
    assert main(["bench", str(tiny_engine), "-o", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("llama_cpp", "sentencepiece")),
                    reason="llama-cpp-python or sentencepiece (its converter imports it) is not installed")
def test_llama_cpp_peer_runs_the_same_weights(tmp_path):
    """llama.cpp on GGUFs made by its own converter from the engine's weights (qwen2-tiny: the real
    vocabulary, which the converter's tokenizer check needs)."""
    engine = tmp_path / "engine"
    qwen2c.build("qwen2-tiny", "llvm", engine, max_context=64)
    plan = Plan(threads=2, prefill=(16,), decode_contexts=(8,), decode_steps=4, rounds=1, settle_s=0.0)
    cache = os.environ.get("QWEN2C_TEST_BENCH_CACHE")  # the converter's source is fetched once per cache
    result = run_bench([engine], plan, tmp_path / "out", compare=True, peers=["llama.cpp"],
                       llama_types=["f32", "q4_0"], **({"cache": __import__("pathlib").Path(cache)} if cache else {}))
    rows = {r["name"]: r for r in result["systems"]}
    assert set(rows) == {"qwen2c float32", "llama.cpp f32", "llama.cpp q4_0"}
    ours, f32, q4 = rows["qwen2c float32"], rows["llama.cpp f32"], rows["llama.cpp q4_0"]
    assert "error" not in f32 and "error" not in q4
    # f32 GGUF: the engine's weights exactly (the tied embedding table is read as the output projection).
    assert f32["weight_bytes_per_token"] == ours["weight_bytes_per_token"]
    # q4_0 (4.5 bits a weight); llama.cpp keeps the tied embedding/output table at a wider type.
    assert q4["weight_bytes_per_token"] < f32["weight_bytes_per_token"] / 3
    assert f32["decode"]["8"]["tokens"][:2] == ours["decode"]["8"]["tokens"][:2]


def test_torch_compile_peer_continues_like_eager(tiny_engine):
    """The torch.compile peer (StaticCache, explicit positions) generates what eager generates."""
    from qwen2c.bench.runners import CompiledRunner, EagerRunner

    spec = {"path": str(tiny_engine), "dtype": "float32", "threads": 1, "max_context": 64, "cache_len": 24}
    runs = []
    for runner in (EagerRunner(spec), CompiledRunner(spec)):
        runner.start()
        tokens = [runner.feed(list(range(3, 15)))]
        for _ in range(3):
            tokens.append(runner.feed([tokens[-1]]))
        runner.start()  # a second sequence reuses the (reset) static cache
        tokens.append(runner.feed(list(range(3, 15))))
        runs.append(tokens)
    assert runs[0] == runs[1] and runs[0][0] == runs[0][-1]


def test_llama_cpp_converter_without_sentencepiece_is_named_not_a_traceback(tmp_path, monkeypatch):
    import importlib.util as util

    from qwen2c.bench import gguf_peer
    from qwen2c.errors import BackendUnavailableError

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a, **k: None if name == "sentencepiece" else real(name, *a, **k))
    with pytest.raises(BackendUnavailableError, match="pip install sentencepiece"):
        gguf_peer.find_converter(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing fetched
