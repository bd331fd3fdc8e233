"""Every recipe in recipes/ validates, and every single-stage recipe merges and loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fapm_merge.recipe import check_recipe_file

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yml"))


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"fapm-basic.yml", "fapm-per-module.yml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_starts_with_a_comment_saying_how_to_run_it(recipe):
    head = recipe.read_text().splitlines()
    comments = []
    for line in head:
        if not line.startswith("#"):
            break
        comments.append(line)
    assert comments, f"{recipe.name} must start with a comment"
    assert any("mergekit-yaml" in c or "mergekit-multi" in c for c in comments)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_against_real_models(recipe, recipe_workdir, monkeypatch):
    monkeypatch.chdir(recipe_workdir)
    documents = check_recipe_file(str(recipe))
    assert documents and all(d.config.merge_method for d in documents)


@pytest.mark.parametrize(
    "recipe", [p for p in RECIPES if ".multi." not in p.name], ids=lambda p: p.name
)
def test_recipe_merges_and_loads(recipe, recipe_workdir, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    from fapm_merge.merging import merge

    monkeypatch.chdir(recipe_workdir)
    out = tmp_path / "merged"
    merge(str(recipe), str(out))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits.float()).all()
    assert os.path.isfile(out / "config.json")
