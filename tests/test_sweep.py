"""``fapm-merge sweep`` on tiny generated models and tiny local lm-eval tasks (no network).

The models are small enough for CI but have tensors above the kernel's direct-selection size
(65,536 elements), so FAPM's fused path is what mergekit runs for them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import fine_tune_of, load_state, run_tool, save_model
from fapm_merge.demo import word_tokenizer

WORDS = "the cat dog sat ran on mat red blue green one two three four yes no".split()


def write_task(folder: Path, name: str, count: int = 24, metrics=("acc", "acc_norm")) -> None:
    """A multiple-choice lm-eval task read from a local JSON-lines file."""
    rng = random.Random(name)
    rows = [{"query": " ".join(rng.choices(WORDS, k=4)), "choices": [" cat", " dog", " mat"],
             "gold": i % 3} for i in range(count)]
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    metric_list = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                          for m in metrics)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{query}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{gold}}\"\n"
        f"metric_list:\n{metric_list}")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    tokenizer = word_tokenizer(WORDS)
    base = save_model(root / "base", vocab_size=len(tokenizer), intermediate_size=2112,
                      num_hidden_layers=2, max_position_embeddings=64)
    tokenizer.save_pretrained(base)
    finetuned = fine_tune_of(base, root / "ft", seed=1, scale=0.05)
    tokenizer.save_pretrained(finetuned)
    other = fine_tune_of(base, root / "ft2", seed=2)
    tasks = root / "tasks"
    tasks.mkdir()
    write_task(tasks, "sw_task")
    write_task(tasks, "sw_general")
    write_task(tasks, "sw_general2", count=12)
    return root


def write_recipe(root: Path, name: str = "recipe.yml", dtype: str = "float32", **extra) -> Path:
    recipe = {
        "merge_method": "fapm",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / "ft"), "parameters": {
            # a per-module override: the swept value must replace only the catch-all
            "sparsity": [{"filter": "mlp", "value": 0.5}, {"value": 0.9}]}}],
        "dtype": dtype,
    }
    recipe.update(extra)
    path = root / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


TASKS = ("--task-tasks", "sw_task", "--general-tasks", "sw_general,sw_general2")


def sweep(root: Path, *args, recipe=None, out="out", check=True, tasks=TASKS):
    from fapm_merge.cli import main

    arguments = ["sweep", str(recipe or write_recipe(root)), str(root / out), *tasks,
                 "--include-path", str(root / "tasks"), "--quiet", *map(str, args)]
    result = CliRunner().invoke(main, arguments, catch_exceptions=False)
    if check:
        assert result.exit_code == 0, result.output
    return result


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[tensor.dtype])


# ----------------------------------------------------------------------------- bit identity


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_variant_is_bit_identical_to_mergekit(work, tmp_path, dtype):
    """Each swept point (and the DARE / WiSE / LiNeS baselines) built in memory equals, bit for bit,
    what mergekit writes for the same recipe, including the live model's other tensors."""
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM

    from fapm_merge.merging import merge
    from fapm_merge.sweep.engine import InMemorySweep, output_dtype, plan
    from fapm_merge.sweep.variants import (build_variants, dump_recipe, load_sweep_recipe,
                                           variant_recipe)

    recipe = load_sweep_recipe(str(write_recipe(work, f"recipe-{dtype}.yml", dtype=dtype)))
    dtype_ = output_dtype(recipe)
    assert dtype_ == getattr(torch, dtype)
    live = AutoModelForCausalLM.from_pretrained(recipe.base, dtype=dtype_)
    engine = InMemorySweep(recipe, live)
    # 0 and 1 are the kernel's special cases; 0.9 / 0.99 take FAPM's fused path on the
    # tensors above 65,536 elements, 0.5 its general path
    variants = build_variants(recipe, [0.0, 0.5, 0.9, 0.99, 1.0], ["fapm", "magnitude"],
                              wise=[0.25], dare_seeds=[0], lines=[0.25], spectral=True,
                              lowrank=[2])
    variants = [v for v in variants if v.kind != "dare" or v.sparsity == 0.9]
    assert [v.name for v in variants if v.kind == "lines"] == ["lines-0.25"]
    if dtype == "bfloat16":  # magnitude's path is the general one, covered in float32
        variants = [v for v in variants if v.score != "magnitude"]
    engine.prepare(variants)
    assert engine.level_bytes > 0  # the fast path is in use
    checked = 0
    for variant in variants:
        engine.build(variant)
        config = variant_recipe(recipe, variant)
        if config is None:
            continue
        if variant.kind == "sweep":  # the override stayed, the default took the swept value
            resolved = {p.name: p.task.input_parameters[engine.ft_ref]["sparsity"]
                        for p in plan(config)}
            assert all(v == 0.5 for k, v in resolved.items() if "mlp" in k)
            assert all(v == variant.sparsity for k, v in resolved.items() if "mlp" not in k)
        written = tmp_path / variant.name
        merge(config, written, options=MergeOptions(quiet=True, write_model_card=False),
              config_source=dump_recipe(config))
        expected = load_state(written)
        ours = engine.state_dict()
        assert set(ours) == set(expected)
        for name, tensor in expected.items():
            assert tensor.dtype == ours[name].dtype, name
            assert torch.equal(_bits(tensor), _bits(ours[name])), f"{variant.name}: {name}"
        reloaded = AutoModelForCausalLM.from_pretrained(written, dtype=dtype_).state_dict()
        for name, tensor in live.state_dict().items():
            assert torch.equal(tensor, reloaded[name]), f"{variant.name}: {name}"
        checked += 1
    assert checked == len([v for v in variants if v.kind != "reference"])


