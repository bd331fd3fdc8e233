"""The whole study in one call: prepare, fine-tune, build every variant, evaluate, report."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from fapm_merge.study import stages
from fapm_merge.study.config import StudyConfig, full_config, quick_config

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


def _evaluate_stage(name, folder, digest, make_model, task_dir, config, log, timings):
    """Evaluate one model (building it first if needed); reuse finished results."""
    from fapm_merge.study.evaluate import evaluate_model, save_scores

    scores_path = folder / "scores.json"
    if stages.is_done(folder, digest):
        return json.loads(scores_path.read_text()), True
    stages.begin(folder)
    started = time.time()
    model_dir, temporary = make_model(folder)
    built = time.time()
    scores = evaluate_model(model_dir, task_dir, config.eval_batch_size)
    if temporary:  # merged models are rebuilt from their recipe on demand; keep disk small
        shutil.rmtree(model_dir)
    save_scores(scores, scores_path)
    timing = {"merge_s": round(built - started, 1), "eval_s": round(time.time() - built, 1)}
    stages.finish(folder, digest, variant=name, **timing)
    timings[name] = timing
    return scores, False


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
    """
    import torch
    from tqdm import tqdm

    from fapm_merge.study import report, variants
    from fapm_merge.study.finetune import finetune
    from fapm_merge.study.prepare import prepare

    config = config or (quick_config() if quick else full_config())
    mode = "quick" if config.quick else "full"
    work_dir = Path(work_dir or Path("out/study") / mode)
    cache_dir = Path(cache_dir or DEFAULT_CACHE)
    out_dir = Path(out_dir or (work_dir / "report" if config.quick else Path("docs/study")))
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    timings: dict = {}
    log_path = work_dir / "mergekit.log"

    threads = choose_threads(threads)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the mergekit-yaml runs
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

    eval_hash = stages.config_hash(prepared["hash"], config.eval_batch_size)
    results = {}
    # digest -> variant name: a later variant identical to one already scored (full SFT at the
    # main seed, FAPM on it) is not evaluated twice
    scored = {}
    references = {"pretrained": prepared["model"], "full_sft": finetuned}
    planned = variants.sweep(config.sweeps)
    with open(log_path, "a") as log, tqdm(
        total=len(references) + len(planned), desc="variants", unit="model", dynamic_ncols=True
    ) as bar:
        for name, model_dir in references.items():
            bar.set_postfix_str(name)
            digest = stages.config_hash(eval_hash, ft_hash if name == "full_sft" else "")
            scored[digest] = name
            results[name], _ = _evaluate_stage(
                name, work_dir / "variants" / name, digest,
                lambda folder, m=model_dir: (m, False), prepared["tasks"], config, log, timings,
            )
            bar.update()
        for variant in planned:
            bar.set_postfix_str(variant.name)
            recipe = variants.recipe(variant, prepared["model"], finetuned)
            digest = stages.config_hash(eval_hash, ft_hash, recipe)
            scored[digest] = variant.name
            results[variant.name], _ = _evaluate_stage(
                variant.name, work_dir / "variants" / variant.name, digest,
                lambda folder, v=variant: (
                    variants.build(v, prepared["model"], finetuned, folder, log), True),
                prepared["tasks"], config, log, timings,
            )
            bar.update()

    # Training-time anti-forgetting methods: their own fine-tunes (same data and budget),
    # evaluated alone and with FAPM, every one (full SFT included) at each training seed.
    from dataclasses import replace

    from fapm_merge.study import antiforgetting  # noqa: F401  (registers the strategies)

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
    with open(log_path, "a") as log, tqdm(
        total=len(extra), desc="training-time variants", unit="model", dynamic_ncols=True
    ) as bar:
        for variant in extra:
            bar.set_postfix_str(variant.name)
            source = trained(variants.TRAINED[variant.method], variant.seed)
            ft_dir = trained_dirs[source]
            if variant.method in variants.FINETUNES:  # the fine-tune itself
                digest = stages.config_hash(eval_hash, trained_hashes[source])

                def make(folder, m=ft_dir):
                    return m, False
            else:
                recipe = variants.recipe(variant, prepared["model"], ft_dir)
                digest = stages.config_hash(eval_hash, trained_hashes[source], recipe)

                def make(folder, v=variant, d=ft_dir, lg=log):
                    return variants.build(v, prepared["model"], d, folder, lg), True
            if digest in scored:
                results[variant.name] = results[scored[digest]]
                timings[variant.name] = {"merge_s": 0.0, "eval_s": 0.0,
                                         "same_as": scored[digest]}
            else:
                results[variant.name], _ = _evaluate_stage(
                    variant.name, work_dir / "variants" / variant.name, digest, make,
                    prepared["tasks"], config, log, timings,
                )
            bar.update()
    planned = planned + extra

    # timings of stages reused from an earlier run come from their stamps
    for name in list(references) + [v.name for v in planned]:
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
    data = report.write_report(results, planned, meta, out_dir, work_dir, train_summary)
    print(f"[study] done in {timings['total_s_this_invocation']:.0f} s; report in {out_dir}",
          flush=True)
    return data
