"""Stage 5, report: the results table (markdown + JSON), the trade-off and Pareto plots.

Everything here is computed from the per-variant scores of the run; nothing is typed in.

- *retention* = downstream score / full-SFT downstream score;
- *forgetting* = 1 - general average / pre-trained general average (general average = mean of
  the knowledge, arithmetic, code and commonsense scores);
- *LM forgetting* = 1 - pre-trained perplexity / perplexity on held-out text (0 for the
  pre-trained model, towards 1 as the text becomes unlikely), the suite's fifth component.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Dict, List, Optional

from fapm_study.prepare import GENERAL
from fapm_study.variants import METHODS, Variant
from fapm_merge.sweep.variants import dump_recipe

SKILLS = list(GENERAL)
# the forgetting measure the training-time comparison picks its best combination by
PRIMARY = "forgetting"


def _metrics(scores: dict, pre: dict, ft: dict) -> dict:
    row = {
        "task": scores["task"],
        "retention": scores["task"] / ft["task"] if ft["task"] else float("nan"),
        "general_avg": scores["general_avg"],
        "forgetting": 1.0 - scores["general_avg"] / pre["general_avg"],
        "perplexity": scores["perplexity"],
        "lm_forgetting": 1.0 - pre["perplexity"] / scores["perplexity"],
    }
    row.update({f"general_{k}": v for k, v in scores["general"].items()})
    return row


def _aggregate(rows: List[dict]) -> dict:
    """Mean and (sample) standard deviation of every metric over seeds."""
    out = {"n": len(rows)}
    for key in rows[0]:
        values = [r[key] for r in rows]
        mean = sum(values) / len(values)
        spread = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
        out[key] = mean
        out[f"{key}_std"] = math.sqrt(spread) if len(values) > 1 else 0.0
    return out


def _noise(pre: dict, sizes: dict) -> float:
    """Binomial standard error of the forgetting measure, from the pre-trained scores."""
    variance = 0.0
    for skill, (task, _) in GENERAL.items():
        p, n = pre["general"][skill], max(1, sizes.get(task, 1))
        variance += p * (1 - p) / n
    return math.sqrt(variance) / len(GENERAL) / pre["general_avg"] if pre["general_avg"] else 0


def pareto_front(points: List[dict], forgetting: str = "forgetting") -> List[dict]:
    """Points not dominated in (higher retention, lower ``forgetting``)."""
    front = []
    for p in points:
        dominated = any(
            q["retention"] >= p["retention"] and q[forgetting] <= p[forgetting]
            and (q["retention"] > p["retention"] or q[forgetting] < p[forgetting])
            for q in points
        )
        if not dominated:
            front.append(p)
    return front


def summarise(results: Dict[str, dict], planned: List[Variant]) -> dict:
    pre, ft = results["pretrained"], results["full_sft"]
    groups: Dict[tuple, List[dict]] = {}
    for v in planned:
        groups.setdefault((v.method, v.knob), []).append(_metrics(results[v.name], pre, ft))
    rows = []
    for (method, knob), members in groups.items():
        row = {"method": method, "label": METHODS[method][0], "knob_name": METHODS[method][1],
               "knob": knob, **_aggregate(members)}
        rows.append(row)
    for row in pareto_front(rows):
        row["pareto"] = True
    for row in pareto_front(rows, "lm_forgetting"):
        row["pareto_lm"] = True
    references = {name: _metrics(results[name], pre, ft) for name in ("pretrained", "full_sft")}
    return {"references": references, "rows": rows}


def verdict(rows: List[dict], noise: float) -> List[str]:
    """Plain sentences comparing FAPM with magnitude pruning at every shared sparsity."""
    by = {(r["method"], r["knob"]): r for r in rows}
    pairs = [(knob, row, by[("magnitude", knob)]) for (method, knob), row in sorted(by.items())
             if method == "fapm" and ("magnitude", knob) in by]
    if not pairs:
        return []
    n = len(pairs)
    d_ret = [f["retention"] - m["retention"] for _, f, m in pairs]
    d_suite = [f["forgetting"] - m["forgetting"] for _, f, m in pairs]
    d_lm = [f["lm_forgetting"] - m["lm_forgetting"] for _, f, m in pairs]
    lm_wins = sum(d < 0 for d in d_lm)
    not_worse_task = all(d >= -0.05 for d in d_ret)
    suite_noise = all(abs(d) <= 2 * noise for d in d_suite)
    suite_not_worse = all(d <= 2 * noise for d in d_suite)
    text = (
        f"Against magnitude pruning at the same sparsity ({n} points): FAPM keeps as much of the "
        f"task or more at {sum(d >= 0 for d in d_ret)} of {n} (worst difference "
        f"{min(d_ret):+.3f}), forgets less on held-out text at {lm_wins} of {n} (LM forgetting "
        f"difference {min(d_lm):+.3f} to {max(d_lm):+.3f}), and forgets less on the suite at "
        f"{sum(d < 0 for d in d_suite)} of {n}"
    )
    if suite_noise:
        text += (f", where every difference is within twice the measurement noise "
                 f"(+-{noise:.3f}): the suite cannot tell them apart.")
    else:
        clear = sum(d < -2 * noise for d in d_suite)
        text += (f", at {clear} of them by more than twice the measurement noise "
                 f"(+-{noise:.3f} per point).")
    if lm_wins == n and not_worse_task and suite_not_worse:
        text += (" **On this setup FAPM beats magnitude pruning**: less forgetting on held-out "
                 "text at every sparsity, suite forgetting nowhere worse beyond twice the noise, "
                 "and task retention nowhere lower by more than 0.05.")
    else:
        text += " **On this setup FAPM does not consistently beat magnitude pruning.**"
        # where it does: the same three conditions, point by point
        wins = [k for (k, _, _), r, f, lm in zip(pairs, d_ret, d_suite, d_lm)
                if r >= -0.05 and lm < 0 and f <= 2 * noise]
        losses = [k for k, *_ in pairs if k not in wins]
        if wins:
            text += (f" Point by point (less LM forgetting, suite forgetting not worse beyond "
                     f"twice the noise, retention not lower by more than 0.05) it does at "
                     f"sparsity {', '.join(f'{k:g}' for k in wins)}, and not at "
                     f"{', '.join(f'{k:g}' for k in losses)}.")
    lines = [text, ""]
    for (knob, fapm, mag), r, f, lm in zip(pairs, d_ret, d_suite, d_lm):
        lines.append(
            f"- sparsity {knob:g}: retention {fapm['retention']:.3f} vs {mag['retention']:.3f} "
            f"({r:+.3f}); suite forgetting {fapm['forgetting']:+.3f} vs {mag['forgetting']:+.3f} "
            f"({f:+.3f}); LM forgetting {fapm['lm_forgetting']:+.3f} vs "
            f"{mag['lm_forgetting']:+.3f} ({lm:+.3f}) (FAPM vs magnitude)."
        )
    return lines


TRAINED_GROUPS = ("sft", "sft_fapm", "sam", "sam_fapm", "reg", "reg_fapm")
STRATEGY_OF = {"sft": "standard", "sam": "sam", "reg": "importance_reg"}


def _costs_by_strategy(costs: dict) -> Dict[str, dict]:
    """Fine-tune cost per strategy over seeds: wall time, its ratio to full SFT, peak memory.

    ``costs`` maps fine-tune names (``full_sft``, ``sft_sam-seed1``, ...) to their summaries.
    The ratio compares fine-tunes of the same seed, which ran back to back under the same
    conditions (thread count, machine load), so it is the comparable figure across seeds.
    """
    by_seed: Dict[str, Dict[str, dict]] = {}
    for name, summary in costs.items():
        if summary and summary.get("wall_s") is not None:
            seed = name.rpartition("-seed")[2] if "-seed" in name else "main"
            by_seed.setdefault(seed, {})[summary.get("strategy", "standard")] = summary
    grouped: Dict[str, List[dict]] = {}
    for runs in by_seed.values():
        plain = runs.get("standard")
        for strategy, summary in runs.items():
            row = {"wall_s": summary["wall_s"]}
            if plain:
                row["ratio"] = summary["wall_s"] / plain["wall_s"]
            grouped.setdefault(strategy, []).append((row, summary.get("peak_rss_gb")))
    out = {}
    for strategy, runs in grouped.items():
        rows = [r for r, _ in runs]
        keys = set.intersection(*(set(r) for r in rows))
        out[strategy] = _aggregate([{k: r[k] for k in sorted(keys)} for r in rows])
        peaks = [p for _, p in runs if p]
        out[strategy]["peak_rss_gb"] = max(peaks) if peaks else None
    return out


def training_section(summary: dict, costs: dict, primary: str = "forgetting") -> List[str]:
    """Cost and effect of the training-time methods over training seeds, and which is best.

    ``primary`` is the forgetting measure the best combination is chosen by (the other is
    reported beside it).
    """
    rows = [r for r in summary["rows"] if r["method"] in TRAINED_GROUPS]
    if not any(r["method"] in ("sam", "reg") for r in rows):
        return []
    by_strategy = _costs_by_strategy(costs)
    other = "lm_forgetting" if primary == "forgetting" else "forgetting"
    names = {"forgetting": "suite forgetting", "lm_forgetting": "LM forgetting"}

    def cost(row: dict) -> str:
        method = row["method"].replace("_fapm", "")
        c = by_strategy.get(STRATEGY_OF[method])
        if not c:
            return "not recorded | not recorded"
        wall = f"{c['wall_s']:.0f}" + (f" ± {c['wall_s_std']:.0f}" if c["n"] > 1 else "")
        if "ratio" in c:
            wall += f" s ({c['ratio']:.2f}x" + (f" ± {c['ratio_std']:.2f}" if c["n"] > 1 else "")
            wall += ")"
        else:
            wall += " s"
        peak = f"{c['peak_rss_gb']:.2f} GB" if c["peak_rss_gb"] else "not recorded"
        return f"{wall} | {peak}"

    def label(row: dict) -> str:
        knob = f" ({row['knob_name']} {row['knob']:g})" if row["knob_name"] else ""
        return row["label"] + knob

    seeds = max(r["n"] for r in rows)
    lines = [
        "## Training-time methods: SAM and the importance-weighted regularizer",
        "",
        "Each is its own full fine-tune on the same data, steps and optimizer as full SFT, "
        f"evaluated alone and with FAPM; every fine-tune (full SFT too) is run at {seeds} "
        "training seeds (data order), and each cell is the mean ± one standard deviation over "
        "them. Fine-tune cost: wall time of the stage (mean ± sd over seeds; in brackets its "
        "ratio to the full SFT of the same seed, the figure to compare, since fine-tunes of one "
        "seed ran back to back under the same conditions) and the largest peak resident memory "
        "of the process during it. Retention is against the main full SFT (seed 0).",
        "",
        "| model | seeds | fine-tune wall (x full SFT) | peak memory | task | retention "
        "| suite forgetting "
        "| LM forgetting |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(TRAINED_GROUPS)}
    rows = sorted(rows, key=lambda r: (r["knob"] if r["method"].endswith("_fapm") else -1,
                                       order[r["method"]]))
    for row in rows:
        lines.append(
            f"| {label(row)} | {row['n']} | {cost(row)} | {_fmt(row, 'task')} | "
            f"{_fmt(row, 'retention')} | {_fmt(row, 'forgetting')} | "
            f"{_fmt(row, 'lm_forgetting')} |"
        )
    lines.append("")
    good = [r for r in rows if r["retention"] >= 0.95]
    plain = [r for r in good if r["method"] in ("sft", "sft_fapm")]
    trained = [r for r in good if r["method"] not in ("sft", "sft_fapm")]

    def describe(row: dict) -> str:
        return (f"{label(row)} ({names[primary]} {_fmt(row, primary)}, {names[other]} "
                f"{_fmt(row, other)}, retention {_fmt(row, 'retention')})")

    if not (plain and trained):
        lines += ["No training-time variant and plain variant both keep 95% of the full "
                  "fine-tune's task score on average; no comparison is made.", ""]
        return lines
    best_plain = min(plain, key=lambda r: r[primary])
    best_trained = min(trained, key=lambda r: r[primary])
    best = min((best_plain, best_trained), key=lambda r: r[primary])
    gap = best_trained[primary] - best_plain[primary]
    # standard error of a difference of two means over seeds
    error = math.sqrt(sum(r[f"{primary}_std"] ** 2 / r["n"] for r in (best_plain, best_trained)))
    settled = abs(gap) > 2 * error if error else False
    lines.append(
        f"**Best here** (lowest mean {names[primary]} among variants keeping >= 95% of the "
        f"full fine-tune's task score): {describe(best)}. Best without a training-time method: "
        f"{describe(best_plain)}; best with one: {describe(best_trained)}. Difference "
        f"(with - without) {gap:+.3f} ± {error:.3f} (standard error over seeds): "
        + ("larger than twice its error." if settled else
           "within twice its error, so this comparison does not separate them.")
    )
    lines.append("")
    return lines


def _fmt(row: dict, key: str, digits: int = 3) -> str:
    value, spread = row[key], row.get(f"{key}_std", 0.0)
    text = f"{value:+.{digits}f}" if key.endswith("forgetting") else f"{value:.{digits}f}"
    return text + (f" ± {spread:.{digits}f}" if row.get("n", 1) > 1 else "")


def _table(rows: List[dict], references: dict) -> List[str]:
    head = ("| method | knob | task | retention | forgetting | LM forgetting | general avg | "
            + " | ".join(SKILLS) + " | perplexity | Pareto |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, ref in references.items():
        cells = [f"**{name}**", "", f"{ref['task']:.3f}", f"{ref['retention']:.3f}",
                 f"{ref['forgetting']:+.3f}", f"{ref['lm_forgetting']:+.3f}",
                 f"{ref['general_avg']:.3f}"]
        cells += [f"{ref['general_' + s]:.3f}" for s in SKILLS]
        cells += [f"{ref['perplexity']:.1f}", ""]
        lines.append("| " + " | ".join(cells) + " |")
    for row in rows:
        seeds = f" (n={row['n']})" if row["n"] > 1 else ""
        knob = f"{row['knob_name']} {row['knob']:g}" if row["knob_name"] else ""
        cells = [row["label"] + seeds, knob, _fmt(row, "task"),
                 _fmt(row, "retention"), _fmt(row, "forgetting"), _fmt(row, "lm_forgetting"),
                 _fmt(row, "general_avg")]
        cells += [_fmt(row, "general_" + s) for s in SKILLS]
        front = [name for name, key in (("suite", "pareto"), ("LM", "pareto_lm")) if row.get(key)]
        cells += [_fmt(row, "perplexity", 1), ", ".join(front)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# One point per method for the headline: the paper's sparsity, and a middle knob for the others.
HEADLINE = {"fapm": 0.9, "magnitude": 0.9, "relative": 0.9, "dare": 0.9, "wise": 0.5,
            "lines": 0.0}


def headline(summary: dict) -> List[str]:
    """The short table (README): references and one point per method."""
    refs = summary["references"]
    lines = ["| model | task | retention | suite forgetting | LM forgetting | perplexity |",
             "|---|---|---|---|---|---|"]
    for name, label in (("pretrained", "pre-trained"), ("full_sft", "full SFT")):
        r = refs[name]
        lines.append(f"| {label} | {r['task']:.3f} | {r['retention']:.3f} | "
                     f"{r['forgetting']:+.3f} | {r['lm_forgetting']:+.3f} | "
                     f"{r['perplexity']:.1f} |")
    for row in summary["rows"]:
        if HEADLINE.get(row["method"]) != row["knob"]:
            continue
        seeds = f", {row['n']} seeds" if row["n"] > 1 else ""
        lines.append(
            f"| {row['label']} ({row['knob_name']} {row['knob']:g}{seeds}) | "
            f"{_fmt(row, 'task')} | {_fmt(row, 'retention')} | {_fmt(row, 'forgetting')} | "
            f"{_fmt(row, 'lm_forgetting')} | {_fmt(row, 'perplexity', 1)} |"
        )
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoffs(summary: dict, path: Path) -> None:
    """One panel per method: retention and both forgetting measures against its knob."""
    plt = _pyplot()
    rows, refs = summary["rows"], summary["references"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    columns = min(3, len(methods))
    lines = math.ceil(len(methods) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines),
                                squeeze=False)
    curves = (("retention", "retention", "o", "-"), ("forgetting", "suite forgetting", "s", "--"),
              ("lm_forgetting", "LM forgetting", "^", ":"))
    for axis, method in zip(axes.flat, methods):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["knob"])
        x = [r["knob"] for r in points]
        for (key, label, marker, style), colour in zip(curves, ("black", METHODS[method][2],
                                                               "tab:gray")):
            axis.errorbar(x, [r[key] for r in points], [r[f"{key}_std"] for r in points],
                          marker=marker, ls=style, color=colour, label=label, capsize=3)
        axis.axhline(0, color="grey", lw=0.5)
        axis.set_title(METHODS[method][0], fontsize=10)
        axis.set_xlabel(METHODS[method][1])
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(methods):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(
        f"Retention and forgetting vs each method's knob (full SFT: suite forgetting "
        f"{refs['full_sft']['forgetting']:+.2f}, LM forgetting "
        f"{refs['full_sft']['lm_forgetting']:+.2f})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_pareto(summary: dict, path: Path) -> None:
    """Retention (y) against suite forgetting (left) and LM forgetting (right), all methods."""
    plt = _pyplot()
    rows, refs = summary["rows"], summary["references"]
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    panels = (("forgetting", "suite forgetting = 1 - general avg / pre-trained general avg"),
              ("lm_forgetting", "LM forgetting = 1 - pre-trained ppl / ppl (held-out text)"))
    for axis, (key, title) in zip(axes, panels):
        for method, (label, _, colour) in METHODS.items():
            points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["knob"])
            if not points:
                continue
            axis.errorbar([r[key] for r in points], [r["retention"] for r in points],
                          xerr=[r[f"{key}_std"] for r in points],
                          yerr=[r["retention_std"] for r in points],
                          marker="o", color=colour, label=label, capsize=2, lw=1.2, ms=5)
            for r in points:
                axis.annotate(f"{r['knob']:g}", (r[key], r["retention"]), fontsize=7,
                              color=colour, xytext=(3, 3), textcoords="offset points")
        for name, marker in (("pretrained", "*"), ("full_sft", "X")):
            axis.scatter(refs[name][key], refs[name]["retention"], marker=marker, s=160,
                         color="black", zorder=5, label=name.replace("_", " "))
        axis.set_xlabel(title + " (lower is better)", fontsize=9)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("retention = task score / full-SFT task score (higher is better)")
    axes[1].legend(fontsize=8, loc="best")
    figure.suptitle("Forgetting vs downstream retention, every method (labels: knob value)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


_RECIPE_HEADER = """\
# Generated by `fapm-merge study` (the recipe this variant was built from). Model paths are
# shown relative to a folder holding models/pretrained (the converted SmolLM2, cached under
# ~/.cache/fapm-merge/study/models) and models/full_sft, sft_sam, sft_reg (the fine-tunes,
# under out/study/full/models); the run itself used absolute paths.
"""


def _portable_recipe(text: str) -> str:
    """A recipe with this machine's absolute model paths replaced by ./models/<name>."""
    import re

    models = r"(pretrained|full_sft|sft_sam|sft_reg)"
    text = re.sub(r"(model: |base_model: )\S*/models/" + models + r"\b", r"\1./models/\2",
                  text)
    return _RECIPE_HEADER + text


