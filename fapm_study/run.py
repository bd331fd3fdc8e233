"""The whole study in one call: prepare, fine-tune, build every variant, evaluate, report."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from fapm_study import stages
from fapm_study.config import StudyConfig, full_config, quick_config
from fapm_merge.sweep.variants import dump_recipe

DEFAULT_CACHE = Path(os.environ.get("FAPM_STUDY_CACHE", Path.home() / ".cache/fapm-merge/study"))


def _machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("torch", "transformers", "mergekit", "lm_eval"):
        try:
            from importlib.metadata import version

            versions[package] = version(package.replace("_", "-"))
        except Exception:  # pragma: no cover - informational only
            versions[package] = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "os": platform.platform(),
        "packages": versions,
    }


def _evaluate_stage(name, folder, digest, score, recipe, timings):
    """Score one training-time model (``score()`` -> build s, eval s, scores) unless a finished
    result with the same digest exists; the recipe (None for a fine-tune itself) is written
    beside it."""
    from fapm_study.evaluate import save_scores

    scores_path = folder / "scores.json"
    if stages.is_done(folder, digest):
        return json.loads(scores_path.read_text())
    stages.begin(folder)
    if recipe is not None:
        (folder / "recipe.yml").write_text(dump_recipe(recipe))
    built, scored, scores = score()
    save_scores(scores, scores_path)
    timing = {"merge_s": round(built, 1), "eval_s": round(scored, 1)}
    stages.finish(folder, digest, variant=name, **timing)
    timings[name] = timing
    return scores


def _main_sweep(config, prepared, finetuned, work_dir, timings):
    """The main fine-tune's references and post-hoc variants: one ``fapm-merge sweep`` run
    (resumable through its results.json). Returns (scores by study name, recipes by name)."""
    from fapm_study import variants
    from fapm_study.evaluate import study_scores, sweep_options, write_pair_recipe
    from fapm_merge.sweep.run import run_sweep

    sweeps = config.sweeps
    recipe_path = write_pair_recipe(variants.pair_recipe(prepared["model"], finetuned),
                                    work_dir / "posthoc.yml")
    options = sweep_options(recipe_path, work_dir / "posthoc", prepared["tasks"],
                            config.eval_batch_size, sparsities=sweeps.sparsities,
                            scores=sweeps.pruning_methods, wise=sweeps.wise_alphas,
                            dare_seeds=sweeps.dare_seeds, lines=sweeps.lines_lows)
    data = run_sweep(options)
    results, recipes = {}, {}
    for key in data["current"]:
        entry = data["variants"][key]
        name = {"finetuned": "full_sft"}.get(entry["name"], entry["name"])
        results[name] = study_scores(entry["scores"])
        recipes[name] = entry["recipe"]
        timings[name] = {"merge_s": round(entry["build_s"], 1), "eval_s": round(entry["eval_s"], 1)}
    return results, recipes


def choose_threads(requested: Optional[int] = None) -> int:
    """Torch threads for every stage: ``requested``, else 1 on a busy machine, else all cores.

    On a shared machine whose load exceeds its cores, two OpenMP threads spin-wait on each
    other and ran 2.4x *slower* than one thread here (SmolLM2-135M forward, load 7 on 2 cores).
    """
    if requested:
        return requested
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores
    except OSError:
        busy = False
    return 1 if busy else cores


def run_study(
    quick: bool = False,
    out_dir: Optional[Path] = None,
    work_dir: Optional[Path] = None,
    cache_dir: Optional[Path] = None,
    config: Optional[StudyConfig] = None,
    command: str = "",
    threads: Optional[int] = None,
    suite: str = "full",
    second_task: bool = True,
) -> dict:
    """Run (or resume) the study and write its report; returns the report's data.

    Args:
        quick: tiny local model and a handful of items (CI check of the pipeline, seconds).
        out_dir: where the report goes (default ``docs/study`` for the full run,
            ``<work_dir>/report`` for the quick one).
        work_dir: models, task files and per-variant results (default ``out/study/<mode>``).
        cache_dir: downloaded packages and the converted model (default
            ``~/.cache/fapm-merge/study`` or ``$FAPM_STUDY_CACHE``).
        threads: torch threads (default: :func:`choose_threads`); mergekit gets the same.
        suite: the general suite's size, a key of :data:`fapm_study.config.SUITES` (ignored
            with ``quick`` or ``config``).
        second_task: also run ``config.second_task`` (:func:`fapm_study.pilot.run_task`),
            its report in ``out_dir/<task>/``.
    """
    import torch
    from tqdm import tqdm

    from fapm_study import report, variants
    from fapm_study.finetune import finetune
    from fapm_study.prepare import prepare

    config = config or (quick_config() if quick else full_config(suite))
    mode = "quick" if config.quick else "full"
    work_dir = Path(work_dir or Path("out/study") / mode)
    cache_dir = Path(cache_dir or DEFAULT_CACHE)
    out_dir = Path(out_dir or (work_dir / "report" if config.quick else Path("docs/study")))
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    timings: dict = {}

    threads = choose_threads(threads)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    print(f"[study] {mode} run, {threads} thread(s); work dir {work_dir}, report to {out_dir}",
          flush=True)
    prepared = prepare(config, cache_dir, work_dir)
    timings["prepare_s"] = prepared["wall_s"]

    finetuned = work_dir / "models" / "full_sft"
    ft_hash = stages.config_hash(prepared["train_hash"], config.training)
    if stages.is_done(finetuned, ft_hash):
        print("[study] fine-tune: reusing", finetuned, flush=True)
        train_summary = json.loads((finetuned / "train.json").read_text())
    else:
        stages.begin(finetuned)
        train_summary = finetune(prepared["model"], prepared["tasks"] / "train.jsonl",
                                 finetuned, config.training)
        stages.finish(finetuned, ft_hash)
    timings["finetune_s"] = train_summary["wall_s"]

    # The main fine-tune: both references and every post-hoc variant, by `fapm-merge sweep`.
    planned = variants.sweep(config.sweeps)
    results, recipes = _main_sweep(config, prepared, finetuned, work_dir, timings)
    missing = [v.name for v in planned if v.name not in results]
    if missing:
        raise RuntimeError(f"the sweep did not score {', '.join(missing)}")
    eval_hash = stages.config_hash(prepared["hash"], config.eval_batch_size)
    # digest -> variant name: a training-time variant identical to one already scored (full
    # SFT at the main seed, FAPM on it) is not evaluated twice
    scored = {stages.config_hash(eval_hash, ft_hash, recipes.get(name)): name
              for name in results if name != "pretrained"}

    # Training-time anti-forgetting methods: their own fine-tunes (same data and budget),
    # evaluated alone and with FAPM, every one (full SFT included) at each training seed.
    from dataclasses import replace

    from fapm_study import antiforgetting  # noqa: F401  (registers the strategies)
    from fapm_study.evaluate import FineTuneScorer, write_pair_recipe
    from fapm_merge.sweep.variants import load_sweep_recipe, variant_recipe

    methods = config.training_methods
    options_of = {
        "full_sft": config.training,
        "sft_sam": replace(config.training, strategy="sam",
                           strategy_args={"rho": methods.sam_rho}),
        "sft_reg": replace(config.training, strategy="importance_reg",
                           strategy_args={"lam": methods.regularizer_lam,
                                          "importance_steps": methods.importance_steps}),
    }
    costs = {"full_sft": train_summary}
    trained_dirs, trained_hashes = {"full_sft": finetuned}, {"full_sft": ft_hash}

    def trained(source: str, seed: int) -> str:
        """Fine-tune ``source`` at ``seed`` (or reuse it); returns its folder name."""
        name = variants.finetune_name(source, seed, config.training.seed)
        if name in trained_dirs:
            return name
        options = replace(options_of[source], seed=seed)
        folder = work_dir / "models" / name
        digest = stages.config_hash(prepared["train_hash"], options)
        if stages.is_done(folder, digest):
            print(f"[study] fine-tune {name}: reusing {folder}", flush=True)
            costs[name] = json.loads((folder / "train.json").read_text())
        else:
            stages.begin(folder)
            costs[name] = finetune(prepared["model"], prepared["tasks"] / "train.jsonl",
                                   folder, options)
            stages.finish(folder, digest)
        trained_dirs[name], trained_hashes[name] = folder, digest
        timings.setdefault("extra_finetunes_s", {})[name] = costs[name]["wall_s"]
        return name

    extra = variants.training_sweep(methods)
    by_source: Dict[tuple, List] = {}  # (method's fine-tune, seed) -> its variants, in order
    for variant in extra:
        by_source.setdefault((variants.TRAINED[variant.method], variant.seed), []).append(variant)
    with tqdm(total=len(extra), desc="training-time variants", unit="model",
              dynamic_ncols=True) as bar:
        for (source_method, seed), group in by_source.items():
            source = trained(source_method, seed)
            recipe_path = write_pair_recipe(
                variants.pair_recipe(prepared["model"], trained_dirs[source]),
                work_dir / "recipes" / f"{source}.yml")
            pair = load_sweep_recipe(str(recipe_path))
            todo = []
            for variant in group:
                sweep_variant = variants.sweep_variant(variant)
                recipe = variant_recipe(pair, sweep_variant)
                digest = stages.config_hash(eval_hash, trained_hashes[source], recipe)
                recipes[variant.name] = recipe
                if digest in scored:
                    results[variant.name] = results[scored[digest]]
                    timings[variant.name] = {"merge_s": 0.0, "eval_s": 0.0,
                                             "same_as": scored[digest]}
                    bar.update()
                else:
                    todo.append((variant, sweep_variant, digest))
            scorer = None
            try:
                for variant, sweep_variant, digest in todo:
                    bar.set_postfix_str(variant.name)
                    folder = work_dir / "variants" / variant.name
                    if scorer is None and not stages.is_done(folder, digest):
                        scorer = FineTuneScorer(recipe_path, prepared["tasks"],
                                                config.eval_batch_size,
                                                [v for _, v, _ in todo])
                    results[variant.name] = _evaluate_stage(
                        variant.name, folder, digest,
                        lambda v=sweep_variant: scorer.score(v),
                        recipes[variant.name], timings)
                    scored[digest] = variant.name
                    bar.update()
            finally:
                if scorer is not None:
                    scorer.close()
    planned = planned + extra

    # The second task, learned from scratch: its own fine-tune and sweep, its own report.
    if second_task and config.second_task is not None:
        from fapm_study.pilot import run_task

        task = config.second_task
        print(f"[study] second task: {task.name}", flush=True)
        second = run_task(config, prepared, task.name, work_dir / "pilot", cache_dir,
                          out=out_dir / task.folder, command=command)
        timings["second_task"] = {"task": task.name, "folder": task.folder, **second["wall_s"]}

    # timings of stages reused from an earlier run come from their stamps
    for name in [v.name for v in planned]:
        if name not in timings:
            stamp = stages.read_stamp(work_dir / "variants" / name)
            timings[name] = {k: stamp.get(k) for k in ("merge_s", "eval_s")}
    timings["total_s_this_invocation"] = round(time.time() - started, 1)
    meta = {
        "mode": mode,
        "command": command or " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": _machine(),
        "config": stages._plain(config),
        "sizes": prepared["sizes"],
        "training": {k: v for k, v in train_summary.items() if k != "losses"},
        "training_costs": {
            name: {k: summary.get(k) for k in ("strategy", "wall_s", "strategy_prepare_s",
                                               "peak_rss_gb", "steps", "last_loss")}
            for name, summary in costs.items()
        },
        "timings": timings,
    }
    data = report.write_report(results, planned, meta, out_dir, recipes, train_summary)
    print(f"[study] done in {timings['total_s_this_invocation']:.0f} s; report in {out_dir}",
          flush=True)
    return data
