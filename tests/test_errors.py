"""Bad input: one clear message naming the file or tensor and the fix, and no output."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import fine_tune_of, load_state, run_tool, save_model

from fapm_merge.cli import main

RECIPE = """\
merge_method: fapm
base_model: {base}
models:
  - model: {ft}
    parameters:
      {key}: {value}
dtype: float32
"""


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("broken")
    base = save_model(root / "base")
    good = fine_tune_of(base, root / "good", seed=1)
    save_model(root / "wide", seed=3, intermediate_size=96)  # different MLP shapes
    missing = root / "missing-tensor"
    fine_tune_of(base, missing, seed=2)
    state = load_state(missing)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, missing / "model.safetensors", metadata={"format": "pt"})
    nan = root / "nan"
    fine_tune_of(base, nan, seed=4)
    state = load_state(nan)
    state["model.layers.0.self_attn.v_proj.weight"][0, 0] = float("nan")
    save_file(state, nan / "model.safetensors", metadata={"format": "pt"})
    return root, good


def run_fapm(tmp_path: Path, base, ft, key="sparsity", value="0.9"):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(RECIPE.format(base=base, ft=ft, key=key, value=value))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["run", str(recipe), str(out), "--no-copy-tokenizer", "--no-write-model-card"]
    )
    return result, out


def assert_clean_failure(result, out: Path, *needles: str):
    assert result.exit_code != 0
    message = result.output
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    assert "Traceback" not in message
    assert not out.exists(), "a failed run left an output directory"
    assert not list(out.parent.glob(".out.partial-*"))


def test_model_path_missing(broken_models, tmp_path):
    root, good = broken_models
    result, out = run_fapm(tmp_path, root / "base", root / "does-not-exist")
    assert_clean_failure(result, out, "does-not-exist", "not found", "local model folder")


def test_shapes_differ(broken_models, tmp_path):
    root, _ = broken_models
    result, out = run_fapm(tmp_path, root / "base", root / "wide")
    assert_clean_failure(result, out, "mlp", "shape", "must come from this base")


def test_tensor_missing_in_one_model(broken_models, tmp_path):
    root, _ = broken_models
    result, out = run_fapm(tmp_path, root / "base", root / "missing-tensor")
    assert_clean_failure(result, out, "model.layers.1.mlp.up_proj.weight", "missing from")


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_sparsity_out_of_range(broken_models, tmp_path, value):
    root, good = broken_models
    result, out = run_fapm(tmp_path, root / "base", good, value=value)
    assert_clean_failure(result, out, f"sparsity = {value}", "less than or equal to 1"
                         if value == "1.5" else "greater than or equal to 0")


def test_unknown_parameter_key(broken_models, tmp_path):
    root, good = broken_models
    result, out = run_fapm(tmp_path, root / "base", good, key="sparsty", value="0.5")
    assert_clean_failure(result, out, "'sparsty'", "Did you mean 'sparsity'", "silently ignore")


def test_unknown_score_lists_valid_values(broken_models, tmp_path):
    root, good = broken_models
    result, out = run_fapm(tmp_path, root / "base", good, key="score", value="wanda")
    assert_clean_failure(result, out, "score = 'wanda'", "'fapm'", "'magnitude'")


def test_non_finite_weights_fail_mid_merge_without_output(broken_models, tmp_path):
    root, _ = broken_models
    result, out = run_fapm(tmp_path, root / "base", root / "nan")
    assert_clean_failure(result, out, "model.layers.0.self_attn.v_proj.weight", "NaN")


def test_existing_output_needs_force(broken_models, tmp_path):
    root, good = broken_models
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    result, out = run_fapm(tmp_path, root / "base", good)
    assert result.exit_code != 0 and "--force" in result.output
    assert (out / "keep.txt").exists()


def test_validate_command_reports_ok_and_errors(broken_models, tmp_path):
    root, good = broken_models
    recipe = tmp_path / "ok.yml"
    recipe.write_text(RECIPE.format(base=root / "base", ft=good, key="sparsity", value=0.8))
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 0 and "ok: merge_method fapm" in result.output
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.yml")])
    assert result.exit_code != 0 and "recipe file not found" in result.output


def test_plain_mergekit_yaml_rejects_bad_sparsity_before_writing(broken_models, tmp_path):
    """Without our CLI, mergekit's planner still validates the value (pydantic bounds)."""
    root, good = broken_models
    recipe = tmp_path / "bad.yml"
    recipe.write_text(RECIPE.format(base=root / "base", ft=good, key="sparsity", value=2))
    result = run_tool("mergekit-yaml", recipe, tmp_path / "out", check=False)
    assert result.returncode != 0
    assert "less than or equal to 1" in result.stderr
    assert not list((tmp_path / "out").glob("*.safetensors"))