def _second_task_line(second: Optional[dict], totals: dict) -> List[str]:
    if not second:
        return []
    folder = second["folder"]
    return [f"- Second task `{second['task']}` ([{folder}/]({folder}/results.md)): fine-tune "
            f"{second['finetune']:.0f} s + sweep {second['sweep']:.0f} s; **both tasks "
            f"{totals['both_tasks_wall_s'] / 60:.1f} min**."]


def write_report(results, planned, meta, out_dir: Path, recipes: Dict[str, dict],
                 train_summary) -> dict:
    """Write results.json, results.md, the figures and ``recipes/<variant>.yml`` (``recipes``:
    each merged variant's mergekit recipe by name); returns the report's data."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(results, planned)
    noise = _noise(results["pretrained"], meta["sizes"])
    sentences = verdict(summary["rows"], noise)
    timings = meta["timings"]
    variant_s = sum((t.get("merge_s") or 0) + (t.get("eval_s") or 0)
                    for t in timings.values() if isinstance(t, dict))
    extra_finetunes_s = sum(timings.get("extra_finetunes_s", {}).values())
    study_s = timings["prepare_s"] + timings["finetune_s"] + extra_finetunes_s + variant_s
    # the second task's fine-tune and sweep (fapm_study/pilot.py), when the study ran it
    second = timings.get("second_task")
    totals = {"both_tasks_wall_s": round(study_s + second["total"], 1)} if second else {}
    data = {**meta, "forgetting_noise": noise, "study_wall_s": round(study_s, 1), **totals,
            "verdict": sentences, **summary, "raw_scores": results}
    (out_dir / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    plot_tradeoffs(summary, out_dir / "tradeoff.png")
    plot_pareto(summary, out_dir / "pareto.png")
    recipes_dir = out_dir / "recipes"
    if recipes_dir.exists():
        shutil.rmtree(recipes_dir)
    recipes_dir.mkdir()
    for v in planned:
        if recipes.get(v.name) is not None:
            (recipes_dir / f"{v.name}.yml").write_text(
                _portable_recipe(dump_recipe(recipes[v.name])))

    refs = summary["references"]
    timings = meta["timings"]
    training = meta["training"]
    machine = meta["machine"]
    lines = [
        f"# Forgetting study: results ({meta['mode']} run)",
        "",
        "Generated by `fapm_study/report.py` from the run's scores; do not edit by hand.",
        "",
        f"- Command: `{meta['command']}`",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} "
        f"torch threads), Python {machine['python']}, "
        + ", ".join(f"{k} {v}" for k, v in machine["packages"].items()),
        f"- Wall time: **{study_s / 60:.1f} min** in all = prepare {timings['prepare_s']:.0f} s"
        f" + fine-tunes {timings['finetune_s'] + extra_finetunes_s:.0f} s + variants "
        "(merge + evaluate) "
        f"{variant_s:.0f} s (sum of the stages' own times, also when a stage was reused; "
        f"this invocation took {timings['total_s_this_invocation']:.0f} s).",
        *_second_task_line(second, totals),
        "- Items: " + ", ".join(f"{k} {v}" for k, v in meta["sizes"].items()),
        f"- Fine-tune: {training['steps']} steps, {training['examples']} examples, "
        f"{training['tokens']} tokens, loss {training['first_loss']:.3f} -> "
        f"{training['last_loss']:.3f}, {training['wall_s']:.0f} s.",
        f"- Pre-trained: task {refs['pretrained']['task']:.3f}, general avg "
        f"{refs['pretrained']['general_avg']:.3f}, perplexity {refs['pretrained']['perplexity']:.1f}."
        f" Full SFT: task {refs['full_sft']['task']:.3f}, general avg "
        f"{refs['full_sft']['general_avg']:.3f} (**forgetting "
        f"{refs['full_sft']['forgetting']:+.1%}**), perplexity {refs['full_sft']['perplexity']:.1f}.",
        f"- Measurement noise: one standard error of a forgetting value is about "
        f"{noise:.3f} (binomial, from the item counts).",
        "",
        "## Headline",
        "",
        *headline(summary),
        "",
        "## Verdict: FAPM vs magnitude pruning",
        "",
        *sentences,
        "",
        *training_section(summary, meta.get("training_costs", {}), PRIMARY),
        "## Figures",
        "",
        "![Pareto: forgetting vs retention](pareto.png)",
        "",
        "![Trade-off per method](tradeoff.png)",
        "",
        "## All variants",
        "",
        "Means over seeds, ± one standard deviation where a method has a random part (DARE's "
        "drop seed; the training seed of the training-time comparison). "
        "`Pareto` marks points no other variant beats on both axes.",
        "",
        *_table(summary["rows"], refs),
        "",
        "Recipes: `recipes/<variant>.yml` (run with `mergekit-yaml recipe.yml OUT`).",
        "",
    ]
    (out_dir / "results.md").write_text("\n".join(lines))
    return data
