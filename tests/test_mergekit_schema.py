"""The schema snapshot behind `validate --no-model-check`: current with the installed mergekit,
and its light checks pass and refuse the same recipes as mergekit's own models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_imports import _imported_after

from fapm_merge import mergekit_schema
from fapm_merge.recipe import RecipeError, check_recipe_file

ROOT = Path(__file__).resolve().parents[1]

BASE = "merge_method: {method}\nbase_model: ./b\nmodels:\n  - model: ./a\n{extra}"
PARAMS = "    parameters:\n      {key}: {value}\n"

# (method, parameter, value): good and bad values of each kind of parameter type
PARAMETER_CASES = [
    ("fapm", "sparsity", value) for value in
    ("0.5", "0", "1", "1.5", "-0.1", "abc", "yes", "'0.5'", "null", "[0.9, 0.5]",
     "[0.9, 1.5]", "{value: 0.5, filter: mlp}", "[{filter: mlp, value: 0.5}, {value: 2}]",
     ".inf", ".nan")
] + [
    ("fapm", "score", value) for value in ("fapm", "relative", "fapn", "1", "FAPM")
] + [
    ("fapm", "seed", value) for value in ("3", "1.5", "3.0", "'7'", "-2", "x")
] + [
    ("fapm", "normalize", value) for value in ("yes", "true", "0", "1", "2", "maybe", "'on'")
] + [
    ("fapm", "manifest", value) for value in ("yes", "manifest.jsonl", "3")
] + [
    ("fapm_ties", "consensus", value) for value in ("sum", "count", "vote")
] + [
    ("ties", "density", value) for value in ("0.5", "no", "abc")
] + [
    ("ties", "weight", value) for value in ("1.0", "'2'", "[1, 0.5]")
] + [
    ("fapm", "sparsty", "0.5"), ("ties", "sparsity", "0.5"),
]

# whole-recipe shapes: structure, references, model rules, unknown keys at several depths
DOCUMENTS = [
    BASE.format(method="fapm", extra=""),
    BASE.format(method="fapm", extra="dtype: bfloat16\nout_dtype: float16\n"),
    BASE.format(method="fapm", extra="dtype: flaot16\n"),
    BASE.format(method="fapm", extra="dtpye: float16\n"),
    BASE.format(method="fapm", extra="slices:\n  - sources:\n      - model: ./a\n"
                                     "        layer_range: [0, 2]\n"),
    BASE.format(method="fapm", extra="tokenizer_source: base\ntokenizer: {source: base}\n"),
    BASE.format(method="fapm", extra="tokenizer: {source: union, pad_to_multiple_of: 8}\n"),
    BASE.format(method="fapm", extra="tokenizer: {source: union, pad_to_multiple_of: 8.5}\n"),
    BASE.format(method="fapm", extra="tokenizer: {source: ./c}\n"),
    BASE.format(method="fapm", extra="tokenizer: {souce: base}\n"),
    BASE.format(method="fapm", extra="tokenizer:\n  source: base\n  tokens:\n"
                                     "    <pad>: {source: {kind: zero}}\n"),
    BASE.format(method="fapm", extra="tokenizer:\n  source: base\n  tokens:\n"
                                     "    <x>: {source: {kind: model_token, model: ./a}}\n"),
    BASE.format(method="fapm", extra="tokenizer:\n  source: base\n  tokens:\n"
                                     "    <x>: {source: {kind: model_token, model: ./a, "
                                     "token_id: 3, token: x}}\n"),
    BASE.format(method="fapm", extra="tokenizer_source: {model: {path: ./c, revision: main}}\n"),
    BASE.format(method="fapm", extra="chat_template: chatml\n"),
    BASE.format(method="fapm", extra="chat_template: 3\n"),
    "merge_method: fapm\nbase_model: ./b\n",
    "merge_method: fapm\nbase_model: ./b\nmodels: []\n",
    "merge_method: fapm\nbase_model: ./b+./lora\nmodels:\n  - model: org/ft@v1+org/lora@v2\n",
    "merge_method: fapm\nbase_model: ./b\nmodels:\n  - model: a+b+c\n",
    "merge_method: fapm\nbase_model: ./b\nmodels:\n  - model: a@b@c\n",
    "merge_method: fapm\nbase_model: {model: {path: ./b}, lora: {path: ./l}}\n"
    "models:\n  - model: ./a\n",
    "merge_method: fapm\nbase_model: {model: {pth: ./b}}\nmodels:\n  - model: ./a\n",
    "merge_method: fapm\nbase_model: 3\nmodels:\n  - model: ./a\n",
    "merge_method: fapm\nbase_model: ./b\nmodels:\n  - {model: ./a, paramters: {sparsity: 0.5}}\n",
    "merge_method: fapm\nbase_model: ./b\nmodels:\n  - parameters: {sparsity: 0.5}\n",
    "merge_method: 3\nbase_model: ./b\nmodels:\n  - model: ./a\n",
    "base_model: ./b\nmodels:\n  - model: ./a\n",
    "merge_method: ties\nbase_model: ./b\nslices:\n  - sources:\n      - model: ./a\n"
    "        layer_range: [0, 3]\n        parameters: {density: 0.5, weight: 1}\n",
    "merge_method: ties\nbase_model: ./b\nslices:\n  - sources:\n      - model: ./a\n"
    "        layer_range: [0, 3, 4]\n",
    "merge_method: ties\nbase_model: ./b\nslices:\n  - sources:\n      - model: ./a\n"
    "        layer_range: [0, 2.5]\n",
    "merge_method: ties\nbase_model: ./b\nslices:\n  - sources:\n      - model: ./a\n",
    "merge_method: ties\nbase_model: ./b\nslices:\n  - sources:\n      - model: ./a\n"
    "        layer_range: [0, 3]\n    residual_weight: 0.5\n",
    "merge_method: ties\nbase_model: ./b\nslices:\n  - sources:\n      - model: ./a\n"
    "        layer_range: [0, 3]\n    residual_weigth: 0.5\n",
    "merge_method: fapm\nbase_model: ./b\nmodules:\n  text:\n    models:\n      - model: ./a\n",
    "merge_method: fapm\nbase_model: ./b\nmodules:\n  text: {}\n",
    "merge_method: fapm\nbase_model: ./b\nmodules:\n  text:\n    modles:\n      - model: ./a\n",
    "merge_method: fapm\nbase_model: ./b\nmodels:\n  - model: ./a\n"
    "parameters:\n  sparsity:\n    - {fitler: mlp, value: 0.5}\n    - {value: 0.9}\n",
    "merge_method: fapm\nbase_model: ./b\nmodels:\n  - model: ./a\n"
    "parameters:\n  sparsity: {filter: mlp}\n",
    "- just\n- a list\n",
    "merge_method: fapm\nbase_model: ./b\nmodels:\n  - model: ./a\n---\n"
    "name: second\nmerge_method: fapm\nbase_model: ./b\nmodels:\n  - model: ./a\n"
    "    parameters: {sparsity: 2}\n",
]


def _cases():
    for method, key, value in PARAMETER_CASES:
        yield f"{method}-{key}-{value}", BASE.format(
            method=method, extra=PARAMS.format(key=key, value=value))
    for i, text in enumerate(DOCUMENTS):
        yield f"document-{i}", text
    for recipe in sorted((ROOT / "recipes").glob("*.yml")):
        yield recipe.name, recipe.read_text(encoding="utf-8")


CASES = dict(_cases())


def _verdict(path: Path, light: bool):
    try:
        recipes = check_recipe_file(str(path), check_models=False, light=light)
    except RecipeError as error:
        return "refused", str(error)
    return "ok", [(r.source["merge_method"], len(mergekit_schema.referenced_models(r.source)))
                  for r in recipes]


def test_snapshot_is_the_installed_mergekits():
    assert mergekit_schema.snapshot() is not None, (
        "the snapshot was made from another mergekit: python -m fapm_merge.mergekit_schema "
        "--write")
    fresh = json.dumps(mergekit_schema.generate(), indent=1, sort_keys=True) + "\n"
    assert mergekit_schema.SNAPSHOT.read_text(encoding="utf-8") == fresh, (
        "rerun python -m fapm_merge.mergekit_schema --write")


@pytest.mark.parametrize("name", list(CASES))
def test_light_checks_agree_with_mergekit(tmp_path, name):
    recipe = tmp_path / "r.yml"
    recipe.write_text(CASES[name], encoding="utf-8")
    light, full = _verdict(recipe, light=True), _verdict(recipe, light=False)
    assert light[0] == full[0], f"light: {light[1]}\nmergekit: {full[1]}"
    if light[0] == "ok":  # the same methods and model counts as mergekit's parsed config
        assert light[1] == full[1]
        light_recipes = check_recipe_file(str(recipe), check_models=False, light=True)
        assert all(r.config is None for r in light_recipes), "the light path fell back"
        from mergekit.config import MergeConfiguration
        counted = [len(MergeConfiguration.model_validate(r.source).referenced_models())
                   for r in check_recipe_file(str(recipe), check_models=False)]
        assert [n for _, n in light[1]] == counted


def test_the_corpus_has_both_verdicts(tmp_path):
    """The agreement above is only worth something if the corpus holds failures and passes."""
    verdicts = []
    for name, text in CASES.items():
        recipe = tmp_path / f"{len(verdicts)}.yml"
        recipe.write_text(text, encoding="utf-8")
        verdicts.append(_verdict(recipe, light=True)[0])
    assert verdicts.count("ok") >= 20 and verdicts.count("refused") >= 30


def test_validate_without_model_checks_imports_no_heavy_library(tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(CASES["fapm-sparsity-0.5"], encoding="utf-8")
    bad = tmp_path / "bad.yml"
    bad.write_text(CASES["fapm-sparsity-1.5"], encoding="utf-8")
    code = ("from fapm_merge.cli import main\n"
            f"for path in ({str(recipe)!r}, {str(bad)!r}):\n"
            "    try:\n        main(['validate', '--no-model-check', path])\n"
            "    except SystemExit as done:\n        print('exit', done.code)")
    assert _imported_after(code) == []


def test_a_recipe_for_another_plugins_method_falls_back_to_mergekit(tmp_path, monkeypatch):
    """A method missing from the snapshot (another plugin's) is looked up in mergekit."""
    recipe = tmp_path / "r.yml"
    recipe.write_text(CASES["fapm-sparsity-0.5"], encoding="utf-8")
    tables = json.loads(json.dumps(mergekit_schema.snapshot()))
    del tables["methods"]["fapm"]
    monkeypatch.setattr(mergekit_schema, "snapshot", lambda: tables)
    (recipe_checked,) = check_recipe_file(str(recipe), check_models=False, light=True)
    assert recipe_checked.config is not None  # the full checks ran
