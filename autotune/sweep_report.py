"""What a sweep found: results.json, results.csv, results.png and the printed summary.

Written after every point (``complete: false`` until the last), each file through a temporary file
and a rename, so a sweep stopped at any moment leaves the previous complete version, never a torn one.
Speeds are ratios to the baseline point measured in the same benchmark run as each point
(``sweep.measure_point``); the absolute numbers are kept beside them for reference.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
from pathlib import Path
from typing import Any

from qwen2c.bench.report import write_json


def write_results(sweep, final: bool) -> dict[str, Any]:
    from qwen2c.bench.limits import machine

    from .sweep import describe, point_key

    records = sweep.records()
    points = [records[point_key(p)] for p in sweep.points if point_key(p) in records]
    measured = [r for r in points if not r.get("error")]
    best = {kind: _best(measured, f"{kind}_ratio") for kind in ("decode", "prefill")}
    result: dict[str, Any] = {
        "spec": sweep.spec.to_json(), "spec_file": str(sweep.spec.path), "fingerprint": sweep.fingerprint,
        "complete": final and len(measured) == len(sweep.points), "baseline": sweep.baseline,
        "knobs": list(sweep.spec.grid), "points": points, "left_out": sweep.left_out,
        "missing": [describe(p) for p in sweep.points if records.get(point_key(p), {"error": True}).get("error")],
        "best": best, "machine": machine(),
    }
    out = sweep.out
    write_json(result, out / "results.json")
    _write_csv(result, out / "results.csv")
    if importlib.util.find_spec("matplotlib") is not None and measured:
        plot(result, out / "results.png")
        result["plot"] = str(out / "results.png")
    return result


def _best(records: list[dict[str, Any]], field: str) -> dict[str, Any] | None:
    if not records:
        return None
    r = max(records, key=lambda r: r[field])
    return {"knobs": r["knobs"], "ratio": r[field], "point": r["point"]}


def _columns(result: dict[str, Any]) -> list[str]:
    spec = result["spec"]["measure"]
    cols = ["point", *result["knobs"]]
    cols += [f"decode_ms_per_token@{c}" for c in spec["decode_context"]]
    cols += [f"decode_ratio@{c}" for c in spec["decode_context"]]
    cols += [f"prefill_tok_s@{n}" for n in spec["prompt"]]
    cols += [f"prefill_ratio@{n}" for n in spec["prompt"]]
    return cols + ["decode_ratio", "prefill_ratio", "build_s", "error"]


def _row(r: dict[str, Any], knobs: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"point": r["point"], **{k: r["knobs"].get(k) for k in knobs}, "error": r.get("error", "")}
    for c, v in r.get("decode", {}).items():
        row[f"decode_ms_per_token@{c}"] = f"{v['ms_per_token']:.4f}"
        row[f"decode_ratio@{c}"] = f"{v['ratio']:.4g}"
    for n, v in r.get("prefill", {}).items():
        row[f"prefill_tok_s@{n}"] = f"{v['tok_s']:.2f}"
        row[f"prefill_ratio@{n}"] = f"{v['ratio']:.4g}"
    for k in ("decode_ratio", "prefill_ratio"):
        if r.get(k) is not None:
            row[k] = f"{r[k]:.4g}"  # 4 significant digits: a point 100x slower keeps its precision
    if r.get("build_s") is not None:
        row["build_s"] = f"{r['build_s']:.1f}"
    return row


def _write_csv(result: dict[str, Any], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=_columns(result), restval="")
    writer.writeheader()
    for r in result["points"]:
        writer.writerow(_row(r, result["knobs"]))
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text.getvalue())
    os.replace(partial, path)


def _label(knobs: dict[str, Any]) -> str:
    return "\n".join(f"{k}={v}" for k, v in knobs.items()) or "defaults"


def plot(result: dict[str, Any], path: Path) -> None:
    """Two panels, decode and prefill speed as ratios to the baseline: one bar per point in grid
    order (so points sharing the leading knobs stand together), labelled by its knob values; the
    baseline's 1.0 drawn across, the best point's bar outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["points"] if not r.get("error")]
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.4 * len(rows) + 2), 8.5), sharex=True)
    varied = [k for k in result["knobs"] if len({repr(r["knobs"].get(k)) for r in rows}) > 1] or result["knobs"]
    labels = [_label({k: r["knobs"][k] for k in varied if k in r["knobs"]}) for r in rows]
    palette = plt.cm.tab10.colors
    first = varied[0] if varied else None
    groups = list(dict.fromkeys(r["knobs"].get(first) for r in rows))  # the first varied knob's values: colours
    measure = result["spec"]["measure"]
    for ax, kind, what in ((axes[0], "decode", f"decode after {', '.join(map(str, measure['decode_context']))} tokens"),
                           (axes[1], "prefill", f"prefill of {', '.join(map(str, measure['prompt']))} tokens")):
        values = [r[f"{kind}_ratio"] for r in rows]
        colors = [palette[groups.index(r["knobs"].get(first)) % len(palette)] for r in rows]
        bars = ax.bar(range(len(rows)), values, color=colors)
        best = result["best"][kind]
        for bar, r, v in zip(bars, rows, values):
            ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
            if best and r["point"] == best["point"]:
                bar.set_edgecolor("black")
                bar.set_linewidth(2.5)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_ylabel("tokens/s ÷ baseline's (same run)")
        ax.set_title(what + (f"; best: point {best['point']}" if best else ""), fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    if first is not None and len(groups) > 1:
        from matplotlib.patches import Patch

        axes[0].legend(handles=[Patch(color=palette[i % len(palette)], label=f"{first}={g}")
                                for i, g in enumerate(groups)], fontsize=8)
    axes[1].set_xticks(range(len(rows)), labels, fontsize=8)
    base = ", ".join(f"{k} {v}" for k, v in result["baseline"].items())
    fig.suptitle(f"{result['spec']['model']} on {result['machine']['cpu']} ({result['spec']['target']}); "
                 f"baseline: {base}", fontsize=10)
    fig.tight_layout()
    partial = path.with_name(path.stem + ".partial.png")
    fig.savefig(partial, dpi=100)
    plt.close(fig)
    os.replace(partial, path)


def format_summary(result: dict[str, Any]) -> str:
    from .sweep import describe

    measure = result["spec"]["measure"]
    lines = [f"sweep of {result['spec']['model']} ({result['spec']['target']}): {len(result['points'])} points; "
             f"speeds are ratios to the baseline ({describe(result['baseline'])}) measured in the same run",
             ""]
    c, n = str(measure["decode_context"][0]), str(measure["prompt"][0])
    header = ["point", *result["knobs"], f"decode ms/token@{c}", "decode x", f"prefill tok/s@{n}", "prefill x"]
    table = [header]
    for r in result["points"]:
        knobs = [str(r["knobs"].get(k, "")) for k in result["knobs"]]
        if r.get("error"):
            table.append([str(r["point"]), *knobs, "failed", "", "", ""])
            continue
        table.append([str(r["point"]), *knobs, f"{r['decode'][c]['ms_per_token']:.2f}", f"{r['decode_ratio']:.2f}",
                      f"{r['prefill'][n]['tok_s']:.0f}", f"{r['prefill_ratio']:.2f}"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines.append("")
    for kind in ("decode", "prefill"):
        best = result["best"][kind]
        if best:
            lines.append(f"best for {kind}: point {best['point']} ({describe(best['knobs'])}), "
                         f"{best['ratio']:.2f}x the baseline")
    for r in result["points"]:
        if r.get("error"):
            lines.append(f"point {r['point']} failed: {r['error']}")
    for line in result["left_out"]:
        lines.append(f"left out: {line}")
    if not result["complete"]:
        lines.append(f"incomplete: {len(result['missing'])} points not measured")
    return "\n".join(lines)