def test_recommended_recipe_matches_the_mergekit_yaml_command(work, tmp_path):
    """The in-memory variant equals what the real `mergekit-yaml` command writes."""
    from transformers import AutoModelForCausalLM

    from fapm_merge.sweep.engine import InMemorySweep
    from fapm_merge.sweep.variants import (Variant, dump_recipe, load_sweep_recipe,
                                           variant_recipe)

    recipe = load_sweep_recipe(str(write_recipe(work, "recipe-cli.yml", dtype="bfloat16")))
    variant = Variant("sweep", score="fapm", sparsity=0.95)
    engine = InMemorySweep(recipe, AutoModelForCausalLM.from_pretrained(
        recipe.base, dtype=torch.bfloat16))
    engine.prepare([variant])
    engine.build(variant)
    path = tmp_path / "variant.yml"
    path.write_text(dump_recipe(variant_recipe(recipe, variant)))
    run_tool("mergekit-yaml", path, tmp_path / "out", "--no-write-model-card")
    expected, ours = load_state(tmp_path / "out"), engine.state_dict()
    assert set(expected) == set(ours)
    assert all(torch.equal(_bits(expected[n]), _bits(ours[n])) for n in expected)


# ----------------------------------------------------------------------------- the command


def test_sweep_writes_results_and_resumes_only_new_points(work):
    first = sweep(work, "--sparsity", "0.9,0.5", "--score", "fapm,magnitude")
    out = work / "out"
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == "fapm-merge/sweep-results/1" and data["complete"]
    names = sorted(e["name"] for e in data["variants"].values())
    assert names == sorted(["pretrained", "finetuned", "fapm-0.9", "fapm-0.5",
                            "magnitude-0.9", "magnitude-0.5"])
    for entry in data["variants"].values():
        for task in ("sw_task", "sw_general", "sw_general2"):
            row = entry["scores"][task]
            assert row["metric"] == "acc_norm,none" and row["stderr"] is not None
            assert row["n"] == (12 if task == "sw_general2" else 24)
            # per-item scores (doc_id order), whose mean is lm-eval's value: what pairs
            assert len(row["items"]) == row["n"] and set(row["items"]) <= {0, 1}
            assert sum(row["items"]) / row["n"] == pytest.approx(row["value"], abs=1e-12)
        figures = entry["figures"]
        assert {"task", "retention", "forgetting", "forgetting_stderr"} <= set(figures)
    pre = next(e for e in data["variants"].values() if e["name"] == "pretrained")
    ft = next(e for e in data["variants"].values() if e["name"] == "finetuned")
    assert pre["figures"]["forgetting"] == 0 and ft["figures"]["retention"] == 1
    assert pre["figures"]["forgetting_stderr"] == 0 and ft["figures"]["retention_stderr"] == 0
    assert data["command"][:4] == ["fapm-merge", "sweep", str(work / "recipe.yml"), str(out)]
    assert "--sparsity" in data["command"] and "0.9,0.5" in data["command"]
    assert data["versions"]["mergekit"] == "0.1.5"
    for plot in ("tradeoff-fapm.png", "tradeoff-magnitude.png", "pareto.png"):
        assert (out / plot).stat().st_size > 0
    report = (out / "results.md").read_text()
    assert "fapm-0.5" in report and "Rule:" in report
    # every magnitude point is a rival of FAPM's, with a verdict in results.json and .md
    assert sorted(v["rival"] for v in data["against_rivals"]) == ["magnitude-0.5",
                                                                  "magnitude-0.9"]
    assert all(v["paired"] for v in data["against_rivals"])
    assert "## FAPM against each rival" in report
    recommendation = data["recommendation"]
    if recommendation["chosen"]:
        chosen = next(e for e in data["variants"].values()
                      if e["name"] == recommendation["chosen"])
        assert chosen["figures"]["retention"] >= 0.95
        written = yaml.safe_load((out / "recommended.yml").read_text())
        assert written == chosen["recipe"]
    else:
        assert not (out / "recommended.yml").exists() and "nothing is recommended" in report

    again = sweep(work, "--sparsity", "0.9,0.5,0.99", "--score", "fapm,magnitude")
    assert "2 of 8 variant(s) to score" in again.output
    data2 = json.loads((out / "results.json").read_text())
    for key, entry in data["variants"].items():  # earlier scores kept as they were
        assert data2["variants"][key]["scores"] == entry["scores"]
    assert "1 of" not in first.output


