"""A second downstream task (or the study's own, on the full suite) against every rival.

    python -m fapm_study.pilot [--task word_sorting|qasc] [--sweep "OPTIONS"] [--out FOLDER]

A second task must make the fine-tune move the model: the pre-trained model near zero, many
steps to learn it, and WiSE-FT at a small alpha losing much of it (unlike QASC, where alpha
0.25 keeps almost all). This reuses the study's stage 1 (the SmolLM2-135M model and its general
suite, downloaded and cached once), builds the task from the BIG-bench archive (``--test`` items
held out, ``--train`` of the rest trained on; ``qasc`` takes the study's own split and training
settings), fine-tunes every weight with the study's trainer, then scores the pre-trained model,
the fine-tune and every method of ``--sweep`` with ``fapm-merge sweep`` (lm-eval, the study's
suite and metrics). Resumable: a finished fine-tune is reused and the sweep scores only what is
new. Writes ``OUT/TASK/sweep-<fine-tune>/`` (the sweep's results.md / results.json / plots and
pilot.json with the split sizes and the training summary).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from fapm_study import prepare
from fapm_study.config import full_config
from fapm_study.finetune import finetune

# name -> (path under bigbench/benchmark_tasks/, prompt template, max generated tokens,
#          default training: examples, epochs, learning rate, max tokens per example);
# "qasc" is the study's own task, split and training settings (fapm_study/config.py)
CANDIDATES = {
    "word_sorting": ("word_sorting", "Sort these words alphabetically: {input}\nAnswer:", 64,
                     (1500, 3, 5e-4, 128)),
    "qasc": None,
}
# the study's suite with the study's metric per skill
GENERAL_TASKS = ",".join(f"{task}:{metric}" for task, metric in prepare.GENERAL.values())
EXTRA_TASKS = ":".join(prepare.PERPLEXITY)
# the methods and knobs swept (``fapm-merge sweep`` options); the task vector has to carry a
# task learned from scratch, so the sparsities reach lower than the QASC study's
SWEEP = ("--sparsity 0.3,0.5,0.7,0.9 --score fapm,magnitude --dare-seeds 0 --wise 0.25,0.5,0.75 "
         "--lines 0 --spectral --lowrank 16,64")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(CANDIDATES), default="word_sorting")
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--train", type=int, help="train on the first N of the rest")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fapm-merge" / "study")
    parser.add_argument("--out", type=Path, help="results folder (default: CACHE/pilot/)")
    parser.add_argument("--no-sweep", action="store_true",
                        help="stop after the fine-tune (to sweep it later with other settings)")
    parser.add_argument("--sweep", default=SWEEP, help=f"fapm-merge sweep options [{SWEEP}]")
    args = parser.parse_args()

    config = full_config()
    work = args.cache / "pilot" / args.task
    prepared = prepare.prepare(config, args.cache, args.cache / "work")
    tasks = work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    suite = [task for task, _ in [*prepare.GENERAL.values(), prepare.PERPLEXITY]]
    if args.task == "qasc":
        name, template, options = "study_qasc", None, config.training
        suite.append(name)
        train = [json.loads(line) for line in
                 (prepared["tasks"] / "train.jsonl").read_text().splitlines()][:args.train]
        test = (prepared["tasks"] / f"{name}.jsonl").read_text().splitlines()
        path = "the study's (fapm_study/prepare.py)"
    else:
        path, template, max_tokens, (n_train, epochs, lr, max_length) = CANDIDATES[args.task]
        options = replace(config.training, epochs=epochs, learning_rate=lr, max_length=max_length)
        archive = prepare.pip_download(prepare.DATA_PACKAGE, args.cache / "downloads")
        examples = prepare.read_bigbench(archive, {args.task: path})[args.task]
        random.Random(config.seed).shuffle(examples)
        test = examples[:args.test]
        train = [{"prompt": template.format(input=e["input"].strip()),
                  "answer": " " + e["target"].strip()}
                 for e in examples[args.test:][:args.train or n_train]]
        name = f"pilot_{args.task}"
        prepare.write_task(name, [{"query": template.format(input=e["input"].strip()),
                                   "answer": e["target"].strip()} for e in test],
                           prepare.exact_match_body(max_tokens), tasks)
    for task in suite:  # the study's suite, beside the candidate
        for suffix in (".yaml", ".jsonl"):
            (tasks / f"{task}{suffix}").write_bytes(
                (prepared["tasks"] / f"{task}{suffix}").read_bytes())
    options = replace(options, epochs=args.epochs or options.epochs,
                      learning_rate=args.learning_rate or options.learning_rate)
    train_file = work / "train.jsonl"
    train_file.write_text("".join(json.dumps(e) + "\n" for e in train))

    # one folder per training setting, so a rerun with other settings never reuses a fine-tune
    finetuned = work / f"finetuned-n{len(train)}-e{options.epochs}-lr{options.learning_rate:g}"
    if not (finetuned / "train.json").is_file():
        finetune(prepared["model"], train_file, finetuned, options)
    training = json.loads((finetuned / "train.json").read_text())
    if args.no_sweep:
        print(f"fine-tune: {finetuned} ({training['steps']} steps, {training['wall_s']:.0f} s)")
        return 0
    recipe = work / f"recipe-{finetuned.name}.yml"
    recipe.write_text(f"merge_method: fapm\nbase_model: {prepared['model']}\nmodels:\n"
                      f"  - model: {finetuned}\ndtype: float32\n")
    out = (args.out or args.cache / "pilot") / args.task / f"sweep-{finetuned.name}"
    sweep = [str(Path(sys.executable).with_name("fapm-merge")), "sweep", str(recipe), str(out),
             "--task-tasks", name, "--general-tasks", GENERAL_TASKS, "--extra-tasks", EXTRA_TASKS,
             "--include-path", str(tasks), "--batch-size", "16", *shlex.split(args.sweep)]
    subprocess.run(sweep, check=True)
    training.pop("losses", None)
    (out / "pilot.json").write_text(json.dumps({
        "task": args.task, "bigbench_path": path, "template": template,
        "train_items": len(train), "test_items": len(test), "training": training,
        "command": "python -m fapm_study.pilot " + " ".join(sys.argv[1:]),
    }, indent=1) + "\n")
    print(f"pilot results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
