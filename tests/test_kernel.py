"""The FAPM kernel against an independent float64 reference and against its properties."""

from __future__ import annotations

import math
import zlib
from decimal import Decimal

import pytest
import torch

from fapm_merge import kernel
from fapm_merge.kernel import (
    NonFiniteWeightsError,
    fapm_prune,
    forgetting_score,
    keep_top_k,
    kept_count,
    merge_task_vectors,
    prune_mask,
)


def reference_mask(base: torch.Tensor, finetuned: torch.Tensor, sparsity: float):
    """Straightforward FAPM in float64 with a full stable sort.

    Returns (mask, scores of real changes, threshold score): elements with dW == 0 are not
    candidates; W_pre == 0 changes rank after all others; ties go to the lowest index.
    """
    b = base.double().flatten()
    d = finetuned.double().flatten() - b
    n = b.numel()
    k = int((1 - Decimal(repr(float(sparsity)))) * n)
    mean = b.abs().mean().item()
    candidates = torch.nonzero(d != 0).flatten()
    dc, bc = d[candidates].abs(), b[candidates].abs()
    if mean == 0:
        score = dc
    else:
        with torch.no_grad():
            score = torch.where(bc > 0, dc - mean * dc / bc.clamp_min(1e-300), -1e308)
    order = torch.sort(-score, stable=True).indices  # candidates are in index order
    chosen = candidates[order[: min(k, candidates.numel())]]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    full = torch.full((n,), -math.inf, dtype=torch.float64)
    full[candidates] = score
    threshold = score[order[min(k, candidates.numel()) - 1]].item() if chosen.numel() else None
    return mask.view(base.shape), full.view(base.shape), threshold


def stable_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(-scores.flatten().double(), stable=True).indices[:k]
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(scores.shape)


def pair(shape, dtype, seed, zero_fraction=0.05):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.05
    delta = torch.randn(shape, generator=g) * 0.002
    delta[torch.rand(shape, generator=g) < zero_fraction] = 0
    return base.to(dtype), (base + delta).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("shape", [(64, 96), (1000,), (7, 3, 11)])