@pytest.mark.parametrize(
    "layout, location",
    [
        ("slices:\n  - sources:\n      - model: ./a\n        layer_range: [0, 3]\n"
         "        parameters: {sparsty: 0.5}\n", "slices[0].sources[0] (./a)"),
        ("slices:\n  - sources:\n      - model: ./a\n        layer_range: [0, 3]\n"
         "    parameters: {sparsty: 0.5}\n", "slices[0].parameters"),
        ("models:\n  - model: ./a\nparameters: {sparsty: 0.5}\n", "top-level parameters"),
    ],
)
def test_unknown_key_found_in_every_scope(tmp_path, layout, location):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: fapm\nbase_model: ./b\n{layout}")
    result = CliRunner().invoke(main, ["validate", "--no-model-check", str(recipe)])
    assert result.exit_code != 0
    assert location in result.output and "Did you mean 'sparsity'" in result.output


@pytest.fixture(scope="module")
def nan_base(broken_models):
    from safetensors.torch import save_file

    root, _ = broken_models
    folder = root / "nan-base"
    save_model(folder)
    state = load_state(folder)
    state["model.layers.2.mlp.down_proj.weight"][3, 1] = float("inf")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("method, score", [("fapm", "fapm"), ("fapm", "relative"),
                                           ("fapm", "magnitude"), ("fapm", "random"),
                                           ("fapm_ties", "fapm")])
def test_non_finite_base_is_named_on_every_path(broken_models, nan_base, tmp_path, method, score):
    root, good = broken_models
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: {method}\nbase_model: {nan_base}\nmodels:\n  - model: {good}\n"
                      f"parameters: {{score: {score}}}\ndtype: float32\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe), str(out), "--no-copy-tokenizer",
                                       "--no-write-model-card"])
    assert_clean_failure(result, out, "model.layers.2.mlp.down_proj.weight",
                         f"base model {nan_base}")
    assert "fine-tune" not in result.output.split("NaN")[-1]


def test_non_finite_fine_tune_is_named(broken_models, tmp_path):
    root, good = broken_models
    result, out = run_fapm(tmp_path, root / "base", root / "nan")
    assert_clean_failure(result, out, "model.layers.0.self_attn.v_proj.weight",
                         f"fine-tune {root / 'nan'}")
    assert "base model" not in result.output


@pytest.mark.parametrize(
    "text, needles",
    [
        ("merge_method: fapm_tie\nbase_model: ./b\nmodels:\n  - model: ./a\n",
         ["unknown merge_method 'fapm_tie'", "Did you mean 'fapm_ties'", "task_arithmetic"]),
        ("merge_method: fapm\nmodels: [\n", ["not valid YAML"]),
        ("# nothing here\n", ["the recipe is empty"]),
    ],
)
def test_recipe_file_errors(tmp_path, text, needles):
    recipe = tmp_path / "r.yml"
    recipe.write_text(text)
    result = CliRunner().invoke(main, ["validate", "--no-model-check", str(recipe)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def test_run_refuses_a_multi_document_recipe(broken_models, tmp_path):
    root, good = broken_models
    one = RECIPE.format(base=root / "base", ft=good, key="sparsity", value=0.9)
    recipe = tmp_path / "multi.yml"
    recipe.write_text(f"name: first\n{one}---\nname: second\n{one}")
    result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "out")])
    assert result.exit_code != 0 and "holds 2 recipes" in result.output
    assert "mergekit-multi" in result.output and not (tmp_path / "out").exists()
