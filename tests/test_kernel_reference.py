"""The fast selection paths against an independent float64 reference (issue #11, item 7).

Shapes are above every cutoff of fapm_merge.kernel (direct selection, chunk and tie-chunk
sizes; the sample is then larger than its minimum), inputs are float64, float32 and bfloat16
(with few distinct values: heavy ties). The reference is the plain formula in float64 and a
full stable sort; it shares no code with the kernel. Scores in the kernel are float32, so an
element may be ranked differently only where its float64 score is within float32 rounding of
the threshold; everything else must agree, and the kept count must be exact.
"""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
import torch

from fapm_merge import kernel

UNIT = 2.0**-24  # float32 unit roundoff


def reference(base: torch.Tensor, ft: torch.Tensor, sparsity: float, score: str):
    """(mask, float64 scores, float32 rounding bound per element, threshold score)."""
    b = base.double().reshape(-1)
    f = ft.double().reshape(-1)
    d = (f - b).abs()
    n = b.numel()
    k = math.floor((1 - Decimal(repr(float(sparsity)))) * n)
    if score == "magnitude":
        s = d.clone()
        rounding = 4 * UNIT * d
    elif score == "relative":  # the smallest relative change first
        relative = d / b.abs()
        s = torch.where(b != 0, -relative, -1e308)
        rounding = 4 * UNIT * relative
    else:
        mean = b.abs().mean().item()
        relative = d / b.abs()  # inf at W_pre == 0
        s = torch.where(b != 0, d - mean * relative, -1e308)  # W_pre == 0: after every other
        rounding = 8 * UNIT * (d + mean * relative)
    s[d == 0] = -math.inf  # unchanged elements are never kept
    candidates = int((d != 0).sum())
    order = torch.sort(s, descending=True, stable=True).indices[: min(k, candidates)]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order] = True
    threshold = s[order[-1]].item() if order.numel() else None
    return mask, s, rounding, threshold


def assert_matches_reference(mask, base, ft, sparsity, score):
    expected, s, rounding, threshold = reference(base, ft, sparsity, score)
    mask = mask.reshape(-1)
    assert int(mask.sum()) == int(expected.sum())
    differ = mask ^ expected
    if threshold is None:
        assert not bool(differ.any())
        return
    # rounding of the threshold element itself is bounded by the largest bound near it
    near = (s - threshold).abs() <= rounding + rounding[expected].max()
    assert bool((differ <= near).all()), "a clearly ranked element was selected wrongly"
    # and near the threshold only a few can swap
    assert int(differ.sum()) <= max(4, int(near.sum()))


def smooth_pair(shape, dtype, seed, delta=2e-3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64) * 0.05
    base[torch.rand(shape, generator=g) < 0.01] = 0  # W_pre == 0 entries
    change = torch.randn(shape, generator=g, dtype=torch.float64) * delta
    change[torch.rand(shape, generator=g) < 0.1] = 0  # unchanged entries
    return base.to(dtype), (base + change).to(dtype)


def tied_pair(shape, seed):
    """bfloat16 weights taking a handful of values: most scores tie with many others."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randint(-3, 4, shape, generator=g).float() * 0.015625).bfloat16()
    step = torch.randint(-2, 3, shape, generator=g).float() * 0.0009765625
    return base, (base.float() + step).bfloat16()


@pytest.fixture
def paths(monkeypatch):
    """Records which selection path answered: fused FAPM, or the bracketed scan."""
    seen = []
    real_fused, real_resolve = kernel._fapm_top_k, kernel._resolve

    def fused(*args, **kwargs):
        result = real_fused(*args, **kwargs)
        seen.append("fused" if result is not None else "fused-declined")
        return result

    def resolve(*args, **kwargs):
        result = real_resolve(*args, **kwargs)
        seen.append("bracket" if result is not None else "bracket-missed")
        return result

    monkeypatch.setattr(kernel, "_fapm_top_k", fused)
    monkeypatch.setattr(kernel, "_resolve", resolve)
    return seen


CASES = [  # (dtype, shape, sparsity, score, the path that must answer prune_mask)
    (torch.float64, (700, 1100), 0.9, "fapm", "fused"),
    (torch.float64, (700, 1100), 0.3, "fapm", "bracket"),
    (torch.float64, (700, 1100), 0.9, "magnitude", "bracket"),
    (torch.float32, (513, 1031), 0.99, "fapm", "fused"),
    (torch.float32, (513, 1031), 0.4, "fapm", "bracket"),
    (torch.float32, (513, 1031), 0.9, "relative", "bracket"),
]


@pytest.mark.parametrize("dtype,shape,sparsity,score,path", CASES)
def test_fast_paths_match_the_float64_reference(paths, dtype, shape, sparsity, score, path):
    base, ft = smooth_pair(shape, dtype, seed=len(paths) + shape[0] + int(sparsity * 100))
    assert base.numel() > max(kernel._DIRECT_SELECTION, kernel._CHUNK)
    mask = kernel.prune_mask(base, ft, sparsity, score)
    assert path in paths, paths
    assert_matches_reference(mask, base, ft, sparsity, score)
    out = kernel.fapm_prune(base, ft, sparsity, score)
    assert out.dtype == dtype
    assert torch.equal(out, torch.where(mask, ft, base))


def test_float64_small_changes_are_ranked_in_float64():
    """Changes far below float32's resolution of the weights: W_ft rounded to float32 before
    subtracting would rank noise."""
    base, ft = smooth_pair((400, 300), torch.float64, seed=3, delta=1e-9)
    for sparsity in (0.9, 0.5):
        assert_matches_reference(kernel.prune_mask(base, ft, sparsity), base, ft, sparsity, "fapm")
        mask = kernel.prune_mask(base, ft, sparsity, "magnitude")
        assert_matches_reference(mask, base, ft, sparsity, "magnitude")


@pytest.mark.parametrize("sparsity,score,path", [
    (0.9, "fapm", "fused"), (0.4, "fapm", "bracket"), (0.9, "magnitude", "bracket"),
])
def test_heavy_ties_above_the_tie_chunk(paths, sparsity, score, path):
    base, ft = tied_pair((2050, 2049), seed=int(sparsity * 10))
    assert base.numel() > kernel._PIECE
    assert kernel._sample_size(base.numel()) > kernel._MIN_SAMPLE
    mask = kernel.prune_mask(base, ft, sparsity, score)
    assert path in paths, paths
    # few distinct values: every float64 score is far from any other, so no rounding excuse
    expected, *_ = reference(base, ft, sparsity, score)
    assert torch.equal(mask.reshape(-1), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sparsity_edges_and_idempotence_on_large_tensors(dtype):
    base, ft = smooth_pair((600, 700), dtype, seed=5)
    ints = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16}
    bits = lambda t: t.view(ints[dtype])  # noqa: E731
    assert torch.equal(bits(kernel.fapm_prune(base, ft, 0.0)), bits(ft))
    assert torch.equal(bits(kernel.fapm_prune(base, ft, 1.0)), bits(base))
    for sparsity in (0.9, 0.3):
        once = kernel.fapm_prune(base, ft, sparsity)
        kept = int((once != base).sum())
        assert kept == int(reference(base, ft, sparsity, "fapm")[0].sum())
        assert torch.equal(bits(kernel.fapm_prune(base, once, sparsity)), bits(once))
