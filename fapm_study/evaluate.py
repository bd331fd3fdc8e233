"""Stage 4, evaluate: the study scores every model with the sweep's machinery.

Variants are built in memory by ``fapm-merge sweep``'s engine (bit-identical to what
``mergekit-yaml`` writes) and handed to lm-eval as a model object; lm-eval runs offline on the
study's local task YAMLs. The main fine-tune's post-hoc variants are one ``fapm-merge sweep``
run (:func:`sweep_options`); the training-time variants (FAPM on other fine-tunes) go through
the same scorer one fine-tune at a time (:class:`FineTuneScorer`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import yaml

from fapm_study.prepare import DOWNSTREAM, GENERAL, PERPLEXITY


def task_specs():
    """(downstream, general, extra) lm-eval task specs: each task with the metric it is read by."""
    from fapm_merge.sweep.evaluate import TaskSpec

    return ([TaskSpec(*DOWNSTREAM)], [TaskSpec(task, metric) for task, metric in GENERAL.values()],
            [TaskSpec(*PERPLEXITY)])


def study_scores(values: Dict[str, dict]) -> dict:
    """The study's scores of one model from the sweep's ``{task: {metric, value, ...}}``:
    ``{"task": ..., "general": {skill: score}, "general_avg": ..., "perplexity": ...}``
    (scores in [0, 1]; perplexity is word-level on the held-out texts)."""
    general = {skill: values[task]["value"] for skill, (task, _) in GENERAL.items()}
    return {"task": values[DOWNSTREAM[0]]["value"], "general": general,
            "general_avg": sum(general.values()) / len(general),
            "perplexity": values[PERPLEXITY[0]]["value"]}


def write_pair_recipe(recipe: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def sweep_options(recipe_path: Path, out_dir: Path, task_dir: Path, batch_size: int, *,
                  sparsities: Sequence[float] = (), scores: Sequence[str] = ("fapm",),
                  wise: Sequence[float] = (), dare_seeds: Sequence[int] = (),
                  lines: Sequence[float] = (), quiet: bool = False):
    """The ``fapm-merge sweep`` options of one study sweep (what ``fapm-merge sweep`` on the
    command line takes; docs/study/README.md prints the command)."""
    from fapm_merge.sweep.run import SweepOptions

    task, general, extra = task_specs()
    return SweepOptions(
        recipe=str(recipe_path), out_dir=str(out_dir), sparsities=list(sparsities),
        scores=list(scores), task_tasks=task, general_tasks=general, extra_tasks=extra,
        include_path=str(Path(task_dir).resolve()), wise=list(wise),
        dare_seeds=list(dare_seeds), lines=list(lines), batch_size=str(batch_size),
        quiet=quiet,
        command=["fapm-merge", "sweep", str(recipe_path), str(out_dir)])


class FineTuneScorer:
    """Score variants of one fine-tune in memory: loads the live model once, then for each
    sweep variant builds it and runs lm-eval (the sweep's ``InMemoryScorer``)."""

    def __init__(self, recipe_path: Path, task_dir: Path, batch_size: int, pending: List):
        from fapm_merge.sweep import evaluate as ev
        from fapm_merge.sweep.engine import output_dtype
        from fapm_merge.sweep.run import InMemoryScorer
        from fapm_merge.sweep.variants import load_sweep_recipe

        options = sweep_options(recipe_path, Path(recipe_path).parent, task_dir, batch_size,
                                sparsities=sorted({v.sparsity for v in pending if v.sparsity}))
        recipe = load_sweep_recipe(options.recipe)
        task, general, extra = options.task_tasks, options.general_tasks, options.extra_tasks
        manager = ev.task_manager(options.include_path, [s.task for s in task + general + extra])
        self.recipe = recipe
        self.scorer = InMemoryScorer(options, recipe, output_dtype(recipe), manager,
                                     task + general + extra)
        self.scorer.setup(pending)

    def score(self, variant):
        """(build seconds, evaluation seconds, the study's scores) of one sweep variant."""
        from fapm_merge.sweep.variants import variant_recipe

        built, scored, values = self.scorer.score(variant, variant_recipe(self.recipe, variant))
        return built, scored, study_scores(values)

    def close(self) -> None:
        self.scorer.close()


def save_scores(scores: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(scores, indent=2) + "\n")