def test_extra_tasks_are_scored_but_not_in_the_figures(work):
    sweep(work, "--sparsity", "0.9", "--lines", "0.5", "--spectral", "--lowrank", "2", out="extra",
          tasks=["--task-tasks", "sw_task", "--general-tasks", "sw_general",
                 "--extra-tasks", "sw_general2:acc"])
    data = json.loads((work / "extra" / "results.json").read_text())
    assert data["tasks"]["extra"] == [{"task": "sw_general2", "metric": "acc,none"}]
    assert [data["variants"][k]["name"] for k in data["current"]] == [
        "pretrained", "finetuned", "fapm-0.9", "lines-0.5", "spectral", "lowrank-2"]
    for entry in data["variants"].values():
        assert entry["scores"]["sw_general2"]["n"] == 12
        # the general average is sw_general's alone
        assert entry["figures"]["general"] == entry["scores"]["sw_general"]["value"]
    lines = next(e for e in data["variants"].values() if e["name"] == "lines-0.5")
    assert lines["recipe"]["merge_method"] == "task_arithmetic"
    assert lines["recipe"]["models"][0]["parameters"]["weight"] == [0.5, 1.0]
    lowrank = next(e for e in data["variants"].values() if e["name"] == "lowrank-2")
    assert lowrank["recipe"]["merge_method"] == "lowrank"
    assert lowrank["recipe"]["parameters"] == {"rank": 2}
    report = (work / "extra" / "results.md").read_text()
    assert "| sw_general2 |" in report and "Also scored" in report


def test_low_memory_mode_gives_the_same_scores(work):
    """Writing each variant through mergekit and loading it fresh in lm-eval (what a user
    does today by hand) scores exactly what the in-memory sweep scores."""
    args = ["--sparsity", "0.9", "--score", "fapm", "--wise", "0.5", "--dare-seeds", "1"]
    sweep(work, *args, out="mem")
    sweep(work, *args, "--low-memory", out="disk")
    mem = json.loads((work / "mem" / "results.json").read_text())
    disk = json.loads((work / "disk" / "results.json").read_text())
    assert mem["mode"] == "in-memory" and disk["mode"] == "low-memory"
    assert set(mem["variants"]) == set(disk["variants"])  # same resume keys
    for key, entry in mem["variants"].items():
        assert disk["variants"][key]["scores"] == entry["scores"], entry["name"]
    assert not [p for p in (work / "disk").iterdir() if p.name.startswith(".sweep-variant")]


