"""The fused, chunked FAPM path (tensors above the direct-selection size) against the plain
definition: exact scores from ``forgetting_score`` and a stable descending full sort."""

from __future__ import annotations

import math

import pytest
import torch

from fapm_merge import kernel


def stable_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    flat = scores.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(scores.shape)


def reference(base: torch.Tensor, ft: torch.Tensor, sparsity: float) -> torch.Tensor:
    scores = kernel.forgetting_score(base, ft)
    k = kernel.kept_count(base.numel(), sparsity)
    changed = int((scores != -math.inf).sum())
    return stable_mask(scores, min(k, changed))


def pair(shape, dtype, seed, unchanged=0.2, zero_base=0.01):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    base[torch.rand(shape, generator=g) < zero_base] = 0
    delta = torch.randn(shape, generator=g) * 2e-4
    delta[torch.rand(shape, generator=g) < unchanged] = 0
    return base.to(dtype), (base + delta).to(dtype)


@pytest.fixture(params=["c", "torch"])
def fused_pass(request, monkeypatch):
    """Runs a test with the fused pass in C (where a compiler is at hand) and in torch."""
    if request.param == "torch":
        monkeypatch.setenv("FAPM_MERGE_NATIVE", "0")
    kernel.native.library.cache_clear()
    yield request.param
    monkeypatch.delenv("FAPM_MERGE_NATIVE", raising=False)
    kernel.native.library.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99, 0.99999])
def test_fused_path_matches_definition(dtype, sparsity, fused_pass):
    base, ft = pair((700, 1100), dtype, seed=int(sparsity * 1000))
    assert base.numel() > kernel._DIRECT_SELECTION and base.numel() > kernel._CHUNK
    expected = reference(base, ft, sparsity)
    assert torch.equal(kernel.prune_mask(base, ft, sparsity), expected)
    out = kernel.fapm_prune(base, ft, sparsity)
    assert out.dtype == dtype
    assert torch.equal(out, torch.where(expected, ft, base))


def test_fused_path_with_heavy_ties_and_non_contiguous_input(fused_pass):
    g = torch.Generator().manual_seed(3)
    base = (torch.randint(1, 4, (900, 800), generator=g).float() * 0.01).bfloat16()
    ft = (base.float() + torch.randint(-2, 3, (900, 800), generator=g).float() * 1e-3).bfloat16()
    base, ft = base.t(), ft.t()  # non-contiguous views
    for sparsity in (0.6, 0.9, 0.97):
        expected = reference(base, ft, sparsity)
        assert torch.equal(kernel.prune_mask(base, ft, sparsity), expected)
        assert torch.equal(kernel.fapm_prune(base, ft, sparsity), torch.where(expected, ft, base))


def test_fused_path_survives_a_missing_bracket(monkeypatch):
    # A sample of one repeated element gives a useless bracket: the general path must answer.
    base, ft = pair((600, 500), torch.bfloat16, seed=5)
    real_randint = torch.randint
    monkeypatch.setattr(
        kernel.torch, "randint", lambda n, size, **kw: real_randint(1, size, **kw) * 0
    )
    for sparsity in (0.5, 0.9, 0.999):
        expected = reference(base, ft, sparsity)
        assert torch.equal(kernel.prune_mask(base, ft, sparsity), expected)
        assert torch.equal(kernel.fapm_prune(base, ft, sparsity), torch.where(expected, ft, base))


def test_fused_path_rejects_non_finite_weights(fused_pass):
    for which in ("base", "ft"):
        base, ft = pair((600, 500), torch.bfloat16, seed=7)
        (base if which == "base" else ft)[123, 45] = float("nan")
        with pytest.raises(kernel.NonFiniteWeightsError):
            kernel.fapm_prune(base, ft, 0.9)
        with pytest.raises(kernel.NonFiniteWeightsError):
            kernel.prune_mask(base, ft, 0.9)


def test_keep_top_k_chunked_with_infinities():
    g = torch.Generator().manual_seed(9)
    scores = torch.randn(1_000_000, generator=g).to(torch.bfloat16).float()  # many ties
    scores[::997] = math.inf
    scores[1::5] = -math.inf
    for k in (1, 1003, 100_000, 500_000, 799_999, 999_999):
        assert torch.equal(kernel.keep_top_k(scores, k), stable_mask(scores, k))


