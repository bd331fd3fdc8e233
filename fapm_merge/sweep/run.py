"""The sweep: check everything, score what is not scored yet, report.

Order of work (so bad input fails before any model is loaded): options and recipe, the OUT
folder, lm-eval task names and metrics; then the models, once; then every pending variant,
each saved to ``results.json`` (atomically) as soon as it is scored.
"""

from __future__ import annotations

import inspect
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from fapm_merge.sweep import evaluate as ev
from fapm_merge.sweep import results as res
from fapm_merge.sweep.variants import (
    SWEEPABLE_SCORES,
    SweepInputError,
    Variant,
    build_variants,
    dump_recipe,
    load_sweep_recipe,
    model_fingerprint,
    variant_key,
    variant_recipe,
)


@dataclass
class SweepOptions:
    """Everything ``fapm-merge sweep`` takes (see docs/sweep.md for each option)."""

    recipe: str
    out_dir: str
    sparsities: List[float]
    task_tasks: List[ev.TaskSpec]
    general_tasks: List[ev.TaskSpec]
    extra_tasks: List[ev.TaskSpec] = field(default_factory=list)
    scores: Optional[List[str]] = None
    include_path: Optional[str] = None
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None
    wise: List[float] = field(default_factory=list)
    dare_seeds: List[int] = field(default_factory=list)
    lines: List[float] = field(default_factory=list)
    spectral: bool = False
    lowrank: List[int] = field(default_factory=list)
    min_retention: float = 0.95
    device: str = "cpu"
    batch_size: str = "8"
    model_args: str = ""
    low_memory: bool = False
    backend: str = "hf"
    force: bool = False
    bootstrap_iters: int = 1000
    tokenizer: Optional[str] = None
    command: List[str] = field(default_factory=list)
    quiet: bool = False


