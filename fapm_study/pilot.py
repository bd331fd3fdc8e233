"""A second downstream task (or the study's own, on the full suite) against every rival.

    python -m fapm_study.pilot [--task word_sorting|qasc] [--sweep "OPTIONS"] [--out FOLDER]

A second task must make the fine-tune move the model: the pre-trained model near zero, many
steps to learn it, and WiSE-FT at a small alpha losing much of it (unlike QASC, where alpha
0.25 keeps almost all). This reuses the study's stage 1 (the SmolLM2-135M model and its general
suite, downloaded and cached once), builds the task from the BIG-bench archive (the settings of
:class:`fapm_study.config.SecondTask`; ``qasc`` takes the study's own split and training
settings), fine-tunes every weight with the study's trainer, then scores the pre-trained model,
the fine-tune and every method of ``--sweep`` with ``fapm-merge sweep`` (lm-eval, the study's
suite and metrics). Resumable: a finished fine-tune is reused and the sweep scores only what is
new. Works in ``CACHE/pilot/TASK/`` (the sweep in ``sweep-<fine-tune>/``, beside pilot.json
with the split sizes, the training summary and the wall times); ``--out`` also copies the
report there with the home folder written as ``~``, as docs/study/ holds it.
``fapm-merge study`` runs the word-sorting task this way after the QASC study.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Tuple

from fapm_study import prepare
from fapm_study.config import SecondTask, StudyConfig, full_config

# the study's suite with the study's metric per skill
GENERAL_TASKS = ",".join(f"{task}:{metric}" for task, metric in prepare.GENERAL.values())
EXTRA_TASKS = ":".join(prepare.PERPLEXITY)
REPORT_FILES = ("results.md", "results.json", "pilot.json", "pareto.png")


def _qasc(prepared: dict, train: Optional[int]) -> Tuple[str, List[dict], int]:
    """The study's own QASC split: (lm-eval task name, training rows, test item count)."""
    name = "study_qasc"
    rows = [json.loads(line) for line in
            (prepared["tasks"] / "train.jsonl").read_text().splitlines()][:train]
    return name, rows, len((prepared["tasks"] / f"{name}.jsonl").read_text().splitlines())


def _bigbench(config: StudyConfig, task: SecondTask, cache: Path, tasks: Path,
              train: Optional[int]) -> Tuple[str, List[dict], int]:
    """``task`` from the BIG-bench archive (synthetic items in quick mode), its test split
    written as an exact-match lm-eval task in ``tasks``: (task name, training rows, test count).
    """
    if config.quick:
        examples = prepare.synthetic_word_sorting(task.test + task.train, config.seed)
    else:
        archive = prepare.pip_download(prepare.DATA_PACKAGE, cache / "downloads")
        examples = prepare.read_bigbench(archive, {task.name: task.name})[task.name]
    random.Random(config.seed).shuffle(examples)
    test, rest = examples[:task.test], examples[task.test:]
    prompt = [task.template.format(input=e["input"].strip()) for e in examples]
    rows = [{"prompt": p, "answer": " " + e["target"].strip()}
            for p, e in zip(prompt[task.test:], rest)][:train or task.train]
    # "pilot_" is kept in the name: the committed sweeps' caches are keyed on it
    name = f"pilot_{task.name}"
    prepare.write_task(name, [{"query": p, "answer": e["target"].strip()}
                              for p, e in zip(prompt, test)],
                       prepare.exact_match_body(task.max_tokens), tasks)
    return name, rows, len(test)


def _sweep_seconds(results: Path) -> float:
    """The sweep's own time: build + score of every model it reports (also when reused)."""
    data = json.loads(results.read_text())
    return sum(data["variants"][key]["build_s"] + data["variants"][key]["eval_s"]
               for key in data["current"])


def publish(sweep_dir: Path, out: Path) -> None:
    """Copy a sweep's report to ``out``, the home folder written as ``~`` (docs hold no
    machine's paths)."""
    out.mkdir(parents=True, exist_ok=True)
    home = str(Path.home())
    for path in sorted(sweep_dir.iterdir()):
        if path.name in REPORT_FILES or path.name.startswith("tradeoff-"):
            if path.suffix in (".md", ".json"):
                (out / path.name).write_text(path.read_text().replace(home, "~"))
            else:
                (out / path.name).write_bytes(path.read_bytes())