def test_the_kernel_runs_at_the_users_thread_count(tmp_path, monkeypatch):
    """mergekit's --num-threads reaches the kernel's passes, and the kernel itself never
    changes torch's (process-global) thread count."""
    import yaml
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    import fapm_merge
    from conftest import fine_tune_of, save_model

    seen, fused = [], []
    passes, c_pass = kernel._for_slices, kernel.native.fapm_scan

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return passes(*args, **kwargs)

    def c_spy(*args, **kwargs):  # the C pass runs on torch's thread count unless told
        fused.append(kwargs.get("threads") or torch.get_num_threads())
        return c_pass(*args, **kwargs)

    monkeypatch.setattr(kernel, "_for_slices", spy)
    monkeypatch.setattr(kernel.native, "fapm_scan", c_spy)
    threads = torch.get_num_threads()
    base, ft = pair((600, 500), torch.bfloat16, seed=2)
    kernel.fapm_prune(base, ft, 0.9)
    kernel.forgetting_score(base, ft)
    assert seen and set(seen) == {threads} and torch.get_num_threads() == threads
    c_built = kernel.native.library() is not None  # else the torch path runs the whole pass
    assert set(fused) == ({threads} if c_built else set())

    fapm_merge.register()
    base_dir = save_model(tmp_path / "base", intermediate_size=2112)  # fused-path tensors
    ft_dir = fine_tune_of(base_dir, tmp_path / "ft", seed=1)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "fapm", "base_model": str(base_dir),
                                      "models": [{"model": str(ft_dir)}]}))
    wanted = 1 if threads > 1 else 2
    seen.clear()
    fused.clear()
    try:
        done = CliRunner().invoke(mergekit_yaml, [str(recipe), str(tmp_path / "out"),
                                                  "--num-threads", str(wanted), "--quiet"])
        assert done.exit_code == 0, done.output
        assert seen and set(seen) == {wanted}
        assert set(fused) == ({wanted} if c_built else set())
    finally:
        torch.set_num_threads(threads)  # mergekit's own setting outlives its run


def test_busy_cores_advice_names_the_fix_only_when_threads_share_busy_cores():
    from fapm_merge.methods import busy_cores_advice

    assert busy_cores_advice(load=0.3, cores=2, threads=2) is None  # quiet machine
    assert busy_cores_advice(load=7.5, cores=2, threads=1) is None  # already one thread
    advice = busy_cores_advice(load=3.8, cores=2, threads=2)
    assert "--num-threads 1" in advice and "3.8" in advice and "2 cores" in advice


def test_a_merge_on_busy_cores_warns_once(tmp_path, monkeypatch):
    """The advice reaches a real mergekit-yaml run on FAPM's torch pass, once per process,
    and changes nothing; a merge on the C pass (not slowed by busy cores) gets none."""
    import warnings

    import yaml
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    import fapm_merge
    from conftest import fine_tune_of, save_model
    from fapm_merge import methods

    fapm_merge.register()
    base_dir = save_model(tmp_path / "base")
    ft_dir = fine_tune_of(base_dir, tmp_path / "ft", seed=1)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "fapm", "base_model": str(base_dir),
                                      "dtype": "bfloat16", "models": [{"model": str(ft_dir)}]}))
    monkeypatch.setattr(methods.os, "getloadavg", lambda: (64.0, 64.0, 64.0))

    def advice_of_a_merge(out: str) -> list:
        monkeypatch.setattr(methods, "_checked_cores", False)
        kernel.native.library.cache_clear()
        threads = torch.get_num_threads()
        torch.set_num_threads(2)  # not --num-threads: interop threads can be set once a process
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                done = CliRunner().invoke(mergekit_yaml, [str(recipe), str(tmp_path / out),
                                                          "--quiet"])
            assert done.exit_code == 0, done.output
            assert torch.get_num_threads() == 2  # the advice is given, nothing is changed
        finally:
            torch.set_num_threads(threads)
            kernel.native.library.cache_clear()
        return [w for w in caught if "--num-threads 1" in str(w.message)]

    if kernel.native.library() is not None:
        assert advice_of_a_merge("c") == []
    monkeypatch.setenv("FAPM_MERGE_NATIVE", "0")
    advice = advice_of_a_merge("torch")
    assert len(advice) == 1 and advice[0].category is RuntimeWarning