def test_interrupt_loses_at_most_the_variant_in_flight(work, monkeypatch):
    from fapm_merge.sweep import evaluate as ev

    real, calls = ev.evaluate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate", interrupted)
    stopped = sweep(work, "--sparsity", "0.9,0.5", out="interrupted", check=False)
    assert stopped.exit_code != 0 and "Aborted" in stopped.output  # click's Ctrl-C exit
    data = json.loads((work / "interrupted" / "results.json").read_text())
    assert not data["complete"] and len(data["variants"]) == 2
    monkeypatch.setattr(ev, "evaluate", real)
    resumed = sweep(work, "--sparsity", "0.9,0.5", out="interrupted")
    assert "2 of 4 variant(s) to score" in resumed.output
    assert json.loads((work / "interrupted" / "results.json").read_text())["complete"]


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if the sweep gets as far as reading a model's tensors."""
    from fapm_merge.sweep import engine

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(engine, "output_dtype", refuse)


@pytest.mark.parametrize("args, expected", [
    (["--sparsity", "0.5,1.5"], "--sparsity: 1.5 is outside [0, 1]"),
    (["--sparsity", "0.9", "--score", "magnitud"], "unknown score 'magnitud'"),
])
def test_bad_options_are_named(work, no_model_loads, args, expected):
    result = sweep(work, *args, check=False)
    assert result.exit_code != 0 and expected in result.output


def test_unknown_task_says_did_you_mean(work, no_model_loads):
    result = sweep(work, "--sparsity", "0.9", out="bad", check=False,
                   tasks=["--task-tasks", "sw_tsak", "--general-tasks", "sw_general"])
    assert result.exit_code != 0
    assert "unknown lm-eval task 'sw_tsak'" in result.output and "sw_task" in result.output
    assert "Traceback" not in result.output


def test_metric_the_task_does_not_report(work, no_model_loads):
    result = sweep(work, "--sparsity", "0.9", out="bad", check=False,
                   tasks=["--task-tasks", "sw_task:exact_match", "--general-tasks", "sw_general"])
    assert result.exit_code != 0
    assert "task 'sw_task' has no metric 'exact_match'" in result.output
    assert "acc,none" in result.output


def test_task_that_returns_no_value_is_named():
    from fapm_merge.sweep.evaluate import TaskSpec, score_results
    from fapm_merge.sweep.variants import SweepInputError

    with pytest.raises(SweepInputError, match="task 'x' returned no value for metric"):
        score_results({"results": {"x": {"alias": "x"}}}, [TaskSpec("x", "acc,none")])


@pytest.mark.parametrize("change, expected", [
    ({"merge_method": "ties"}, "merge_method is 'ties'; the sweep supports `merge_method: fapm`"),
    ("two", "merges 2 fine-tunes into the base; the sweep supports exactly one"),
])
def test_unsupported_recipes_say_what_is_supported(work, no_model_loads, change, expected):
    recipe = yaml.safe_load(write_recipe(work).read_text())
    if change == "two":
        recipe["models"].append({"model": str(work / "ft2")})
    else:
        recipe.update(change)
        recipe["models"][0]["parameters"] = {"density": 0.1}
    path = work / "unsupported.yml"
    path.write_text(yaml.safe_dump(recipe))
    result = sweep(work, "--sparsity", "0.9", recipe=path, out="bad", check=False)
    assert result.exit_code != 0 and expected in result.output, result.output


def test_out_with_another_recipe_is_refused_unless_forced(work, no_model_loads, monkeypatch):
    out = work / "taken"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"recipe": {"digest": "0" * 64, "path": "other.yml"}, "models": {}, "variants": {}}))
    result = sweep(work, "--sparsity", "0.9", out="taken", check=False)
    assert result.exit_code != 0
    assert "holds results of a different recipe" in result.output and "--force" in result.output
    # with --force the sweep goes on (to the first model load, refused by the fixture)
    with pytest.raises(AssertionError, match="a model was loaded"):
        sweep(work, "--sparsity", "0.9", "--force", out="taken")


# ----------------------------------------------------------------------------- the rule


def _row(name, sparsity, retention, forgetting, se=0.01):
    return {"name": name, "variant": {"kind": "sweep", "score": "fapm", "sparsity": sparsity},
            "figures": {"retention": retention, "forgetting": forgetting,
                        "forgetting_stderr": se, "retention_stderr": se}}