def run_task(config: StudyConfig, prepared: dict, task: str, work_root: Path, cache: Path, *,
             sweep: Optional[str] = None, out: Optional[Path] = None,
             train: Optional[int] = None, epochs: Optional[int] = None,
             learning_rate: Optional[float] = None, no_sweep: bool = False,
             command: str = "") -> dict:
    """Fine-tune on ``task`` ("qasc" or ``config.second_task``'s name) and sweep it; returns
    the pilot.json data (``wall_s``: the fine-tune's and the sweep's own times, summed).

    Args:
        prepared: :func:`fapm_study.prepare.prepare`'s result (model and general suite).
        work_root: the task works in ``work_root/TASK`` (fine-tune, tasks, sweep).
        cache: where the BIG-bench archive is downloaded (``cache/downloads``).
        sweep: ``fapm-merge sweep`` options [the SecondTask's].
        out: also publish the report there (:func:`publish`).
        train / epochs / learning_rate: override the task's training settings.
        no_sweep: stop after the fine-tune.
    """
    from fapm_study.finetune import finetune

    second = config.second_task or SecondTask()
    work = Path(work_root) / task
    tasks = work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    suite = [name for name, _ in [*prepare.GENERAL.values(), prepare.PERPLEXITY]]
    if task == "qasc":
        name, rows, test_items = _qasc(prepared, train)
        suite.append(name)
        options, source, template = config.training, "the study's (fapm_study/prepare.py)", None
    elif task == second.name:
        name, rows, test_items = _bigbench(config, second, cache, tasks, train)
        options, source, template = second.training, second.name, second.template
    else:
        raise ValueError(f"unknown task {task!r}: 'qasc' or {second.name!r}")
    for suite_task in suite:  # the study's suite, beside the task
        for suffix in (".yaml", ".jsonl"):
            (tasks / f"{suite_task}{suffix}").write_bytes(
                (prepared["tasks"] / f"{suite_task}{suffix}").read_bytes())
    options = replace(options, epochs=epochs or options.epochs,
                      learning_rate=learning_rate or options.learning_rate)
    train_file = work / "train.jsonl"
    train_file.write_text("".join(json.dumps(e) + "\n" for e in rows))

    # one folder per training setting, so a rerun with other settings never reuses a fine-tune
    finetuned = work / f"finetuned-n{len(rows)}-e{options.epochs}-lr{options.learning_rate:g}"
    if not (finetuned / "train.json").is_file():
        finetune(prepared["model"], train_file, finetuned, options)
    training = json.loads((finetuned / "train.json").read_text())
    training.pop("losses", None)
    summary = {"task": task, "bigbench_path": source, "template": template,
               "train_items": len(rows), "test_items": test_items, "training": training,
               "command": command}
    if no_sweep:
        print(f"fine-tune: {finetuned} ({training['steps']} steps, {training['wall_s']:.0f} s)")
        return summary
    recipe = work / f"recipe-{finetuned.name}.yml"
    recipe.write_text(f"merge_method: fapm\nbase_model: {prepared['model']}\nmodels:\n"
                      f"  - model: {finetuned}\ndtype: float32\n")
    sweep_dir = work / f"sweep-{finetuned.name}"
    started = time.time()
    subprocess.run([str(Path(sys.executable).with_name("fapm-merge")), "sweep", str(recipe),
                    str(sweep_dir), "--task-tasks", name, "--general-tasks", GENERAL_TASKS,
                    "--extra-tasks", EXTRA_TASKS, "--include-path", str(tasks),
                    "--batch-size", str(config.eval_batch_size),
                    *shlex.split(second.sweep if sweep is None else sweep)], check=True)
    sweep_s = _sweep_seconds(sweep_dir / "results.json")
    summary["wall_s"] = {"finetune": training["wall_s"], "sweep": round(sweep_s, 1),
                         "total": round(training["wall_s"] + sweep_s, 1),
                         "this_invocation": round(time.time() - started, 1)}
    (sweep_dir / "pilot.json").write_text(json.dumps(summary, indent=1) + "\n")
    if out is not None:
        publish(sweep_dir, Path(out))
    print(f"{task}: results in {sweep_dir}" + (f", published to {out}" if out else ""))
    return summary


def main() -> int:
    second = SecondTask()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=[second.name, "qasc"], default=second.name)
    parser.add_argument("--train", type=int, help="train on the first N of the rest")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fapm-merge" / "study")
    parser.add_argument("--out", type=Path, help="also copy the report to this folder")
    parser.add_argument("--no-sweep", action="store_true",
                        help="stop after the fine-tune (to sweep it later with other settings)")
    parser.add_argument("--sweep", default=second.sweep,
                        help=f"fapm-merge sweep options [{second.sweep}]")
    args = parser.parse_args()

    config = full_config()
    try:
        prepared = prepare.prepare(config, args.cache, args.cache / "work")
    except prepare.DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_task(config, prepared, args.task, args.cache / "pilot", args.cache, sweep=args.sweep, out=args.out,
             train=args.train, epochs=args.epochs, learning_rate=args.learning_rate,
             no_sweep=args.no_sweep,
             command="python -m fapm_study.pilot " + shlex.join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
