"""``report.md`` for ``fapm-merge inspect``: markdown tables rendered from the stats document.

Every number comes from ``stats.json`` (see :mod:`fapm_merge.inspect.stats`); nothing here
computes statistics.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

Row = Dict[str, object]


def _num(value: Optional[float]) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    return f"{value:.3g}"


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _count(value: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return str(value)


# (header, key, formatter) of the per-group tables
COLUMNS: Sequence[Tuple[str, str, object]] = (
    ("elements", "numel", _count),
    ("mean abs dW", "dw_abs_mean", _num),
    ("ratio mean", "ratio_mean", _num),
    ("ratio p50", "ratio_p50", _num),
    ("ratio p99", "ratio_p99", _num),
    ("S < 0", "negative_score_share", _pct),
    ("dW = 0", "unchanged_share", _pct),
    ("Jaccard", "jaccard", _num),
    ("energy FAPM", "energy_kept_fapm", _pct),
    ("energy mag.", "energy_kept_magnitude", _pct),
    ("kept ratio FAPM", "kept_ratio_mean_fapm", _num),
    ("kept ratio mag.", "kept_ratio_mean_magnitude", _num),
)


def _table(first: str, rows: List[Tuple[str, Row]]) -> List[str]:
    lines = [
        "| " + " | ".join([first] + [c[0] for c in COLUMNS]) + " |",
        "|" + "---|" * (len(COLUMNS) + 1),
    ]
    for label, row in rows:
        cells = [label] + [fmt(row.get(key)) for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ratio_of(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}x"


def render_report(stats: Row, top: int = 15) -> str:
    """The markdown report; ``top`` rows in the top-risk table."""
    s = stats["summary"]
    sparsity = stats["sparsity"]
    lines = [
        "# FAPM inspection",
        "",
        f"- base (W_pre): `{stats['base']}`",
        f"- fine-tune (W_ft): `{stats['finetuned']}`",
        f"- sparsity {sparsity:g}: each criterion keeps the top {100 * (1 - sparsity):.3g}% "
        "of every tensor's task vector dW = W_ft - W_pre",
        f"- {s['tensors']} tensors, {_count(s['numel'])} elements inspected"
        + (f"; {len(stats['skipped'])} non-floating tensors skipped" if stats["skipped"] else "")
        + (
            f"; filter modules={stats['filters']['modules']!r} exclude={stats['filters']['exclude']!r}"
            if any(stats["filters"].values())
            else ""
        ),
        f"- written by fapm-merge {stats['fapm_merge_version']} on {stats['created']}; "
        "definitions in docs/inspect.md",
        "",
        "## Summary",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| mean abs dW | {_num(s['dw_abs_mean'])} |",
        f"| relative change abs dW / abs W_pre: mean, p50, p90, p99, max | "
        f"{_num(s['ratio_mean'])}, {_num(s['ratio_p50'])}, {_num(s['ratio_p90'])}, "
        f"{_num(s['ratio_p99'])}, {_num(s['ratio_max'])} |",
        f"| elements with FAPM score S < 0 | {_pct(s['negative_score_share'])} |",
        f"| elements with dW exactly 0 | {_pct(s['unchanged_share'])} |",
        f"| elements with W_pre = 0 (of which changed; not in ratio statistics) | "
        f"{s['base_zero']} ({s['base_zero_changed']}) |",
        f"| kept per criterion (budget) | FAPM {s['kept_fapm']}, magnitude {s['kept_magnitude']} "
        f"({s['kept_budget']}) |",
        f"| overlap of the two masks (Jaccard) | {_num(s.get('jaccard'))} |",
        f"| task-vector energy (sum dW^2) kept | FAPM {_pct(s['energy_kept_fapm'])}, "
        f"magnitude {_pct(s['energy_kept_magnitude'])} |",
        f"| mean relative change of what is kept (forgetting proxy) | FAPM "
        f"{_num(s['kept_ratio_mean_fapm'])}, magnitude {_num(s['kept_ratio_mean_magnitude'])} "
        f"(FAPM / magnitude = {_ratio_of(s['kept_ratio_mean_fapm'], s['kept_ratio_mean_magnitude'])}) |",
        "",
        "Reading: magnitude pruning keeps the largest changes wherever they are; FAPM trades "
        "some task-vector energy for changes that are small relative to the pre-trained "
        "weight they modify. A lower kept relative change means less of the pre-trained "
        "behaviour is overwritten.",
        "",
        "## Per module type",
        "",
        "Element-weighted over all tensors of the type (sums first, then ratios).",
        "",
    ]
    lines += _table("module", sorted(stats["module_types"].items()))
    if stats["layers"]:
        lines += ["", "## Per layer", "", "Element-weighted over the tensors named `layers.N.`.", ""]
        rows = [(str(row["layer"]), row) for row in stats["layers"]]
        if stats["outside_layers"]:
            rows.append(("outside layers", stats["outside_layers"]))
        lines += _table("layer", rows)
    ranked = sorted(
        stats["tensors"], key=lambda t: -(t["ratio_mean"] if t["ratio_mean"] is not None else -1)
    )[:top]
    lines += [
        "",
        f"## Top-risk tensors (highest mean relative change abs dW / abs W_pre, top {len(ranked)})",
        "",
    ]
    lines += _table("tensor", [(f"`{t['name']}`", t) for t in ranked])
    lines += [
        "",
        "Columns: ratio = abs dW / abs W_pre over elements with W_pre != 0 (quantiles from a "
        "log histogram, < 2.4% relative error); S < 0 = share of elements whose FAPM score "
        "S = abs dW - mean(abs W_pre) * abs dW / abs W_pre is negative; Jaccard = overlap of the "
        "FAPM and magnitude masks; energy = share of sum dW^2 kept; kept ratio = mean relative "
        "change of the kept elements.",
    ]
    if stats["plots"] or stats["heatmaps"]:
        lines += ["", "## Plots", ""]
        for file in stats["plots"]:
            lines += [f"![{file}]({file})", ""]
        for item in stats["heatmaps"]:
            br, bc = item["block"]
            pooling = "not pooled" if (br, bc) == (1, 1) else f"block mean over {br}x{bc} blocks"
            lines += [
                f"`{item['tensor']}` {item['shape'][0]}x{item['shape'][1]}, {pooling}:",
                "",
                f"![{item['tensor']}]({item['file']})",
                "",
            ]
    if stats["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += [f"- `{item['name']}`: {item['reason']}" for item in stats["skipped"]]
    return "\n".join(lines).rstrip() + "\n"