def _versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("fapm-merge", "mergekit", "lm_eval", "torch", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def check_options(options: SweepOptions) -> None:
    if not options.sparsities:
        raise SweepInputError("--sparsity: give at least one value, e.g. 0.5,0.9,0.99")
    for score in options.scores or []:
        if score not in SWEEPABLE_SCORES:
            raise SweepInputError(f"--score: unknown score {score!r}; valid: "
                                  f"{', '.join(SWEEPABLE_SCORES)}")
    if not options.task_tasks:
        raise SweepInputError("--task-tasks: name the lm-eval task(s) the fine-tune was "
                              "trained for (downstream retention is measured on them)")
    if not options.general_tasks:
        raise SweepInputError("--general-tasks: name the lm-eval task(s) that measure what "
                              "the pre-trained model could do (forgetting is measured on them)")
    seen: Dict[str, str] = {}
    for option, specs in (("--task-tasks", options.task_tasks),
                          ("--general-tasks", options.general_tasks),
                          ("--extra-tasks", options.extra_tasks)):
        for spec in specs:
            if spec.task in seen and seen[spec.task] != option:
                raise SweepInputError(f"task {spec.task!r} is in both {seen[spec.task]} and "
                                      f"{option}; put it in one")
            seen[spec.task] = option
    if not 0 < options.min_retention <= 2:
        raise SweepInputError("--min-retention: a fraction, e.g. 0.95")
    if options.backend != "hf" and not options.low_memory:
        raise SweepInputError(f"--backend {options.backend} evaluates written models: add "
                              "--low-memory (the in-memory sweep hands lm-eval a transformers "
                              "model object, which only the hf backend takes)")


def _load_previous(path: str, digest: str, models: dict, force: bool) -> dict:
    import json

    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except ValueError:
        if force:
            return {}
        raise SweepInputError(f"{path} is not readable JSON; pass --force to start over") from None
    same_recipe = data.get("recipe", {}).get("digest") == digest
    same_models = {k: v.get("path") for k, v in data.get("models", {}).items()} == {
        k: v["path"] for k, v in models.items()}
    if not (same_recipe and same_models) and not force:
        raise SweepInputError(
            f"{path} holds results of a different recipe or models "
            f"({data.get('recipe', {}).get('path', '?')}); use another OUT folder, or pass "
            "--force to discard them")
    return data if (same_recipe and same_models) else {}


def run_sweep(options: SweepOptions, echo=print) -> dict:
    """Run (or resume) a sweep; returns the final results dict (also in OUT/results.json)."""
    check_options(options)
    ev.require_lm_eval()
    recipe = load_sweep_recipe(options.recipe)
    scores = options.scores or [recipe.score()]
    models = {"base": model_fingerprint(recipe.base),
              "finetuned": model_fingerprint(recipe.finetuned)}
    os.makedirs(options.out_dir, exist_ok=True)
    results_path = os.path.join(options.out_dir, "results.json")
    previous = _load_previous(results_path, recipe.digest, models, options.force)

    manager = ev.task_manager(options.include_path, [
        t.task for t in options.task_tasks + options.general_tasks + options.extra_tasks])
    task_specs = ev.resolve_metrics(manager, options.task_tasks)
    general_specs = ev.resolve_metrics(manager, options.general_tasks)
    extra_specs = ev.resolve_metrics(manager, options.extra_tasks)
    specs = task_specs + general_specs + extra_specs

    from fapm_merge.sweep.engine import output_dtype

    dtype = output_dtype(recipe)
    dtype_name = str(dtype).replace("torch.", "")
    evaluation = {
        "tasks": [s.label for s in specs],
        "task_files": ev.task_fingerprint(manager, [s.task for s in specs]),
        "limit": options.limit,
        "num_fewshot": options.num_fewshot, "lm_eval": _versions()["lm_eval"],
        "dtype": dtype_name, "backend": options.backend,
        "model_args": options.model_args, "bootstrap_iters": options.bootstrap_iters,
    }
    variants = build_variants(recipe, options.sparsities, scores, options.wise,
                              options.dare_seeds, options.lines, options.spectral,
                              options.lowrank)
    keyed = []
    for variant in variants:
        config = variant_recipe(recipe, variant)
        keyed.append((variant_key(models, config or {"dtype": dtype_name}, variant, evaluation),
                      variant, config))
    entries: Dict[str, dict] = dict(previous.get("variants", {}))
    data = {
        "schema": res.SCHEMA,
        "complete": False,
        "command": options.command or ["fapm-merge", "sweep"],
        "versions": _versions(),
        "recipe": {"path": options.recipe, "digest": recipe.digest, "source": recipe.source},
        "models": models,
        "tasks": {"task": [{"task": s.task, "metric": s.metric} for s in task_specs],
                  "general": [{"task": s.task, "metric": s.metric} for s in general_specs],
                  "extra": [{"task": s.task, "metric": s.metric} for s in extra_specs]},
        "evaluation": evaluation,
        "mode": "low-memory" if options.low_memory else "in-memory",
        "current": [key for key, _, _ in keyed],
        "variants": entries,
    }
    # scored in the order that builds cheapest in memory: from the base through one score's
    # sparsities downwards (each step only adds fine-tuned elements), the fine-tune after
    pending = sorted(((k, v, c) for k, v, c in keyed if k not in entries),
                     key=lambda item: _build_order(item[1]))
    res.write_json_atomic(results_path, data)
    start = time.perf_counter()
    timing = {"setup_s": 0.0, "build_s": 0.0, "eval_s": 0.0}
    if pending:
        echo(f"sweep: {len(pending)} of {len(keyed)} variant(s) to score "
             f"({len(keyed) - len(pending)} already in {results_path})")
        scorer = (LowMemoryScorer if options.low_memory else InMemoryScorer)(options, recipe, dtype,
                                                                  manager, specs)
        try:
            timing["setup_s"] = scorer.setup([v for _, v, _ in pending])
            from tqdm import tqdm

            bar = tqdm(pending, desc="sweep", unit="variant", disable=options.quiet)
            for key, variant, config in bar:
                bar.set_postfix_str(variant.name)
                built, scored, values = scorer.score(variant, config)
                timing["build_s"] += built
                timing["eval_s"] += scored
                entries[key] = {"name": variant.name, "variant": variant.as_dict(),
                                "method": variant.method, "recipe": config, "scores": values,
                                "build_s": round(built, 3), "eval_s": round(scored, 3)}
                data["variants"] = entries
                res.write_json_atomic(results_path, data)  # saved at once: Ctrl-C loses
        finally:                                           # at most the variant in flight
            scorer.close()
    else:
        echo(f"sweep: all {len(keyed)} variant(s) already scored in {results_path}")
    timing["wall_s"] = time.perf_counter() - start
    data["timing"] = {k: round(v, 3) for k, v in timing.items()}
    return finish(data, keyed, options, results_path, task_specs, general_specs, recipe, echo)


def _build_order(variant: Variant) -> int:
    if variant.kind == "reference":
        return 0 if variant.reference == "pretrained" else 2
    return 1 if variant.kind == "sweep" else 3


def finish(data, keyed, options, results_path, task_specs, general_specs, recipe, echo):
    """Figures of merit, the rule, results.md, the plots and recommended.yml."""
    entries = data["variants"]
    current = [dict(entries[k], key=k) for k, _, _ in keyed]
    references = {e["variant"]["reference"]: e for e in current if e["variant"]["kind"] == "reference"}
    task_names = [s.task for s in task_specs]
    general_names = [s.task for s in general_specs]
    for entry in current:
        entry["figures"] = res.figures(entry, references, task_names, general_names)
        entries[entry["key"]]["figures"] = entry["figures"]
    sweep_rows = [e for e in current if e["variant"]["kind"] == "sweep"]
    compare = res.Comparison(references, task_names, general_names)
    choice = res.recommend(sweep_rows, options.min_retention, compare)
    recommended_path = os.path.join(options.out_dir, "recommended.yml")
    if choice["chosen"] is not None:
        chosen = choice["chosen"]
        header = (f"# fapm-merge sweep: {chosen['name']} chosen by the rule: {choice['rule']}.\n"
                  f"# retention {chosen['figures']['retention']:.4f}, forgetting "
                  f"{chosen['figures']['forgetting']:.4f} (see results.md)\n")
        res.write_text_atomic(recommended_path, header + dump_recipe(chosen["recipe"]))
    elif os.path.exists(recommended_path):
        os.unlink(recommended_path)  # a stale recommendation must not outlive its evidence
    data["recommendation"] = {
        "rule": choice["rule"], "min_retention": options.min_retention,
        "chosen": choice["chosen"]["name"] if choice["chosen"] else None,
        "reason": choice["why"] or None,
        "runner_up": choice["runner_up"]["name"] if choice["runner_up"] else None,
        "within_standard_errors": choice["within_noise"],
        "recipe_file": "recommended.yml" if choice["chosen"] else None,
    }
    ordered = [e for e in current if e["variant"]["kind"] != "reference"]
    reference_rows = [references[r] for r in ("pretrained", "finetuned") if r in references]
    verdicts = res.against_rivals(ordered, compare=compare)
    data["against_rivals"] = verdicts
    markdown = res.report_markdown(data, reference_rows + ordered, choice, verdicts)
    res.write_text_atomic(os.path.join(options.out_dir, "results.md"), markdown)
    data["plots"] = [os.path.basename(p) for p in res.plot(options.out_dir, ordered,
                                                           reference_rows)]
    data["complete"] = True
    res.write_json_atomic(results_path, data)
    if choice["chosen"] is not None:
        noise = (" (within the standard errors of the runner-up "
                 f"{choice['runner_up']['name']})" if choice["within_noise"] else "")
        echo(f"recommended: {choice['chosen']['name']}{noise} -> {recommended_path}")
    else:
        echo(f"no recommendation: {choice['why']}")
    echo(f"results: {results_path}, {os.path.join(options.out_dir, 'results.md')}")
    return data


class InMemoryScorer:
    """Load base, fine-tune and one live model once; build each variant in place."""

    def __init__(self, options: SweepOptions, recipe, dtype, manager, specs):
        self.options, self.recipe, self.dtype = options, recipe, dtype
        self.manager, self.specs = manager, specs

    def setup(self, pending: List[Variant]) -> float:
        import torch
        from lm_eval.models.huggingface import HFLM
        from lm_eval.utils import simple_parse_args_string
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from fapm_merge.sweep.engine import InMemorySweep

        began = time.perf_counter()
        arguments = simple_parse_args_string(self.options.model_args or "")
        for unsupported in ("pretrained", "peft", "delta", "tp_plan"):
            if unsupported in arguments:
                raise SweepInputError(f"--model-args {unsupported}=...: not with an in-memory "
                                      "sweep (the model is built from the recipe); use "
                                      "--low-memory")
        wanted = arguments.pop("dtype", None)
        if wanted not in (None, "auto") and getattr(torch, str(wanted), None) != self.dtype:
            raise SweepInputError(
                f"--model-args dtype={wanted}: the merge writes {self.dtype}; the sweep scores "
                "what mergekit writes, so set `dtype:` / `out_dtype:` in the recipe instead")
        hflm_names = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}
        load_kwargs = {k: v for k, v in arguments.items() if k not in hflm_names}
        hflm_kwargs = {k: v for k, v in arguments.items() if k in hflm_names}
        if hflm_kwargs.pop("parallelize", False):
            load_kwargs.setdefault("device_map", "auto")  # what HFLM's parallelize does
        tokenizer_path = self.options.tokenizer or self.recipe.base
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        except (OSError, ValueError) as error:
            raise SweepInputError(f"no tokenizer in {tokenizer_path} ({error}); pass "
                                  "--tokenizer PATH") from None
        model = AutoModelForCausalLM.from_pretrained(self.recipe.base, dtype=self.dtype,
                                                     **load_kwargs)
        if "device_map" not in load_kwargs and self.options.device:
            model.to(self.options.device)
        model.eval()
        self.engine = InMemorySweep(self.recipe, model)
        self.engine.prepare(pending)
        batch = self.options.batch_size
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer,
                       batch_size=int(batch) if str(batch).isdigit() else batch, **hflm_kwargs)
        return time.perf_counter() - began

    def score(self, variant: Variant, config):
        began = time.perf_counter()
        self.engine.build(variant)
        built = time.perf_counter()
        values = ev.evaluate(self.lm, self.specs, self.manager, limit=self.options.limit,
                             num_fewshot=self.options.num_fewshot,
                             bootstrap_iters=self.options.bootstrap_iters)
        return built - began, time.perf_counter() - built, values

    def close(self) -> None:
        for name in ("lm", "engine"):
            if hasattr(self, name):
                delattr(self, name)


