"""What a benchmark run shows: tables on the terminal, the JSON file, and a PNG plot.

Every number in the tables comes from the JSON (``summarize``'s result): medians over the rounds,
the spread across rounds ((max - min) / median) next to each, and each result as a fraction of this
machine's limit measured in the same run (decode: bytes read per token ÷ bandwidth; prefill: FLOPs
÷ GEMM peak). Ratios are qwen2c's tokens/s over the peer's at the same weight bits (> 1: qwen2c is
faster); load and time-to-first-token ratios are the peer's seconds over qwen2c's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MIB = 1 << 20


def _table(header: list[str], rows: list[list[str]], markdown: bool = False) -> list[str]:
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _cell_prefill(v: dict[str, Any] | None) -> str:
    if not v:
        return "-"
    if "skipped" in v:
        return "n/a"
    return f"{v['tok_s']:.0f} ({100 * v['fraction_of_peak']:.0f}%, ±{50 * v['spread']:.0f}%)"


def _cell_decode(v: dict[str, Any] | None) -> str:
    if not v:
        return "-"
    if "skipped" in v:
        return "n/a"
    return f"{v['ms_per_token']:.1f}/{v['p90_ms']:.1f} ({100 * v['fraction_of_roofline']:.0f}%, ±{50 * v['spread']:.0f}%)"


def format_report(result: dict[str, Any], markdown: bool = False) -> str:
    """The run as text tables (``markdown``: as Markdown tables, for a README)."""
    plan, limits, m = result["plan"], result["limits"], result["machine"]
    rows = result["systems"]
    ok = [r for r in rows if "error" not in r]
    features = ", ".join(m.get("features", []))
    lines = [
        f"machine: {m['cpu']} ({features}; L3 {m.get('l3', '?')}), {plan['threads']} threads for every system",
        f"limits, measured in this run: memory read {limits['bandwidth_GB_s']:.1f} GB/s (C streaming kernel); "
        f"GEMM peak {limits['gemm_GFLOP_s']['float32']:.0f} GFLOP/s float32, {limits['gemm_GFLOP_s']['bfloat16']:.0f} "
        f"bfloat16 (the higher of torch's GEMM and the C multiply-add roof"
        + (f", {limits['fma_GFLOP_s']:.0f}" if limits.get("fma_GFLOP_s") else "") + ")"
        + (f"; int8 dot products {limits['int8_GOP_s']:.0f} GOP/s (VNNI, the roof of 8- and 4-bit prefill)"
           if limits.get("int8_GOP_s") else ""),
        f"{plan['rounds']} rounds, systems interleaved; {plan['decode_steps']} decode steps per context",
        "",
        "prefill tokens/s by prompt length (% of GEMM peak, ± half the spread across rounds)",
    ]
    lengths = prefill_lengths(result)
    lines += _table(["system", "bits", *(f"{n} tokens" + ("*" if n not in plan["prefill"] else "") for n in lengths)],
                    [[r["name"], str(r["bits"]), *(_cell_prefill(r["prefill"].get(str(n))) for n in lengths)] for r in ok], markdown)
    if any(n not in plan["prefill"] for n in lengths):
        lines.append("* the prompt of a decode measurement")
    lines += ["", "decode ms/token median/p90 after N tokens of context (% of bandwidth roofline, ± half the spread)"]
    first, last = str(plan["decode_contexts"][0]), str(plan["decode_contexts"][-1])
    lines += _table(["system", "bits", *(f"after {c}" for c in plan["decode_contexts"]), f"{last} vs {first}"],
                    [[r["name"], str(r["bits"]), *(_cell_decode(r["decode"].get(str(c))) for c in plan["decode_contexts"]),
                      _slowdown(r["decode"].get(last), r["decode"].get(first))] for r in ok], markdown)
    lines += ["", "load; cold start (load + first 4-token call); warm time to first token; memory; preparation"]
    lines += _table(["system", "load s", "cold start s", "first token ms", "peak RSS MiB", "MB read/token", "prepared"],
                    [[r["name"], f"{r['load_s']:.1f}", f"{r['cold_first_token_s']:.1f}",
                      f"{r['ttft_ms']['ms']:.0f} ({r['ttft_ms']['prompt_tokens']} tok)" if r.get("ttft_ms") else "-",
                      f"{r['peak_rss_bytes'] / MIB:.0f}" if r.get("peak_rss_bytes") else "-",
                      f"{r['weight_bytes_per_token'] / 1e6:.4g}", _prepared(r)]
                     for r in ok], markdown)
    if result["ratios"]:
        lines += ["", "qwen2c over each peer at the same weight bits (> 1: qwen2c faster)"]
        head = [*(f"prefill {n}" for n in lengths), *(f"decode {c}" for c in plan["decode_contexts"]), "load",
                "first token"]
        table = []
        for e in result["ratios"]:
            cells = [e["prefill"].get(str(n)) for n in lengths] + [e["decode"].get(str(c)) for c in plan["decode_contexts"]]
            cells += [e.get("load"), e.get("ttft")]
            table.append([f"{e['qwen2c']} / {e['peer']}", *(f"{x:.2f}x" if x else "-" for x in cells)])
        lines += _table(["", *head], table, markdown)
    problems = [f"{r['name']}: {r['error'][-300:]}" for r in rows if "error" in r]
    problems += [f"{r['name']}: {e[-200:]}" for r in ok for e in r.get("errors", [])]
    if result.get("skipped") or problems:
        lines += ["", *result.get("skipped", []), *problems]
    if markdown:  # a table needs a blank line before it, and so does the text after it
        spaced: list[str] = []
        for line in lines:
            if spaced and spaced[-1] and line.startswith("|") != spaced[-1].startswith("|"):
                spaced.append("")
            spaced.append(line)
        lines = spaced
    return "\n".join(lines)


def prefill_lengths(result: dict[str, Any]) -> list[int]:
    """Prompt lengths with a prefill time: those asked for and the decode contexts' prompts."""
    measured = {int(n) for r in result["systems"] if "error" not in r for n, v in r["prefill"].items() if "tok_s" in v}
    return sorted(set(result["plan"]["prefill"]) | measured)


