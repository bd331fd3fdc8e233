"""`fapm-merge demo`, end to end: the story it prints must be the one its numbers tell."""

from __future__ import annotations

import pytest
import torch
import yaml


def test_demo_merges_and_its_sweep_finds_where_the_task_stays_and_forgetting_goes(tmp_path):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM

    from fapm_merge.demo import SPARSITIES, run_demo
    from fapm_merge.recipe import check_recipe_file

    result = run_demo(str(tmp_path / "demo"))
    merged = AutoModelForCausalLM.from_pretrained(result["merged"], dtype=torch.float32)
    assert merged.config.vocab_size == 64
    kept = sum(row["kept"] for row in result["modules"])
    elements = sum(row["elements"] for row in result["modules"])
    assert 0.09 < kept / elements <= 0.1  # sparsity 0.9: at most 10% of dW kept per tensor

    data = result["sweep"]
    rows = {data["variants"][k]["name"]: data["variants"][k]["figures"] for k in data["current"]}
    assert set(rows) == ({"pretrained", "finetuned", "wise-0.5"}
                         | {f"{score}-{s:g}" for score in ("fapm", "magnitude") for s in SPARSITIES})
    # the premise: the fine-tune learned the task and forgot the general skill
    assert rows["pretrained"]["task"] < 0.5 < rows["finetuned"]["task"]
    assert rows["finetuned"]["forgetting"] > 0.5
    # the claim the demo prints: some FAPM point keeps most of the task with little forgetting,
    # and there FAPM keeps as much of the task as magnitude pruning: not less by more than
    # the noise of the difference (paired over the same 100 task items; a point or two either
    # way is chance, and which way it falls moves with the CPU that trained the demo models)
    from fapm_merge.sweep.results import Z, Comparison

    good = [s for s in SPARSITIES
            if rows[f"fapm-{s:g}"]["retention"] >= 0.9 and rows[f"fapm-{s:g}"]["forgetting"] <= 0.05]
    assert good
    entries = {data["variants"][k]["name"]: data["variants"][k] for k in data["current"]}
    compare = Comparison({name: entries[name] for name in ("pretrained", "finetuned")},
                         ["demo_task"], [t["task"] for t in data["tasks"]["general"]])
    for s in good:
        difference, se, paired = compare(entries[f"fapm-{s:g}"], entries[f"magnitude-{s:g}"],
                                         "retention")
        assert paired and difference >= -Z * se, (s, difference, se)
    choice = data["recommendation"]
    assert choice["chosen"] is not None
    recommended = tmp_path / "demo" / "sweep" / "recommended.yml"
    (checked,) = check_recipe_file(str(recommended))
    assert checked.config.merge_method == "fapm"
    entry = next(data["variants"][k] for k in data["current"]
                 if data["variants"][k]["name"] == choice["chosen"])
    written = yaml.safe_load(recommended.read_text())
    assert written == entry["recipe"]
    assert written["models"][0]["parameters"]["sparsity"] == entry["variant"]["sparsity"]