class LowMemoryScorer:
    """Write each variant with mergekit to a temporary folder, score it with any lm-eval
    backend, delete it. The references are scored from their own folders."""

    def __init__(self, options: SweepOptions, recipe, dtype, manager, specs):
        self.options, self.recipe, self.dtype = options, recipe, dtype
        self.manager, self.specs = manager, specs
        self.scratch = tempfile.mkdtemp(prefix=".sweep-variant-", dir=options.out_dir)

    def setup(self, pending) -> float:
        return 0.0

    def _model_args(self, path: str) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        tokenizer = os.path.abspath(self.options.tokenizer or self.recipe.base)
        parts = [f"pretrained={path}", f"tokenizer={tokenizer}"]
        given = self.options.model_args or ""
        if "dtype=" not in given:
            parts.append(f"dtype={dtype}")
        return ",".join(parts + ([given] if given else []))

    def score(self, variant: Variant, config):
        from mergekit.options import MergeOptions

        from fapm_merge.merging import merge

        began = time.perf_counter()
        folder = None
        if variant.kind == "reference":
            path = self.recipe.base if variant.reference == "pretrained" else self.recipe.finetuned
        else:
            folder = path = os.path.join(self.scratch, "model")
            shutil.rmtree(folder, ignore_errors=True)
            merge_options = MergeOptions(quiet=True, copy_tokenizer=True, write_model_card=False,
                                         device=self.options.device or "cpu")
            merge(config, folder, options=merge_options, config_source=dump_recipe(config))
        built = time.perf_counter()
        try:
            batch = self.options.batch_size
            values = ev.evaluate(self.options.backend, self.specs, self.manager,
                                 limit=self.options.limit, num_fewshot=self.options.num_fewshot,
                                 bootstrap_iters=self.options.bootstrap_iters,
                                 model_args=self._model_args(os.path.abspath(path)),
                                 batch_size=int(batch) if str(batch).isdigit() else batch,
                                 device=self.options.device)
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        return built - began, time.perf_counter() - built, values

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
