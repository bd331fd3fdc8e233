"""The results file, the two figures of merit, the recommendation rule, report and plots.

Figures of merit (the paper's, the same definitions as the study):

- downstream *retention* = task score / the fine-tune's task score (1.0: the fine-tune's gain
  is kept; the task score of several ``--task-tasks`` is their mean);
- *forgetting* = 1 - general average / the pre-trained model's general average (0: nothing
  forgotten; negative: the variant does better than the pre-trained model).

Standard errors are lm-eval's per task; a mean of tasks takes ``sqrt(sum se^2) / m``
(independent items), and a ratio the first-order propagation
``r * sqrt((se_a / a)^2 + (se_b / b)^2)``: approximate, good enough to say whether two
variants are distinguishable.

Two variants are compared on the *same* items, so the error of their difference is that of the
per-item differences (:func:`paired_difference`), not the two errors combined as if
independent: variants that answer most items alike differ far less by chance than either
score's own error suggests. Pairing needs per-item scores (logged by the sweep since
``items`` was added to each task's score); without them the independent error is used.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

SCHEMA = "fapm-merge/sweep-results/1"
Z = 1.96  # differences below Z standard errors of the difference are "within the noise"


def write_json_atomic(path: str, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``: a reader
    (or a Ctrl-C) never sees a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".results-", suffix=".json", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2, sort_keys=False)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_text_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(temporary, path)


def mean_with_stderr(rows: Sequence[dict]) -> Tuple[float, Optional[float]]:
    """Mean of task values and its standard error (None if any task has none)."""
    values = [row["value"] for row in rows]
    mean = sum(values) / len(values)
    errors = [row.get("stderr") for row in rows]
    if any(e is None for e in errors):
        return mean, None
    return mean, math.sqrt(sum(e * e for e in errors)) / len(errors)


def _ratio(a: float, se_a, b: float, se_b) -> Tuple[Optional[float], Optional[float]]:
    if b == 0:
        return None, None
    r = a / b
    if se_a is None or se_b is None or a == 0:
        return r, None if (se_a is None or se_b is None) else abs(se_b / b) * abs(r)
    return r, abs(r) * math.sqrt((se_a / a) ** 2 + (se_b / b) ** 2)


def figures(entry: dict, references: dict, task_names: List[str],
            general_names: List[str]) -> dict:
    """Task score, general average, retention and forgetting (each with a standard error)
    of one scored variant; ``references`` holds the scored ``pretrained`` / ``finetuned``."""
    scores = entry["scores"]
    task, task_se = mean_with_stderr([scores[t] for t in task_names])
    out = {"task": task, "task_stderr": task_se}
    if general_names:
        general, general_se = mean_with_stderr([scores[t] for t in general_names])
        out.update(general=general, general_stderr=general_se)
    ft = references.get("finetuned")
    pre = references.get("pretrained")
    if ft is not None:
        ft_task, ft_se = mean_with_stderr([ft["scores"][t] for t in task_names])
        out["retention"], out["retention_stderr"] = _ratio(task, task_se, ft_task, ft_se)
    if pre is not None and general_names:
        pre_general, pre_se = mean_with_stderr([pre["scores"][t] for t in general_names])
        ratio, ratio_se = _ratio(out["general"], out["general_stderr"], pre_general, pre_se)
        out["forgetting"] = None if ratio is None else 1.0 - ratio
        out["forgetting_stderr"] = ratio_se
    # a reference against itself is exact: 1.0 and 0.0 by definition, not estimates
    reference = entry.get("variant", {}).get("reference")
    if reference == "finetuned" and out.get("retention") is not None:
        out["retention_stderr"] = 0.0
    if reference == "pretrained" and out.get("forgetting") is not None:
        out["forgetting_stderr"] = 0.0
    return out


def paired_difference(a_scores: dict, b_scores: dict,
                      names: Sequence[str]) -> Optional[Tuple[float, float]]:
    """Mean over the tasks ``names`` of the item-by-item difference ``a - b`` and its
    standard error (per task: the sample standard deviation of the differences over
    sqrt(n), lm-eval's rule for a mean; over tasks ``sqrt(sum se^2) / m``).

    ``a_scores`` / ``b_scores`` are two variants' ``scores`` (``{task: {"items": [...]}}``,
    items in lm-eval's ``doc_id`` order). None where a task lacks per-item values in either,
    or the item counts differ (not the same items), or a task has fewer than 2 items.
    """
    means, variances = [], []
    for name in names:
        x = a_scores.get(name, {}).get("items")
        y = b_scores.get(name, {}).get("items")
        if x is None or y is None or len(x) != len(y) or len(x) < 2:
            return None
        d = [p - q for p, q in zip(x, y)]
        mean = sum(d) / len(d)
        means.append(mean)
        variances.append(sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d))
    if not means:
        return None
    return sum(means) / len(means), math.sqrt(sum(variances)) / len(means)


def _independent(a: dict, b: dict, key: str) -> Tuple[Optional[float], Optional[float], bool]:
    return (*_difference(a["figures"], b["figures"], key), False)


class Comparison:
    """``compare(a, b, key)`` -> ``(a - b, standard error, paired)`` for ``key`` retention or
    forgetting of two scored variants (entries with ``scores`` and ``figures``).

    Paired where both logged per-item scores: retention is ``T / T_ft`` and forgetting
    ``1 - G / G_pre``, so their differences are ``(T_a - T_b) / T_ft`` and
    ``-(G_a - G_b) / G_pre``; the numerator's error is :func:`paired_difference`'s, the
    reference's own error enters to first order. Otherwise the independent error.
    """

    def __init__(self, references: dict, task_names: Sequence[str],
                 general_names: Sequence[str]):
        self.references = references
        self.names = {"retention": list(task_names), "forgetting": list(general_names)}
        self.reference = {"retention": "finetuned", "forgetting": "pretrained"}

    def __call__(self, a: dict, b: dict, key: str):
        difference, independent_se = _difference(a["figures"], b["figures"], key)
        reference = self.references.get(self.reference[key])
        names = self.names[key]
        if difference is None or reference is None or not names:
            return difference, independent_se, False
        pair = paired_difference(a.get("scores", {}), b.get("scores", {}), names)
        if pair is None:
            return difference, independent_se, False
        ref, ref_se = mean_with_stderr([reference["scores"][t] for t in names])
        if ref == 0:
            return difference, independent_se, False
        numerator, numerator_se = pair
        se = math.hypot(numerator_se / ref, numerator * (ref_se or 0.0) / ref ** 2)
        return difference, se, True


def recommend(rows: List[dict], min_retention: float, compare=_independent) -> dict:
    """The rule: among sweep points with retention >= ``min_retention``, the least
    forgetting; ties (equal forgetting) go to the lower sparsity. ``rows`` are the sweep
    points' entries with their figures; ``compare`` (a :class:`Comparison`) judges whether
    the runner-up is within the noise. Returns ``{"chosen": row or None, "why": text,
    "runner_up": row or None, "within_noise": bool or None}``."""
    qualified = [r for r in rows if r["figures"].get("retention") is not None
                 and r["figures"]["retention"] >= min_retention
                 and r["figures"].get("forgetting") is not None]
    rule = (f"least forgetting among the sweep points that keep >= {min_retention:.0%} of the "
            "fine-tune's task score; ties to the lower sparsity")
    if not qualified:
        scored = [r["figures"]["retention"] for r in rows
                  if r["figures"].get("retention") is not None]
        if not rows:
            why = "no sweep point was scored; nothing is recommended"
        elif not scored:
            why = ("retention is undefined (the fine-tune scores 0 on the task tasks, or a "
                   "reference is missing); nothing is recommended: check --task-tasks")
        else:
            why = (f"no sweep point keeps {min_retention:.0%} of the fine-tune's task score "
                   f"(best: {max(scored):.1%}); nothing is recommended: lower "
                   "--min-retention or sweep lower sparsities")
        return {"rule": rule, "chosen": None, "why": why, "runner_up": None,
                "within_noise": None}
    ordered = sorted(qualified, key=lambda r: (r["figures"]["forgetting"],
                                               r["variant"]["sparsity"]))
    chosen, runner = ordered[0], (ordered[1] if len(ordered) > 1 else None)
    within = None
    if runner is not None:
        difference, se, _ = compare(chosen, runner, "forgetting")
        if se is not None:
            within = abs(difference) <= Z * se
    return {"rule": rule, "chosen": chosen, "why": "", "runner_up": runner,
            "within_noise": within}


def _difference(a: dict, b: dict, key: str) -> Tuple[Optional[float], Optional[float]]:
    """``a[key] - b[key]`` of two figures dicts and its standard error, the two taken as
    independent (which overstates the error of a paired difference)."""
    if a.get(key) is None or b.get(key) is None:
        return None, None
    se_a, se_b = a.get(f"{key}_stderr"), b.get(f"{key}_stderr")
    se = None if se_a is None or se_b is None else math.hypot(se_a, se_b)
    return a[key] - b[key], se


def against_rivals(rows: List[dict], own_score: str = "fapm",
                   compare=_independent) -> List[dict]:
    """One verdict per rival point: is FAPM (sweep points of score ``own_score``) better?

    A rival is every scored variant that is neither a reference nor one of FAPM's points. It is
    matched with the FAPM point of least forgetting among those keeping at least its retention
    (if none does, the FAPM point of highest retention). "better" means less forgetting or more
    retention by more than ``Z`` standard errors of the difference, and not worse in the other
    by as much; "trade-off" is better in one and worse in the other; otherwise "no difference"
    (the data cannot tell them apart). Returns ``[{"rival", "fapm", "retention_diff",
    "retention_diff_stderr", "forgetting_diff", "forgetting_diff_stderr", "paired",
    "verdict"}]`` with differences FAPM minus rival (standard errors from ``compare``, a
    :class:`Comparison`; ``paired`` when both are paired over items), or ``[]`` without FAPM
    points or figures.
    """
    def scored(row):
        f = row["figures"]
        return f.get("retention") is not None and f.get("forgetting") is not None

    own = [r for r in rows if r["variant"]["kind"] == "sweep"
           and r["variant"].get("score") == own_score and scored(r)]
    rivals = [r for r in rows if r["variant"]["kind"] != "reference" and r not in own
              and scored(r)]
    verdicts = []
    for rival in rivals if own else []:
        keeping = [r for r in own if r["figures"]["retention"] >= rival["figures"]["retention"]]
        match = (min(keeping, key=lambda r: r["figures"]["forgetting"]) if keeping
                 else max(own, key=lambda r: r["figures"]["retention"]))
        d_ret, se_ret, paired_ret = compare(match, rival, "retention")
        d_forg, se_forg, paired_forg = compare(match, rival, "forgetting")
        if se_ret is None or se_forg is None:
            verdict = "no standard errors"
        else:
            better = d_forg < -Z * se_forg or d_ret > Z * se_ret
            worse = d_forg > Z * se_forg or d_ret < -Z * se_ret
            verdict = {(True, False): "FAPM better", (False, True): "rival better",
                       (True, True): "trade-off", (False, False): "no difference"}[better, worse]
        verdicts.append({"rival": rival["name"], "fapm": match["name"],
                         "retention_diff": d_ret, "retention_diff_stderr": se_ret,
                         "forgetting_diff": d_forg, "forgetting_diff_stderr": se_forg,
                         "paired": paired_ret and paired_forg, "verdict": verdict})
    return verdicts


def rivals_markdown(rows: List[dict], verdicts: List[dict]) -> List[str]:
    """The results.md section of :func:`against_rivals`."""
    if not verdicts:
        return []
    by_name = {r["name"]: r["figures"] for r in rows}
    counts = {}
    for v in verdicts:
        counts[v["verdict"]] = counts.get(v["verdict"], 0) + 1
    lines = ["", "## FAPM against each rival", "",
             "Each rival point is matched with the FAPM point of least forgetting among those "
             "that keep at least its retention (else the FAPM point of highest retention). "
             f"Differences are FAPM minus rival, ± one standard error; a verdict needs {Z} "
             "standard errors. The errors are paired: both were scored on the same items, so "
             "the error of a difference is that of the item-by-item differences"
             + ("." if all(v.get("paired") for v in verdicts) else
                "; rows marked * lack per-item scores (results logged before they were) and "
                "take the two errors as independent, which overstates the noise."), "",
             "| rival | retention | forgetting | FAPM point | Δ retention | Δ forgetting "
             "| verdict |", "|---|---|---|---|---|---|---|"]
    for v in verdicts:
        f = by_name[v["rival"]]
        lines.append(f"| {v['rival']} | {_fmt(f['retention'], f.get('retention_stderr'))} | "
                     f"{_fmt(f['forgetting'], f.get('forgetting_stderr'))} | {v['fapm']} | "
                     f"{_fmt(v['retention_diff'], v['retention_diff_stderr'])} | "
                     f"{_fmt(v['forgetting_diff'], v['forgetting_diff_stderr'])} | "
                     f"{v['verdict']}{'' if v.get('paired') else ' *'} |")
    lines += ["", "In all: " + ", ".join(f"{k} at {n} of {len(verdicts)}"
                                         for k, n in sorted(counts.items())) + "."]
    return lines


def _fmt(value, se=None, percent=True) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.1%}" if percent else f"{value:.4f}"
    if se is not None:
        text += f" ± {se:.1%}" if percent else f" ± {se:.4f}"
    return text


def report_markdown(data: dict, rows: List[dict], choice: dict,
                    verdicts: Sequence[dict] = ()) -> str:
    """results.md: the table of every variant and the recommendation, in plain words."""
    lines = ["# Sparsity sweep", "", f"Recipe: `{data['recipe']['path']}` "
             f"(base `{data['models']['base']['path']}`, fine-tune "
             f"`{data['models']['finetuned']['path']}`).", "",
             f"Command: `{' '.join(data['command'])}`", "",
             "Tasks (downstream): " + ", ".join(f"`{t['task']}` ({t['metric']})"
                                                for t in data["tasks"]["task"]),
             "General: " + (", ".join(f"`{t['task']}` ({t['metric']})"
                                      for t in data["tasks"]["general"]) or "none"),
             "Items per task: " + (f"at most {data['evaluation']['limit']:g}"
                                   if data["evaluation"]["limit"] else "all")
             + "; ± is one standard error (lm-eval's, propagated)."]
    extras = data["tasks"].get("extra", [])
    if extras:
        lines.append("Also scored (not in the figures of merit): " + ", ".join(
            f"`{t['task']}` ({t['metric']})" for t in extras))
    lines += ["", "| variant | task score | retention | general avg | forgetting |"
              + "".join(f" {t['task']} |" for t in extras),
              "|---|---|---|---|---|" + "---|" * len(extras)]
    for row in rows:
        f = row["figures"]
        cells = [_fmt(row["scores"][t["task"]]["value"], row["scores"][t["task"]]["stderr"],
                      percent=False) for t in extras]
        lines.append(f"| {row['name']} | {_fmt(f['task'], f['task_stderr'])} | "
                     f"{_fmt(f.get('retention'), f.get('retention_stderr'))} | "
                     f"{_fmt(f.get('general'), f.get('general_stderr'))} | "
                     f"{_fmt(f.get('forgetting'), f.get('forgetting_stderr'))} |"
                     + "".join(f" {c} |" for c in cells))
    lines += ["", "## Recommendation", "", f"Rule: {choice['rule']}.", ""]
    chosen = choice["chosen"]
    if chosen is None:
        lines.append(choice["why"] + ".")
    else:
        f = chosen["figures"]
        lines.append(f"**{chosen['name']}** (score `{chosen['variant']['score']}`, sparsity "
                     f"{chosen['variant']['sparsity']:g}): retention "
                     f"{_fmt(f['retention'], f.get('retention_stderr'))}, forgetting "
                     f"{_fmt(f['forgetting'], f.get('forgetting_stderr'))}. Its recipe is "
                     "`recommended.yml`.")
        runner = choice["runner_up"]
        if runner is not None:
            g = runner["figures"]
            verdict = {True: "The difference is **within the standard errors** (less than "
                             f"{Z} standard errors of the difference): the data do not tell these "
                             "two apart; score more items (--limit) to separate them.",
                       False: "The difference is larger than the standard errors.",
                       None: "lm-eval gave no standard error, so the noise is unknown."}
            lines += ["", f"Runner-up: {runner['name']} (forgetting "
                      f"{_fmt(g['forgetting'], g.get('forgetting_stderr'))}). "
                      + verdict[choice["within_noise"]]]
    lines += rivals_markdown(rows, list(verdicts))
    lines += ["", "Plots: `tradeoff-<score>.png` (task retention and forgetting vs sparsity), "
              "`pareto.png` (forgetting vs retention, every variant).", ""]
    return "\n".join(lines)


def plot(out_dir: str, rows: List[dict], references: List[dict]) -> List[str]:
    """tradeoff-<score>.png per swept score and pareto.png; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_score: Dict[str, List[dict]] = {}
    for row in rows:
        if row["variant"]["kind"] == "sweep":
            by_score.setdefault(row["variant"]["score"], []).append(row)
    for score, points in by_score.items():
        points = sorted(points, key=lambda r: r["variant"]["sparsity"])
        xs = [p["variant"]["sparsity"] for p in points]
        figure, axis = plt.subplots(figsize=(6, 4))
        for key, label, colour in (("retention", "task retention", "tab:blue"),
                                   ("forgetting", "forgetting", "tab:red")):
            ys = [p["figures"].get(key) for p in points]
            if all(y is None for y in ys):
                continue
            errors = [p["figures"].get(f"{key}_stderr") or 0.0 for p in points]
            axis.errorbar(xs, [y if y is not None else math.nan for y in ys], yerr=errors,
                          marker="o", capsize=3, label=label, color=colour)
        axis.axhline(0, color="gray", linewidth=0.5)
        axis.set_xlabel("sparsity (fraction of the task vector pruned)")
        axis.set_ylabel("fraction")
        axis.set_title(f"score: {score}")
        axis.legend()
        figure.tight_layout()
        path = os.path.join(out_dir, f"tradeoff-{score}.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    figure, axis = plt.subplots(figsize=(6, 4.5))
    families: Dict[str, List[dict]] = {}
    for row in rows + references:
        families.setdefault(row["method"], []).append(row)
    for family, members in families.items():
        xs = [m["figures"].get("forgetting") for m in members]
        ys = [m["figures"].get("retention") for m in members]
        keep = [i for i in range(len(members)) if xs[i] is not None and ys[i] is not None]
        if not keep:
            continue
        axis.errorbar([xs[i] for i in keep], [ys[i] for i in keep],
                      xerr=[members[i]["figures"].get("forgetting_stderr") or 0 for i in keep],
                      yerr=[members[i]["figures"].get("retention_stderr") or 0 for i in keep],
                      fmt="*" if family in ("pretrained", "finetuned") else "o",
                      markersize=12 if family in ("pretrained", "finetuned") else 6,
                      capsize=2, label=family)
    axis.set_xlabel("forgetting (1 - general / pre-trained general)")
    axis.set_ylabel("downstream retention (task / fine-tune task)")
    axis.set_title("every variant (better: up and left)")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
    figure.tight_layout()
    path = os.path.join(out_dir, "pareto.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)
    return written
