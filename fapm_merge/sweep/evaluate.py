"""lm-eval glue: task names, the metric of each task, one evaluation with standard errors.

Tasks are ordinary lm-eval task names (built-in, or local YAML tasks in ``--include-path``).
A task may name its metric: ``TASK:METRIC`` or ``TASK:METRIC,FILTER`` (lm-eval's own
``metric,filter`` key, e.g. ``gsm8k:exact_match,strict-match``); otherwise the first of
:data:`PREFERRED` the task reports is used (then the task's first metric).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from fapm_merge.sweep.variants import SweepInputError

PREFERRED = ("acc_norm", "acc", "exact_match", "f1", "mc2", "pass@1", "bleu")
INSTALL_HINT = "the sweep evaluates with lm-eval: pip install 'fapm-merge[sweep]'"


def offline() -> None:
    """No model hub, no dataset downloads: local models and local (or cached) data only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SweepInputError(f"lm-eval is not installed; {INSTALL_HINT}") from None


@dataclass(frozen=True)
class TaskSpec:
    """One task and the metric read from it (``metric`` is None until resolved)."""

    task: str
    metric: Optional[str] = None  # lm-eval's key, "metric,filter"

    @property
    def label(self) -> str:
        return f"{self.task}:{self.metric}" if self.metric else self.task


def parse_tasks(text: Optional[str], option: str) -> List[TaskSpec]:
    """``"a,b:acc_norm,c:exact_match,strict-match"`` -> specs; a piece that is not a task
    name of its own (holds no ``:`` and follows a ``task:metric``) is the metric's filter."""
    specs: List[TaskSpec] = []
    for piece in (p.strip() for p in (text or "").split(",")):
        if not piece:
            continue
        if ":" in piece:
            task, metric = piece.split(":", 1)
            if not task or not metric:
                raise SweepInputError(f"{option}: {piece!r} is not TASK or TASK:METRIC")
            specs.append(TaskSpec(task.strip(), metric.strip()))
        elif specs and specs[-1].metric and "," not in specs[-1].metric and _looks_like_filter(piece):
            last = specs.pop()
            specs.append(TaskSpec(last.task, f"{last.metric},{piece}"))
        else:
            specs.append(TaskSpec(piece))
    return specs


