"""The low-rank rivals (``spectral``, ``lowrank``): checked against numpy's SVD, against the
Gavish-Donoho threshold computed from its definition, and through mergekit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fapm_merge import spectral


def _marchenko_pastur_median(beta: float) -> float:
    """Median of the Marchenko-Pastur law of aspect ratio ``beta`` (unit variance), by
    bisection on its numerically integrated distribution function."""
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    # x = lo + (hi - lo) t^2: the 1/sqrt(x) edge at beta = 1 becomes a finite integrand
    t = np.linspace(1e-9, 1, 400001)
    x = lo + (hi - lo) * t**2
    density = np.sqrt(np.clip((hi - x) * (x - lo), 0, None)) / (2 * math.pi * beta * x)
    integrand = density * 2 * (hi - lo) * t
    cdf = np.concatenate([[0], np.cumsum((integrand[1:] + integrand[:-1]) / 2 * np.diff(t))])
    return float(np.interp(0.5, cdf / cdf[-1], x[: len(cdf)]))


def _omega_exact(beta: float) -> float:
    """The paper's eq. (5): lambda*(beta) / sqrt(median of Marchenko-Pastur)."""
    lam = math.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + math.sqrt(beta**2 + 14 * beta + 1)))
    return lam / math.sqrt(_marchenko_pastur_median(beta))


@pytest.mark.parametrize("beta", [0.1, 0.25, 0.5, 0.75, 1.0])
def test_threshold_coefficient_matches_its_definition(beta):
    assert spectral.gavish_donoho_omega(beta) == pytest.approx(_omega_exact(beta), abs=0.02)


def _planted(rows, cols, rank, noise, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, rank, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=torch.float64))[0]
    strength = torch.linspace(8, 4, rank, dtype=torch.float64) * noise * math.sqrt(max(rows, cols))
    signal = (u * strength) @ v.T
    return signal + noise * torch.randn(rows, cols, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape, rank", [((300, 200), 5), ((200, 600), 3), ((256, 256), 8)])
def test_threshold_recovers_the_planted_rank(shape, rank):
    change = _planted(*shape, rank, noise=0.01, seed=rank)
    s = torch.linalg.svdvals(change)
    assert spectral.spectral_rank(s, shape) == rank


def test_truncation_matches_numpy_svd():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(120, 80, generator=g, dtype=torch.float64)
    finetuned = base + _planted(120, 80, 4, noise=0.01, seed=9)
    change = (finetuned - base).numpy()
    u, s, vh = np.linalg.svd(change, full_matrices=False)
    for rank in (1, 4, 20):
        expected = (u[:, :rank] * s[:rank]) @ vh[:rank]
        ours = spectral.truncate_task_vector(base, finetuned, rank).numpy()
        np.testing.assert_allclose(ours, expected, atol=1e-10)
    spec = spectral.truncate_task_vector(base, finetuned).numpy()  # planted rank: 4
    np.testing.assert_allclose(spec, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-10)


def test_edges():
    base, finetuned = torch.zeros(5), torch.arange(5.0)
    assert torch.equal(spectral.truncate_task_vector(base, finetuned), finetuned)  # 1-D: whole
    matrix = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(spectral.merge_low_rank(matrix, [matrix], [1.0]), matrix)  # no change
    full = spectral.truncate_task_vector(torch.zeros(6, 4), matrix, rank=99)  # clipped
    assert torch.allclose(full, matrix, atol=1e-5)
    assert torch.equal(spectral.merge_low_rank(matrix, [matrix + 1], [1.0], rank=0), matrix)
    with pytest.raises(ValueError, match="NaN or infinite"):
        spectral.truncate_task_vector(matrix, matrix * float("nan"))
    with pytest.raises(ValueError):
        spectral.gavish_donoho_omega(1.5)


@pytest.mark.parametrize("recipe_method, rank", [("spectral", None), ("lowrank", 2)])
def test_merge_methods_through_mergekit(tiny_models, tmp_path, recipe_method, rank):
    from conftest import load_state
    from fapm_merge.merging import merge

    parameters = {"rank": rank} if rank else {}
    recipe = {"merge_method": recipe_method, "base_model": str(tiny_models["base"]),
              "models": [{"model": str(tiny_models["ft_a"]), "parameters": {"weight": 0.5}}],
              "parameters": parameters, "dtype": "float32"}
    merge(recipe, tmp_path / "out")
    out = load_state(tmp_path / "out")
    base, ft = load_state(tiny_models["base"]), load_state(tiny_models["ft_a"])
    for name, tensor in out.items():
        change = ft[name] - base[name]  # float32 models: the merge's own arithmetic, written out
        if change.dim() == 2:
            u, s, vh = torch.linalg.svd(change, full_matrices=False)
            keep = spectral.spectral_rank(s, change.shape) if rank is None else rank
            change = (u[:, :keep] * s[:keep]) @ vh[:keep]
        assert torch.equal(tensor, change * 0.5 + base[name]), name
    reduced = [n for n in out if out[n].dim() == 2 and not torch.equal(out[n], ft[n])]
    assert reduced  # the 2-D tensors are actually reduced
