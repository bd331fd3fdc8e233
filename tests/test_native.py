"""The fused C pass (fapm_merge/fused.c) against the torch pass it replaces, bit for bit.

Both passes are run on the same slices with the same bracket; every output (kept count,
candidates and their indices, the blended tensor or the kept flags) must be identical, on
inputs that reach every edge of the float32 arithmetic: W_pre == 0 (1 / |b| = inf), subnormal
and huge weights (the score overflows to -inf), unchanged elements, heavy ties, lengths that
are not multiples of the C block or the thread slice.
"""

from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch

from fapm_merge import kernel, native

needs_compiler = pytest.mark.skipif(
    native._compiler() is None, reason="no C compiler: the torch path is the only path"
)


@pytest.fixture
def torch_path(monkeypatch):
    """Switches the fused C pass off (as FAPM_MERGE_NATIVE=0 does) for the duration."""

    def off():
        monkeypatch.setenv("FAPM_MERGE_NATIVE", "0")
        native.library.cache_clear()

    yield off
    monkeypatch.delenv("FAPM_MERGE_NATIVE", raising=False)
    native.library.cache_clear()


def edge_pair(n: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    change = torch.randn(n, generator=g) * 3e-4
    pick = torch.rand(n, generator=g)
    base[pick < 0.01] = 0  # W_pre == 0: the factor is -inf, clamped
    change[pick < 0.001] = 2.0  # ... and the score, lowest float32 times 2, overflows to -inf
    change[(pick > 0.2) & (pick < 0.3)] = 0  # unchanged
    tiny = torch.finfo(torch.float32).tiny
    base[(pick > 0.5) & (pick < 0.501)] = tiny / 8  # subnormal W_pre: 1 / |b| = inf
    base[(pick > 0.6) & (pick < 0.6005)] = 4.0  # outliers, as in real checkpoints
    change[(pick > 0.6) & (pick < 0.6005)] = 0.5
    ties = (pick > 0.7) & (pick < 0.75)  # a block of exactly equal scores
    base[ties], change[ties] = 0.015625, 0.0009765625
    return base.to(dtype), (base + change).to(dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({2: torch.int16, 4: torch.int32}[tensor.element_size()])


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [3 * 2048 + 7, 2 * native.SLICE + 12_345])
def test_fused_c_pass_is_bit_identical_to_the_torch_pass(dtype, n):
    base, ft = edge_pair(n, dtype, seed=n % 97)
    scorer = kernel._FapmScorer(base, ft)
    assert 0 < scorer.mean < 0.02
    scores = kernel.forgetting_score(base, ft)
    positive = scores[scores > 0]
    for q_lo, q_hi in [(0.85, 0.9), (0.5, 0.5), (0.0, 0.999)]:  # incl. lo == hi: one value
        lo = torch.quantile(positive[:1_000_000].double(), q_lo).float().item()
        hi = torch.quantile(positive[:1_000_000].double(), q_hi).float().item()
        for mode in ("out", "keep"):
            outs, keeps = [torch.empty_like(base) for _ in range(2)], [
                torch.empty(n, dtype=torch.bool) for _ in range(2)]
            expected = kernel._fapm_scan(scorer, lo, hi, outs[0] if mode == "out" else None,
                                         keeps[0] if mode == "keep" else None)
            got = native.fapm_scan(scorer.base, scorer.finetuned, scorer.mean, lo, hi,
                                   out=outs[1] if mode == "out" else None,
                                   keep=keeps[1] if mode == "keep" else None, threads=3)
            assert got[3], "every |dW| is finite here"
            assert got[0] == expected[0]
            assert torch.equal(bits(got[1]), bits(expected[1]))
            assert torch.equal(got[2], expected[2])
            if mode == "out":
                assert torch.equal(bits(outs[1]), bits(outs[0]))
            else:
                assert torch.equal(keeps[1], keeps[0])


@needs_compiler
def test_candidates_are_the_scores_inside_the_bracket_in_index_order():
    base, ft = edge_pair(50_000, torch.bfloat16, seed=4)
    scorer = kernel._FapmScorer(base, ft)
    scores = kernel.forgetting_score(base, ft)
    positive = scores[scores > 0]  # where raw and final scores agree (lo > 0 in the kernel)
    lo, hi = positive.quantile(0.8).item(), positive.quantile(0.85).item()
    above, values, indices, finite = native.fapm_scan(
        scorer.base, scorer.finetuned, scorer.mean, lo, hi, keep=torch.empty(50_000, dtype=torch.bool))
    inside = ((scores >= lo) & (scores <= hi)).nonzero().squeeze(1)
    assert finite and above == int((scores > hi).sum())
    assert torch.equal(indices, inside) and torch.equal(values, scores[inside])


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prune_results_do_not_depend_on_the_path_or_the_threads(dtype, torch_path, monkeypatch):
    base, ft = edge_pair(1_500_001, dtype, seed=11)
    calls = []
    real_scan = native.fapm_scan
    monkeypatch.setattr(native, "fapm_scan",
                        lambda *a, **kw: calls.append(1) or real_scan(*a, **kw))
    threads = torch.get_num_threads()
    fast = {}
    for count in (1, 3):
        torch.set_num_threads(count)
        try:
            fast[count] = (kernel.fapm_prune(base, ft, 0.9), kernel.prune_mask(base, ft, 0.97))
        finally:
            torch.set_num_threads(threads)
    assert len(calls) == 4, "the C pass answered every call"
    torch_path()
    slow = (kernel.fapm_prune(base, ft, 0.9), kernel.prune_mask(base, ft, 0.97))
    assert len(calls) == 4, "FAPM_MERGE_NATIVE=0 turns it off"
    for got in fast.values():
        assert torch.equal(bits(got[0]), bits(slow[0])) and torch.equal(got[1], slow[1])
    assert int(slow[1].sum()) == kernel.kept_count(base.numel(), 0.97)


@needs_compiler
def test_non_finite_change_is_refused_by_the_c_pass():
    base, ft = edge_pair(200_000, torch.bfloat16, seed=1)
    ft[123_456] = math.inf
    scorer = kernel._FapmScorer(base, torch.zeros_like(ft))  # the mean is of W_pre only
    assert not native.fapm_scan(scorer.base, ft, scorer.mean, 1e-6, 1e-5,
                                keep=torch.empty(200_000, dtype=torch.bool))[3]
    with pytest.raises(kernel.NonFiniteWeightsError):
        kernel.fapm_prune(base, ft, 0.9)


@needs_compiler
def test_the_library_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FAPM_MERGE_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = list((tmp_path / "native").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no partial file left behind
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        assert native.library() is not None
        assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    finally:
        native.library.cache_clear()


def test_without_a_working_compiler_fapm_takes_the_torch_path(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FAPM_MERGE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "false")
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="fapm_merge.native"):
            assert native.library() is None
        assert "torch path" in caplog.text and "FAPM_MERGE_NATIVE=0" in caplog.text
        assert not list((tmp_path / "native").iterdir())  # the failed build left nothing
        base, ft = edge_pair(300_000, torch.bfloat16, seed=2)
        scores = kernel.forgetting_score(base, ft)
        k = kernel.kept_count(base.numel(), 0.9)
        order = torch.sort(scores, descending=True, stable=True).indices[:k]
        expected = torch.zeros(base.numel(), dtype=torch.bool)
        expected[order] = True
        assert torch.equal(kernel.prune_mask(base, ft, 0.9), expected)
    finally:
        native.library.cache_clear()