def _looks_like_filter(piece: str) -> bool:
    return piece in ("none", "strict-match", "flexible-extract", "strict", "remove_whitespace",
                     "take_first", "get-answer", "score-first", "maj@1", "maj@8", "maj@64")


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def task_fingerprint(manager, names: Sequence[str]) -> Dict[str, str]:
    """``{task: digest}`` of what each task *is*: its lm-eval config with every local data
    file (``dataset_kwargs.data_files``) replaced by a digest of its contents. Part of the
    resume key, so editing a task's YAML or its items rescores it instead of reusing scores of
    other items; moving the files does not. A task lm-eval knows no config for gets ``""``."""
    def resolve(value):
        if isinstance(value, str):
            return _file_digest(value) if os.path.isfile(value) else value
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    prints = {}
    for name in names:
        config = getattr(manager.task_index.get(name), "cfg", None)
        if not isinstance(config, dict):
            prints[name] = ""
            continue
        config = dict(config)
        kwargs = dict(config.get("dataset_kwargs") or {})
        if "data_files" in kwargs:
            kwargs["data_files"] = resolve(kwargs["data_files"])
            config["dataset_kwargs"] = kwargs
        text = json.dumps(config, sort_keys=True, default=str)
        prints[name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return prints


def task_manager(include_path: Optional[str], names: Sequence[str]):
    """A TaskManager that knows every name, or :class:`SweepInputError` ("did you mean").

    Indexing lm-eval's built-in tasks takes seconds, so a sweep whose tasks all live in
    ``--include-path`` indexes that folder only.
    """
    require_lm_eval()
    offline()
    import logging

    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    if include_path is not None and not os.path.isdir(include_path):
        raise SweepInputError(f"--include-path {include_path}: no such folder")
    if include_path:
        local = TaskManager(include_path=os.path.abspath(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    manager = TaskManager(include_path=os.path.abspath(include_path) if include_path else None)
    for name in names:
        if name not in manager.all_tasks:
            hint = difflib.get_close_matches(name, manager.all_tasks, n=3)
            suggestion = f" Did you mean {', '.join(hint)}?" if hint else ""
            where = f" or in {include_path}" if include_path else ""
            raise SweepInputError(
                f"unknown lm-eval task {name!r} (not among lm-eval's {len(manager.all_tasks)} "
                f"tasks{where}).{suggestion} List them with `lm-eval ls tasks`; put a local "
                "task's YAML in a folder and pass --include-path FOLDER")
    return manager


def _task_metrics(task) -> List[str]:
    """Every ``metric,filter`` key a task object reports (lm-eval 0.4)."""
    metrics = list(task.aggregation().keys())
    filters = [f["name"] for f in (task.config.filter_list or []) if isinstance(f, dict)]
    filters = filters or ["none"]
    return [f"{metric},{name}" for name in filters for metric in metrics]


def resolve_metrics(manager, specs: Sequence[TaskSpec]) -> List[TaskSpec]:
    """Each spec with its lm-eval result key, checked against what the task reports
    (this builds the tasks, so their data must be on this machine)."""
    from lm_eval.tasks import get_task_dict

    names = [spec.task for spec in specs]
    import warnings

    try:
        with warnings.catch_warnings():  # get_task_dict is deprecated in 0.4.13, still works
            warnings.simplefilter("ignore", DeprecationWarning)
            tasks = get_task_dict(names, manager)
    except Exception as error:  # a dataset that is not here, a broken YAML...
        raise SweepInputError(
            f"lm-eval could not build the tasks {', '.join(names)}: {type(error).__name__}: "
            f"{str(error)[:300]}. Built-in tasks need their data on this machine (the sweep "
            "runs offline); local tasks need a readable YAML and data file") from None
    resolved = []
    for spec in specs:
        task = tasks.get(spec.task)
        if task is None or isinstance(task, dict):
            raise SweepInputError(
                f"task {spec.task!r} is a group of lm-eval tasks; list its subtasks instead "
                "(each is scored and averaged)")
        available = _task_metrics(task)
        metric = _choose(spec, available)
        resolved.append(TaskSpec(spec.task, metric))
    return resolved


def _choose(spec: TaskSpec, available: List[str]) -> str:
    if not available:
        raise SweepInputError(
            f"task {spec.task!r} reports no metric; give its YAML a `metric_list` (e.g. "
            "`- metric: acc`)")
    if spec.metric:
        wanted = spec.metric if "," in spec.metric else None
        for key in available:
            if key == wanted or (wanted is None and key.split(",")[0] == spec.metric):
                return key
        raise SweepInputError(
            f"task {spec.task!r} has no metric {spec.metric!r}; it reports "
            f"{', '.join(available)} (write TASK:METRIC or TASK:METRIC,FILTER)")
    for name in PREFERRED:
        for key in available:
            if key.split(",")[0] == name:
                return key
    return available[0]


def item_values(samples: Sequence[dict], metric_key: str, value: float) -> Optional[List[float]]:
    """The per-item values of ``metric_key`` (lm-eval's ``metric,filter``) in ``doc_id`` order,
    from ``simple_evaluate``'s logged samples of one task; None unless the metric is a mean of
    them (accuracy, exact match, ... but not a perplexity, F1 or BLEU over the whole corpus),
    checked by comparing their mean with lm-eval's value. Integral values are stored as ints
    (0/1 for most metrics), which keeps results.json small."""
    metric, _, filter_name = metric_key.partition(",")
    rows = sorted(((s["doc_id"], s.get(metric)) for s in samples
                   if s.get("filter", "none") == (filter_name or "none")), key=lambda r: r[0])
    values = [v for _, v in rows]
    if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return None
    if len({doc for doc, _ in rows}) != len(rows):  # repeats (e.g. several samples per doc)
        return None
    if abs(sum(values) / len(values) - value) > 1e-9 * max(1.0, abs(value)):
        return None  # not a plain mean: no per-item pairing for this metric
    return [int(v) if float(v).is_integer() else float(v) for v in values]


def score_results(output: dict, specs: Sequence[TaskSpec]) -> Dict[str, dict]:
    """``{task: {metric, value, stderr, n[, items]}}`` from ``simple_evaluate``'s output.

    ``stderr`` is lm-eval's (None where it has none); ``n`` the number of items scored;
    ``items`` the per-item values in ``doc_id`` order where the output holds logged samples
    and the metric is their mean (:func:`item_values`): what paired comparisons of two
    variants scored on the same items use.
    """
    results = output.get("results", {})
    samples = output.get("n-samples", {})
    logged = output.get("samples") or {}
    scores = {}
    for spec in specs:
        row = results.get(spec.task, {})
        value = row.get(spec.metric)
        if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
            numeric = [k for k, v in row.items() if isinstance(v, (int, float)) and "stderr" not in k]
            raise SweepInputError(
                f"task {spec.task!r} returned no value for metric {spec.metric!r} (it returned "
                f"{', '.join(numeric) or 'no metric at all'}); choose one with "
                f"{spec.task}:METRIC")
        metric, _, filter_name = spec.metric.partition(",")
        stderr = row.get(f"{metric}_stderr,{filter_name}" if filter_name else f"{metric}_stderr")
        stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
        count = samples.get(spec.task, {})
        scores[spec.task] = {"metric": spec.metric, "value": float(value), "stderr": stderr,
                             "n": int(count.get("effective", count.get("original", 0)) or 0)}
        items = item_values(logged.get(spec.task, []), spec.metric, float(value))
        if items is not None:
            scores[spec.task]["items"] = items
    return scores


def evaluate(model: Any, specs: Sequence[TaskSpec], manager, *, limit=None, num_fewshot=None,
             bootstrap_iters: int = 1000, model_args: Optional[str] = None,
             batch_size=None, device=None) -> Dict[str, dict]:
    """Run lm-eval once on ``model`` (an ``LM`` object, or a backend name with
    ``model_args``) for every task; returns :func:`score_results` (with per-item values)."""
    from lm_eval import evaluator

    output = evaluator.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=sorted({spec.task for spec in specs}),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size if isinstance(model, str) else None,
        device=device if isinstance(model, str) else None,
        bootstrap_iters=bootstrap_iters,
        log_samples=True,  # per-item scores: differences between variants are paired
        verbosity="WARNING",
    )
    if output is None:  # lm-eval returns None on non-zero ranks of a multi-process run
        return {}
    return score_results(output, specs)