def test_rule_least_forgetting_among_retaining_ties_to_lower_sparsity():
    from fapm_merge.sweep.results import recommend

    rows = [_row("a", 0.99, 0.80, 0.00), _row("b", 0.9, 0.96, 0.05),
            _row("c", 0.5, 0.99, 0.05), _row("d", 0.8, 0.97, 0.10)]
    choice = recommend(rows, 0.95)
    assert choice["chosen"]["name"] == "c"  # b and c tie on forgetting: the lower sparsity
    assert choice["runner_up"]["name"] == "b" and choice["within_noise"] is True
    assert recommend(rows, 0.999)["chosen"] is None
    assert "no sweep point keeps" in recommend(rows, 0.999)["why"]


def _rival(name, kind, retention, forgetting, se=0.01):
    row = _row(name, None, retention, forgetting, se)
    row["variant"] = {"kind": kind}
    return row


def test_each_rival_is_matched_with_the_best_fapm_point_that_keeps_its_retention():
    from fapm_merge.sweep.results import against_rivals

    fapm = [_row("fapm-0.9", 0.9, 0.60, 0.00), _row("fapm-0.5", 0.5, 0.90, 0.10),
            _row("fapm-0.2", 0.2, 0.95, 0.20)]
    rivals = [
        _rival("wise-0.5", "wise", 0.85, 0.30),      # fapm-0.5 keeps more, forgets less
        _rival("spectral", "spectral", 0.99, 0.05),  # no FAPM point keeps 0.99
        _rival("lowrank-8", "lowrank", 0.60, 0.01),  # fapm-0.9: the same within noise
        _rival("wise-0.75", "wise", 0.80, 0.02),     # fapm-0.5: keeps more, forgets more
    ]
    refs = [_rival("pretrained", "reference", 0.0, 0.0)]
    verdicts = {v["rival"]: v for v in against_rivals(refs + fapm + rivals)}
    assert set(verdicts) == {"wise-0.5", "spectral", "lowrank-8", "wise-0.75"}  # no references
    assert verdicts["wise-0.5"]["fapm"] == "fapm-0.5"
    assert verdicts["wise-0.5"]["verdict"] == "FAPM better"
    assert verdicts["wise-0.5"]["forgetting_diff"] == pytest.approx(-0.20)
    assert verdicts["wise-0.5"]["forgetting_diff_stderr"] == pytest.approx(2 ** 0.5 * 0.01)
    assert verdicts["spectral"]["fapm"] == "fapm-0.2"  # the highest retention FAPM has
    assert verdicts["spectral"]["verdict"] == "rival better"
    assert verdicts["lowrank-8"]["fapm"] == "fapm-0.9"
    assert verdicts["lowrank-8"]["verdict"] == "no difference"
    assert verdicts["wise-0.75"]["verdict"] == "trade-off"


def test_rival_verdicts_need_standard_errors_and_fapm_points():
    from fapm_merge.sweep.results import against_rivals

    fapm, wise = _row("fapm-0.9", 0.9, 0.9, 0.0), _rival("wise-0.5", "wise", 0.5, 0.5)
    wise["figures"]["forgetting_stderr"] = None
    assert against_rivals([fapm, wise])[0]["verdict"] == "no standard errors"
    magnitude = _row("magnitude-0.9", 0.9, 0.5, 0.5)
    magnitude["variant"]["score"] = "magnitude"
    assert against_rivals([magnitude, _rival("wise-0.5", "wise", 0.5, 0.5)]) == []
    # a sweep of another score is itself a rival of FAPM's points
    assert [v["rival"] for v in against_rivals([fapm, magnitude])] == ["magnitude-0.9"]


def test_swept_value_lands_where_the_recipe_sets_it_and_nothing_else_changes():
    from fapm_merge.sweep.variants import set_default

    plain = {"merge_method": "fapm", "base_model": "b", "models": [{"model": "f"}],
             "dtype": "float32"}
    assert set_default(plain, "f", "sparsity", 0.8) == dict(plain, parameters={"sparsity": 0.8})
    assert plain == {"merge_method": "fapm", "base_model": "b", "models": [{"model": "f"}],
                     "dtype": "float32"}  # the user's recipe is not touched
    filtered = dict(plain, models=[{"model": "f", "parameters": {
        "sparsity": [{"filter": "mlp", "value": 0.5}, {"value": 0.9}]}}])
    swept = set_default(filtered, "f", "sparsity", 0.8)
    assert swept["models"][0]["parameters"]["sparsity"] == [{"filter": "mlp", "value": 0.5},
                                                           {"value": 0.8}]
    assert "parameters" not in swept
    assert set_default(filtered, "f", "score", "magnitude")["parameters"] == {"score": "magnitude"}


