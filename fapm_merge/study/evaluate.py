"""Stage 4, evaluate: lm-eval (offline, local task YAMLs) on one model folder.

lm-eval runs in this process through its Python API (``simple_evaluate`` with a ``TaskManager``
pointed at the generated task folder), so its import and task set-up are paid once for the
whole sweep rather than once per variant. Hub access is switched off before it is imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict

from fapm_merge.study.prepare import DOWNSTREAM, GENERAL, PERPLEXITY

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TASK_MANAGERS: Dict[str, object] = {}


def task_names() -> list:
    return [DOWNSTREAM[0]] + [task for task, _ in GENERAL.values()] + [PERPLEXITY[0]]


def evaluate_model(model_dir: Path, task_dir: Path, batch_size: int = 16) -> dict:
    """Score one model on the downstream task, the general suite and held-out perplexity.

    Returns ``{"task": ..., "general": {skill: score}, "general_avg": ..., "perplexity": ...}``
    (scores in [0, 1]; perplexity is word-level on the held-out texts).
    """
    import logging

    import torch
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    key = str(Path(task_dir).resolve())
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=key, include_defaults=False)
    model = HFLM(
        pretrained=str(model_dir), batch_size=batch_size, device="cpu", dtype=torch.float32
    )
    output = evaluator.simple_evaluate(
        model=model,
        tasks=task_names(),
        task_manager=_TASK_MANAGERS[key],
        log_samples=False,
        bootstrap_iters=0,
        verbosity="WARNING",
    )
    results = output["results"]
    general = {skill: float(results[task][metric]) for skill, (task, metric) in GENERAL.items()}
    scores = {
        "task": float(results[DOWNSTREAM[0]][DOWNSTREAM[1]]),
        "general": general,
        "general_avg": sum(general.values()) / len(general),
        "perplexity": float(results[PERPLEXITY[0]][PERPLEXITY[1]]),
    }
    del model
    return scores


def save_scores(scores: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(scores, indent=2) + "\n")
