"""Screen candidate general-suite tasks on the pre-trained model only (the suite's selection rule).

    python -m fapm_study.screen [--items 150] [--out FILE]

The general suite needs skills the pre-trained model *has*, or there is nothing to forget. The
rule, fixed before this screen was run: a candidate qualifies when the pre-trained model's
accuracy (``acc`` or ``acc_norm``, whichever is higher) exceeds the chance rate (the mean of
1 / number of choices) by at least three binomial standard errors. Only the pre-trained model is
scored, so the choice cannot favour any method. Every candidate gets the study's one prompt
template (``Question: ...\\nAnswer:`` and the choices after one space) and at most ``--items``
items drawn with the study's seed. Prints one line per candidate and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
from pathlib import Path

from fapm_study import prepare
from fapm_study.config import full_config

# skill -> BIG-bench tasks (paths under benchmark_tasks/), in the order they are added to the
# skill when they qualify. Left out for evaluation cost, before any score was seen:
# periodic_elements (118 choices per item) and timedial (contexts of ~900 characters).
CANDIDATES = {
    "knowledge": ["hindu_knowledge", "misconceptions", "emoji_movie"],
    "commonsense": ["goal_step_wikihow/goal_inference", "goal_step_wikihow/step_inference",
                    "anachronisms", "fantasy_reasoning", "winowhy"],
}


def qualifies(score: float, chance: float, items: int) -> bool:
    """The rule: at least three binomial standard errors (at the chance rate) above chance."""
    return score - chance >= 3 * math.sqrt(chance * (1 - chance) / items)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=150)
    parser.add_argument("--cache", type=Path,
                        default=Path.home() / ".cache" / "fapm-merge" / "study")
    parser.add_argument("--out", type=Path, help="JSON results (default: CACHE/screen.json)")
    args = parser.parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    config = full_config()
    prepared = prepare.prepare(config, args.cache, args.cache / "work")
    archive = prepare.pip_download(prepare.DATA_PACKAGE, args.cache / "downloads")
    paths = [path for paths in CANDIDATES.values() for path in paths]
    sources = prepare.read_bigbench(archive, {path: path for path in paths})
    rows = []
    with tempfile.TemporaryDirectory() as tasks:
        names = {}
        for path in paths:
            rng = random.Random(config.seed)
            items = [prepare.multiple_choice_item(e) for e in sources[path]]
            rng.shuffle(items)
            names[path] = "screen_" + path.replace("/", "_")
            prepare.write_task(names[path], items[:args.items], prepare.MULTIPLE_CHOICE,
                               Path(tasks))
        model = HFLM(pretrained=str(prepared["model"]), batch_size=config.eval_batch_size,
                     device="cpu")
        results = lm_eval.simple_evaluate(model=model, tasks=list(names.values()),
                                          task_manager=TaskManager(include_path=tasks))
        for skill, candidates in CANDIDATES.items():
            for path in candidates:
                got = results["results"][names[path]]
                items = [json.loads(line) for line in
                         (Path(tasks) / f"{names[path]}.jsonl").read_text().splitlines()]
                chance = sum(1 / len(i["choices"]) for i in items) / len(items)
                metric = max(("acc", "acc_norm"), key=lambda m: got[f"{m},none"])
                score = got[f"{metric},none"]
                rows.append({"skill": skill, "task": path, "items": len(items),
                             "metric": metric, "score": round(score, 4),
                             "chance": round(chance, 4),
                             "qualifies": qualifies(score, chance, len(items))})
                print(f"{skill:12s} {path:36s} n={len(items):4d} {metric:8s} "
                      f"{score:.3f} chance {chance:.3f} {'yes' if rows[-1]['qualifies'] else 'no'}")
    out = args.out or args.cache / "screen.json"
    out.write_text(json.dumps({"rule": "score - chance >= 3 * sqrt(chance (1 - chance) / items)",
                               "model": "pre-trained", "candidates": rows}, indent=1) + "\n")
    print(f"screen results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