def test_edited_task_items_are_rescored_not_reused(work, tmp_path):
    """The resume key holds a digest of each task's config and data files: the same task
    names with other items must not reuse the old scores."""
    import shutil

    from fapm_merge.cli import main

    tasks = tmp_path / "tasks"
    shutil.copytree(work / "tasks", tasks)
    for task_yaml in tasks.glob("*.yaml"):  # read the copies, not the module's files
        task_yaml.write_text(task_yaml.read_text().replace(str(work / "tasks"), str(tasks)))

    def run():
        result = CliRunner().invoke(main, [
            "sweep", str(write_recipe(work)), str(tmp_path / "out"), *TASKS, "--include-path",
            str(tasks), "--quiet", "--sparsity", "0.9"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    assert "3 of 3 variant(s) to score" in run()
    assert "all 3 variant(s) already scored" in run()
    data = tasks / "sw_general2.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-2]))
    assert "3 of 3 variant(s) to score" in run()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    current = [results["variants"][key] for key in results["current"]]
    assert {entry["scores"]["sw_general2"]["n"] for entry in current} == {10}


# ----------------------------------------------------------------------------- paired errors


def _items_row(name, kind, task_items, general_items, score=None):
    """A scored variant with per-item values: one task task, one general task."""
    scores = {"t": {"value": sum(task_items) / len(task_items), "items": task_items,
                    "stderr": _se(task_items)},
              "g": {"value": sum(general_items) / len(general_items), "items": general_items,
                    "stderr": _se(general_items)}}
    variant = {"kind": kind, "score": score, "sparsity": 0.9 if score else None}
    if kind == "reference":
        variant["reference"] = name
    return {"name": name, "method": kind, "variant": variant, "scores": scores}


def _se(items):
    """lm-eval's standard error of a mean: sample standard deviation / sqrt(n)."""
    import numpy as np

    return float(np.std(items, ddof=1) / np.sqrt(len(items)))


def test_paired_difference_matches_a_direct_computation():
    import numpy as np

    from fapm_merge.sweep.results import paired_difference

    rng = np.random.default_rng(0)
    a = {f"t{i}": {"items": rng.integers(0, 2, n).tolist()} for i, n in enumerate((30, 50))}
    b = {name: {"items": [int(x) if rng.random() < 0.8 else 1 - int(x) for x in row["items"]]}
         for name, row in a.items()}
    diff, se = paired_difference(a, b, ["t0", "t1"])
    per_task = [np.subtract(a[t]["items"], b[t]["items"]) for t in ("t0", "t1")]
    assert diff == pytest.approx(np.mean([d.mean() for d in per_task]))
    assert se == pytest.approx(np.sqrt(sum(d.var(ddof=1) / d.size for d in per_task)) / 2)
    assert paired_difference(a, a, ["t0", "t1"]) == (0.0, 0.0)  # a variant against itself
    # not the same items: no pairing
    shorter = dict(b, t1={"items": b["t1"]["items"][:-1]})
    assert paired_difference(a, shorter, ["t0", "t1"]) is None
    assert paired_difference(a, {"t0": {"value": 0.5}, "t1": b["t1"]}, ["t0", "t1"]) is None


def test_paired_errors_separate_variants_that_agree_on_most_items():
    """Two variants that differ on a few items only: combined as independent, their errors
    hide a consistent difference; paired over the same items, it is clear."""
    from fapm_merge.sweep.results import Comparison, against_rivals, figures

    n = 200
    pre_general = [1] * 120 + [0] * 80
    ft = _items_row("finetuned", "reference", [1] * 160 + [0] * 40, [1] * 60 + [0] * 140)
    pre = _items_row("pretrained", "reference", [0] * n, pre_general)
    fapm_general = list(pre_general)
    rival_general = list(pre_general)
    for i in range(0, 120, 12):  # the rival forgets 10 items that FAPM keeps
        rival_general[i] = 0
    fapm = _items_row("fapm-0.9", "sweep", [1] * 160 + [0] * 40, fapm_general, score="fapm")
    rival = _items_row("wise-0.25", "wise", [1] * 160 + [0] * 40, rival_general)
    references = {"pretrained": pre, "finetuned": ft}
    rows = [pre, ft, fapm, rival]
    for row in rows:
        row["figures"] = figures(row, references, ["t"], ["g"])
    independent = {v["rival"]: v for v in against_rivals(rows[2:])}["wise-0.25"]
    assert not independent["paired"] and independent["verdict"] == "no difference"
    paired = {v["rival"]: v for v in against_rivals(
        rows[2:], compare=Comparison(references, ["t"], ["g"]))}["wise-0.25"]
    assert paired["paired"] and paired["verdict"] == "FAPM better"
    assert paired["forgetting_diff"] == pytest.approx(independent["forgetting_diff"])
    assert paired["forgetting_diff"] == pytest.approx(-10 / 120)
    # the error of (G_a - G_b) / G_pre: the 0/1 differences' own error, then the ratio
    d = [x - y for x, y in zip(fapm_general, rival_general)]
    import numpy as np

    numerator_se = np.std(d, ddof=1) / np.sqrt(n)
    g_pre, g_pre_se = np.mean(pre_general), _se(pre_general)
    expected = np.hypot(numerator_se / g_pre, (10 / n) * g_pre_se / g_pre ** 2)
    assert paired["forgetting_diff_stderr"] == pytest.approx(expected)
    assert paired["forgetting_diff_stderr"] < independent["forgetting_diff_stderr"] / 3
    assert paired["retention_diff"] == 0 and paired["retention_diff_stderr"] == 0


def test_rival_table_marks_unpaired_rows():
    from fapm_merge.sweep.results import Comparison, against_rivals, figures, rivals_markdown

    ft = _items_row("finetuned", "reference", [1] * 8 + [0] * 2, [1, 0] * 5)
    pre = _items_row("pretrained", "reference", [0] * 10, [1] * 7 + [0] * 3)
    fapm = _items_row("fapm-0.9", "sweep", [1] * 8 + [0] * 2, [1] * 7 + [0] * 3, score="fapm")
    old = _items_row("wise-0.5", "wise", [1] * 7 + [0] * 3, [1] * 6 + [0] * 4)
    for row in old["scores"].values():  # scored before per-item values were logged
        del row["items"]
    references = {"pretrained": pre, "finetuned": ft}
    for row in (pre, ft, fapm, old):
        row["figures"] = figures(row, references, ["t"], ["g"])
    verdicts = against_rivals([fapm, old], compare=Comparison(references, ["t"], ["g"]))
    assert verdicts[0]["paired"] is False
    table = "\n".join(rivals_markdown([fapm, old], verdicts))
    assert "rows marked * lack per-item scores" in table and "| wise-0.5 |" in table
    assert table.count(" * |") == 1


def test_item_values_read_the_metric_and_filter_in_doc_order():
    from fapm_merge.sweep.evaluate import item_values

    samples = [{"doc_id": 2, "filter": "strict", "exact_match": 1.0},
               {"doc_id": 0, "filter": "strict", "exact_match": 0.0},
               {"doc_id": 1, "filter": "strict", "exact_match": 1.0},
               {"doc_id": 0, "filter": "loose", "exact_match": 1.0},
               {"doc_id": 1, "filter": "loose", "exact_match": 1.0},
               {"doc_id": 2, "filter": "loose", "exact_match": 1.0}]
    assert item_values(samples, "exact_match,strict", 2 / 3) == [0, 1, 1]
    assert item_values(samples, "exact_match,loose", 1.0) == [1, 1, 1]
    # a corpus-level metric (perplexity: per-item tuples) or a value that is not the mean
    perplexity = [{"doc_id": 0, "filter": "none", "word_perplexity": (-3.5, 4)}]
    assert item_values(perplexity, "word_perplexity,none", 2.4) is None
    assert item_values(samples, "exact_match,strict", 0.5) is None
    assert item_values(samples, "acc,strict", 0.5) is None