def _slowdown(late: dict[str, Any] | None, early: dict[str, Any] | None) -> str:
    if not late or not early or "ms_per_token" not in late or "ms_per_token" not in early:
        return "-"
    return f"{late['ms_per_token'] / early['ms_per_token']:.2f}x"


def _prepared(r: dict[str, Any]) -> str:
    if r.get("prepare_s") is not None:
        return f"{r['prepare_s']:.0f} s {r['prepare_what']}"
    return f"{r['prepare_what']} (cached)" if r.get("prepare_what") else "-"


def write_json(result: dict[str, Any], path: Path) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=1, default=str) + "\n")
    partial.rename(path)


def plot(result: dict[str, Any], path: Path) -> None:
    """Three panels: prefill tokens/s against prompt length and decode tokens/s against context
    length (one line per system), and decode tokens/s against weight bits (one line per family)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["systems"] if "error" not in r]
    plan = result["plan"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    families = sorted({r["family"] for r in rows}, key=lambda f: (f != "qwen2c", f))
    family_colors = {f: plt.cm.tab10(i) for i, f in enumerate(families)}
    markers = {f: "osD^vP*X"[i % 8] for i, f in enumerate(families)}
    palette = (plt.cm.tab10 if len(rows) <= 10 else plt.cm.tab20).colors
    for i, r in enumerate(rows):
        style = dict(color=palette[i % len(palette)], marker=markers[r["family"]],
                     linestyle="-" if r["family"] == "qwen2c" else "--", linewidth=2.5 if r["family"] == "qwen2c" else 1.3)
        for ax, kind, lengths in ((axes[0], "prefill", prefill_lengths(result)), (axes[1], "decode", plan["decode_contexts"])):
            points = [(n, r[kind][str(n)]["tok_s"]) for n in lengths if "tok_s" in r[kind].get(str(n), {})]
            if points:
                ax.plot(*zip(*points), label=r["name"], **style)
    middle = _bits_context(rows, plan["decode_contexts"])
    for f in families:
        points = sorted((r["bits"], r["decode"][str(middle)]["tok_s"]) for r in rows
                        if r["family"] == f and "tok_s" in r["decode"].get(str(middle), {}))
        if points:
            axes[2].plot(*zip(*points), label=f, color=family_colors[f], marker=markers[f],
                         linewidth=2.5 if f == "qwen2c" else 1.3)
    for ax, title, xlabel in ((axes[0], "prefill", "prompt tokens"), (axes[1], "decode, batch 1", "context tokens"),
                              (axes[2], f"decode after {middle} tokens", "weight bits")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens/s")
        ax.grid(True, alpha=0.3)
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    for ax, ticks in ((axes[0], prefill_lengths(result)), (axes[1], plan["decode_contexts"]), (axes[2], [4, 8, 16, 32])):
        ax.set_xticks(list(ticks), [str(t) for t in ticks])
        ax.minorticks_off()
    m = result["machine"]
    fig.suptitle(f"{result.get('model', '')} on {m['cpu']}, {plan['threads']} threads; "
                 f"{result['limits']['bandwidth_GB_s']:.0f} GB/s read, "
                 f"{result['limits']['gemm_GFLOP_s']['float32']:.0f} GFLOP/s fp32 GEMM", fontsize=10)
    fig.tight_layout()
    partial = path.with_name(path.stem + ".partial.png")
    fig.savefig(partial, dpi=110)
    plt.close(fig)
    partial.rename(path)


def _bits_context(rows: list[dict[str, Any]], contexts: list[int]) -> int:
    """The decode context the bits panel uses: the one measured for the most systems, shortest-but-one."""
    counts = {c: sum("tok_s" in r["decode"].get(str(c), {}) for r in rows) for c in contexts}
    best = max(counts.values(), default=0)
    candidates = [c for c in contexts if counts[c] == best]
    return candidates[min(1, len(candidates) - 1)] if candidates else contexts[0]