def test_matches_float64_reference(dtype, sparsity, shape):
    base, ft = pair(shape, dtype, seed=zlib.crc32(f"{dtype}:{sparsity}:{shape}".encode()) % 1000)
    mask, differ = assert_matches_reference(base, ft, sparsity)
    assert int(differ.sum()) <= max(2, mask.numel() // 1000)


def assert_matches_reference(base, ft, sparsity):
    """prune_mask vs :func:`reference_mask`: the same count, and a different choice only where
    the float64 score equals the threshold to float32 precision (float32 scores can tie or
    swap where float64 ones barely differ). Returns (mask, where the two differ)."""
    mask = prune_mask(base, ft, sparsity)
    expected, ref_scores, threshold = reference_mask(base, ft, sparsity)
    assert int(mask.sum()) == int(expected.sum())
    differ = mask ^ expected
    ambiguous = (ref_scores - threshold).abs() <= 1e-5 * abs(threshold) + 1e-12
    assert bool((differ <= ambiguous).all())
    return mask, differ


@pytest.mark.parametrize(
    "dtype, shape",
    [
        (torch.float64, (64, 96)),
        (torch.float64, (300, 1000)),  # above the direct-selection cutoff (65,536)
        (torch.float32, (300, 1000)),
        (torch.bfloat16, (300, 1000)),  # heavy ties at the threshold
        (torch.float32, (2100, 2000)),  # above the tie-chunk size (4,194,304): several chunks
    ],
)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_large_and_float64_inputs_match_the_reference(dtype, shape, sparsity):
    """The sampled-bracket paths (fused FAPM and the general one) against the float64 sort."""
    base, ft = pair(shape, dtype, seed=zlib.crc32(f"large:{dtype}:{shape}:{sparsity}".encode()))
    mask, _ = assert_matches_reference(base, ft, sparsity)
    out = fapm_prune(base, ft, sparsity)
    assert out.dtype == dtype
    assert torch.equal(out[mask], ft[mask]) and torch.equal(out[~mask], base[~mask])
    assert torch.equal(fapm_prune(base, out, sparsity), out)  # idempotent
    assert torch.equal(fapm_prune(base, ft, 0.0), ft) and torch.equal(fapm_prune(base, ft, 1.0), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_bits_and_dtype(dtype):
    base, ft = pair((128, 64), dtype, seed=3)
    out = fapm_prune(base, ft, 0.9)
    mask = prune_mask(base, ft, 0.9)
    assert out.dtype == dtype and out.shape == base.shape
    assert torch.equal(out[mask], ft[mask])
    assert torch.equal(out[~mask], base[~mask])


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_tiny_tensors(n):
    base, ft = pair((n,), torch.float32, seed=n, zero_fraction=0.0)
    for sparsity in (0.0, 0.5, 0.9, 1.0):
        mask = prune_mask(base, ft, sparsity)
        assert int(mask.sum()) == math.floor((1 - Decimal(str(sparsity))) * n)
        assert torch.equal(mask, reference_mask(base, ft, sparsity)[0])


def test_sparsity_zero_and_one():
    base, ft = pair((50, 40), torch.bfloat16, seed=4)
    assert torch.equal(fapm_prune(base, ft, 0.0), ft)
    assert torch.equal(fapm_prune(base, ft, 1.0), base)


def test_exact_kept_count_and_unchanged_elements():
    base, ft = pair((300, 70), torch.float32, seed=5, zero_fraction=0.3)
    changed = int((ft != base).sum())
    for sparsity in (0.1, 0.5, 0.9, 0.97):
        mask = prune_mask(base, ft, sparsity)
        k = kept_count(base.numel(), sparsity)
        assert int(mask.sum()) == min(k, changed)
        assert not bool((mask & (ft == base)).any()), "a no-op change took budget"


def test_idempotent():
    base, ft = pair((200, 30), torch.bfloat16, seed=6)
    once = fapm_prune(base, ft, 0.9)
    assert torch.equal(fapm_prune(base, once, 0.9), once)


def test_kept_count_matches_authors_int_and_survives_float32():
    float32_09 = float(torch.tensor(0.9, dtype=torch.float32))  # 0.8999999761581421
    for n in [10, 30, 999, 4096 * 14336, 128256 * 4096]:
        assert kept_count(n, 0.9) == n // 10
        assert kept_count(n, float32_09) == n // 10
    assert kept_count(100, 0.0) == 100 and kept_count(100, 1.0) == 0
    with pytest.raises(ValueError):
        kept_count(10, 1.5)


def test_zero_base_entries_never_nan_and_rank_last():
    base = torch.tensor([0.0, 0.0, 0.1, -0.2, 0.3, 0.0])
    ft = base + torch.tensor([0.5, 0.0, 0.01, 0.01, -0.01, 0.0])
    score = forgetting_score(base, ft)
    assert not bool(score.isnan().any())
    # index 0 (W_pre = 0, big change) ranks below every finite-ratio change, above no-ops
    assert score[0] < score[2:5].min()
    assert score[1] == -math.inf and score[5] == -math.inf
    assert prune_mask(base, ft, 0.5).tolist() == [False, False, True, True, True, False]
    assert prune_mask(base, ft, 0.0).all()  # sparsity 0 keeps everything, no-ops included


def test_all_zero_base_falls_back_to_magnitude():
    base = torch.zeros(10)
    ft = torch.arange(10, dtype=torch.float32) / 10
    assert torch.equal(forgetting_score(base, ft)[1:], ft[1:])
    assert prune_mask(base, ft, 0.7).tolist() == [False] * 7 + [True] * 3


def test_equal_scores_break_by_lowest_index():
    base = torch.full((4, 5), 0.5)
    ft = base + 0.01  # every element has the same score
    mask = prune_mask(base, ft, 0.75)
    assert mask.flatten().tolist() == [True] * 5 + [False] * 15


@pytest.mark.parametrize("seed", range(6))
def test_keep_top_k_matches_stable_sort_with_heavy_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 5000, (1,), generator=g))
    scores = torch.randint(0, 6, (n,), generator=g).float()
    scores[torch.rand(n, generator=g) < 0.2] = -math.inf
    for k in (0, 1, n // 7, n // 2, n - 1, n):
        assert torch.equal(keep_top_k(scores, k), stable_top_k(scores, k))


def test_sampled_selection_is_exact_on_large_tensors():
    # Above the direct-selection size the threshold is bracketed from a sample.
    g = torch.Generator().manual_seed(0)
    n = kernel._DIRECT_SELECTION + 12345
    scores = torch.randn(n, generator=g).to(torch.bfloat16).float()  # many ties
    scores[:1000] = -math.inf
    for fraction in (0.1, 0.5, 0.999):
        k = int(fraction * n)
        assert torch.equal(keep_top_k(scores, k), stable_top_k(scores, k))


@pytest.mark.parametrize("pick_value", [10.0, -10.0])
def test_selection_recovers_when_the_sample_misses(monkeypatch, pick_value):
    # Force a useless sample (every pick is element 0) so the bracket misses high or low.
    monkeypatch.setattr(kernel, "_DIRECT_SELECTION", 100)
    monkeypatch.setattr(kernel, "_SAMPLE", 64)
    scores = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    scores[0] = pick_value
    real_randint = torch.randint
    monkeypatch.setattr(
        kernel.torch, "randint", lambda n, size, **kw: real_randint(1, size, **kw) * 0
    )
    for k in (1, 100, 2500, 4999):
        assert torch.equal(keep_top_k(scores, k), stable_top_k(scores, k))


def test_non_finite_weights_are_rejected():
    base, ft = pair((10, 10), torch.float32, seed=7)
    ft[3, 3] = float("nan")
    with pytest.raises(NonFiniteWeightsError):
        prune_mask(base, ft, 0.9)
    base2, ft2 = pair((10, 10), torch.float32, seed=7)
    base2[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError):
        prune_mask(base2, ft2, 0.9)


def test_baseline_scores():
    base = torch.tensor([1.0, 0.1, -2.0, 0.5])
    ft = base + torch.tensor([0.3, 0.05, -0.4, 0.0])
    assert prune_mask(base, ft, 0.75, score="magnitude").tolist() == [False, False, True, False]
    # relative change 0.3, 0.5, 0.2 -> the smallest (index 2) is kept
    assert prune_mask(base, ft, 0.75, score="relative").tolist() == [False, False, True, False]
    g1, g2 = (torch.Generator().manual_seed(5) for _ in range(2))
    r1 = prune_mask(base, ft, 0.5, score="random", generator=g1)
    r2 = prune_mask(base, ft, 0.5, score="random", generator=g2)
    assert torch.equal(r1, r2) and int(r1.sum()) == 2 and not r1[3]
    with pytest.raises(ValueError, match="valid: fapm"):
        prune_mask(base, ft, 0.5, score="wanda")


def reference_merge(base, fts, sparsity, weight, normalize, scale, consensus):
    """Task arithmetic / TIES over pruned task vectors, written out plainly in float64."""
    b = base.double()
    deltas = []
    for ft, s, w in zip(fts, sparsity, weight):
        mask, _, _ = reference_mask(base, ft, s)
        deltas.append((ft.double() - b) * mask * w)
    stacked = torch.stack(deltas)
    if consensus:
        total = stacked.sum(0) if consensus == "sum" else stacked.sign().sum(0)
        elected = torch.where(total >= 0, 1.0, -1.0).double()
        agree = stacked.sign() == elected
        merged = (stacked * agree).sum(0)
        if normalize:
            w = torch.tensor(weight, dtype=torch.float64).view(-1, *[1] * base.dim())
            divisor = (w * agree).sum(0)
            merged = merged / torch.where(divisor == 0, 1.0, divisor)
    else:
        merged = stacked.sum(0)
        if normalize:
            merged = merged / sum(weight)
    return (b + scale * merged).to(base.dtype)


@pytest.mark.parametrize("consensus", [None, "sum", "count"])
@pytest.mark.parametrize("normalize", [False, True])
def test_merge_several_fine_tunes_matches_reference(consensus, normalize):
    base, ft_a = pair((40, 50), torch.float32, seed=8)
    _, ft_b = pair((40, 50), torch.float32, seed=9)
    ft_b = base + (ft_b - pair((40, 50), torch.float32, seed=9)[0])
    kwargs = dict(sparsity=[0.8, 0.6], weight=[1.0, 0.5], normalize=normalize, scale=0.9)
    out = merge_task_vectors(base, [ft_a, ft_b], consensus=consensus, **kwargs)
    expected = reference_merge(
        base, [ft_a, ft_b], kwargs["sparsity"], kwargs["weight"], normalize, 0.9, consensus
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_rescale_options_preserve_norms():
    base, ft = pair((60, 60), torch.float32, seed=10)
    change = ft - base
    for rescale, order in (("l1", 1), ("l2", 2)):
        out = merge_task_vectors(base, [ft], sparsity=[0.9], weight=[1.0], rescale=rescale)
        kept = out - base
        ratio = torch.linalg.vector_norm(kept, ord=order) / torch.linalg.vector_norm(
            change, ord=order
        )
        assert abs(float(ratio) - 1) < 1e-4
    out = merge_task_vectors(base, [ft], sparsity=[0.75], weight=[1.0], rescale="density")
    mask = prune_mask(base, ft, 0.75)
    torch.testing.assert_close((out - base)[mask], 4 * change[mask], rtol=1e-4, atol=1e-6)


def _stacked_reference(base, finetuned, sparsity, weight, score, rescale, normalize, consensus,
                       generators):
    """The multi-model merge written plainly: a list of float32 deltas, stacked."""
    deltas = []
    for model, s, w, g in zip(finetuned, sparsity, weight, generators):
        mask = kernel.prune_mask(base, model, s, score, g)
        change = model.to(torch.float32) - base.to(torch.float32)
        deltas.append(change * mask * (kernel.rescale_factor(change, mask, rescale, s) * w))
    stacked = torch.stack(deltas)
    weights = torch.tensor(weight, dtype=torch.float32)
    if consensus is None:
        merged = deltas[0].clone()
        for extra in deltas[1:]:
            merged.add_(extra)
        if normalize and weights.sum().abs() > 1e-8:
            merged.div_(weights.sum())
    else:
        signs = stacked.sign()
        total = stacked.sum(dim=0) if consensus == "sum" else signs.sum(dim=0)
        agree = signs == torch.where(total >= 0, 1.0, -1.0)
        merged = (stacked * agree).sum(dim=0)
        if normalize:
            divisor = (weights.view(-1, *([1] * base.dim())) * agree).sum(dim=0)
            divisor[divisor == 0] = 1
            merged.div_(divisor)
    return merged.add_(base).to(base.dtype)


@pytest.mark.parametrize("models", [2, 3, 8])
@pytest.mark.parametrize("consensus", [None, "sum", "count"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("merge_slice", [1 << 20, 1000])  # one slice; many, the last short
def test_several_fine_tunes_match_the_plain_stacked_merge_bit_for_bit(models, consensus,
                                                                      normalize, merge_slice,
                                                                      monkeypatch):
    monkeypatch.setattr(kernel, "_MERGE_SLICE", merge_slice)
    g = torch.Generator().manual_seed(models)
    base = (torch.randn(130, 257, generator=g) * 0.02).to(torch.bfloat16)
    finetuned = [(base.float() + torch.randn(130, 257, generator=g) * 0.003).to(torch.bfloat16)
                 for _ in range(models)]
    options = dict(sparsity=[0.5 + 0.05 * i for i in range(models)],
                   weight=[0.3 + 0.37 * i for i in range(models)], score="fapm",
                   rescale="l1", normalize=normalize, consensus=consensus)
    ours = kernel.merge_task_vectors(base, finetuned, **options)
    expected = _stacked_reference(base, finetuned, generators=[None] * models, **options)
    assert torch.equal(ours, expected)
