"""Cross-checks against mergekit's own methods, through whole merges of tiny models.

The tiny models have distinct magnitudes (random float32), so magnitude ranking has no ties
and mergekit's argsort-based trim must select exactly what our exact top-k selects.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_state

from fapm_merge.merging import merge

RECIPE = """\
merge_method: {method}
base_model: {base}
models:
  - model: {a}
    parameters: {{{params_a}}}
  - model: {b}
    parameters: {{{params_b}}}
parameters: {{{shared}}}
dtype: float32
"""


def merged(tmp_path, tiny_models, name, method, params_a, params_b, shared=""):
    recipe = tmp_path / f"{name}.yml"
    recipe.write_text(
        RECIPE.format(
            method=method,
            base=tiny_models["base"],
            a=tiny_models["ft_a"],
            b=tiny_models["ft_b"],
            params_a=params_a,
            params_b=params_b,
            shared=shared,
        )
    )
    merge(str(recipe), str(tmp_path / name))
    return load_state(tmp_path / name)


def assert_same_models(ours, theirs):
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fapm_ties_with_magnitude_score_equals_mergekit_ties(tmp_path, tiny_models):
    # mergekit's ties always elects by `sum`; `count` is checked against a reference in
    # test_kernel.py.
    theirs = merged(
        tmp_path, tiny_models, "ties", "ties",
        "weight: 1.0, density: 0.1", "weight: 0.6, density: 0.3",
    )
    ours = merged(
        tmp_path, tiny_models, "fapm_ties", "fapm_ties",
        "weight: 1.0, sparsity: 0.9", "weight: 0.6, sparsity: 0.7", "score: magnitude",
    )
    assert_same_models(ours, theirs)


def test_fapm_at_sparsity_zero_equals_task_arithmetic(tmp_path, tiny_models):
    theirs = merged(
        tmp_path, tiny_models, "ta", "task_arithmetic", "weight: 1.0", "weight: 0.5",
        "lambda: 0.8",
    )
    ours = merged(
        tmp_path, tiny_models, "fapm0", "fapm",
        "weight: 1.0, sparsity: 0.0", "weight: 0.5, sparsity: 0.0", "lambda: 0.8",
    )
    assert_same_models(ours, theirs)


def test_normalize_matches_task_arithmetic_normalize(tmp_path, tiny_models):
    theirs = merged(
        tmp_path, tiny_models, "ta_n", "task_arithmetic", "weight: 1.0", "weight: 0.5",
        "normalize: true",
    )
    ours = merged(
        tmp_path, tiny_models, "fapm_n", "fapm",
        "weight: 1.0, sparsity: 0.0", "weight: 0.5, sparsity: 0.0", "normalize: true",
    )
    assert_same_models(ours, theirs)


def test_fapm_score_changes_the_result(tmp_path, tiny_models):
    """Guard against the parity tests passing because `score` were ignored."""
    magnitude = merged(
        tmp_path, tiny_models, "m", "fapm_ties",
        "sparsity: 0.9", "sparsity: 0.9", "score: magnitude",
    )
    fapm = merged(tmp_path, tiny_models, "f", "fapm_ties", "sparsity: 0.9", "sparsity: 0.9")
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(magnitude[name], fapm[name])


SINGLE = """\
merge_method: {method}
base_model: {base}
models:
{models}
parameters: {{{shared}}}
dtype: float32
"""


def merged_with(tmp_path, tiny_models, name, method, entries, shared):
    models = "".join(
        f"  - model: {tiny_models[key]}\n    parameters: {{{params}}}\n" for key, params in entries
    )
    recipe = tmp_path / f"{name}.yml"
    recipe.write_text(SINGLE.format(method=method, base=tiny_models["base"], models=models,
                                    shared=shared))
    merge(str(recipe), str(tmp_path / name))
    return load_state(tmp_path / name)


@pytest.mark.parametrize("weights", [(0.0,), (0.5,), (-1.0,), (0.0, 0.5), (0.5, -1.0)])
@pytest.mark.parametrize("normalize", ["true", "false"])
def test_weights_match_mergekit_ties_and_task_arithmetic(tmp_path, tiny_models, weights,
                                                        normalize):
    """Weights 0, 0.5 and -1, on one and two fine-tunes, with normalize on and off."""
    keys = ["ft_a", "ft_b"][: len(weights)]
    results = {}
    for name, method, params, shared in (
        ("ties", "ties", "density: 0.2", ""),
        ("fapm_ties", "fapm_ties", "sparsity: 0.8", "score: magnitude, "),
        ("ta", "task_arithmetic", "", ""),
        ("fapm0", "fapm", "sparsity: 0.0", ""),
    ):
        entries = [(k, f"weight: {w}" + (f", {params}" if params else "")) for k, w in zip(keys, weights)]
        results[name] = merged_with(tmp_path, tiny_models, name, method, entries,
                                    f"{shared}normalize: {normalize}")
    assert_same_models(results["fapm_ties"], results["ties"])
    assert_same_models(results["fapm0"], results["ta"])
    ours = results["fapm_ties"]
    if weights == (0.0,):  # weight 0 is the base, exactly
        base = load_state(tiny_models["base"])
        assert all(torch.equal(ours[k], base[k]) for k in base)
