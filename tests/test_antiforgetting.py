"""Training-time anti-forgetting strategies: SAM and the importance-weighted regularizer."""

from __future__ import annotations

import pytest
import torch

from fapm_study.antiforgetting import (
    ImportanceRegularizedStep,
    SharpnessAwareStep,
    drift_penalty,
    synaptic_importance,
)
from fapm_study.finetune import STRATEGIES, TrainingOptions


def tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=16)
    return LlamaForCausalLM(config)


def batch(seed):
    ids = torch.randint(32, (4, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def test_strategies_are_registered():
    assert STRATEGIES["sam"] is SharpnessAwareStep
    assert STRATEGIES["importance_reg"] is ImportanceRegularizedStep


def test_sam_takes_the_gradient_at_the_perturbed_weights_and_steps_from_the_original():
    model = tiny_model()
    options = TrainingOptions(strategy="sam", strategy_args={"rho": 0.1}, grad_clip=0.0)
    strategy = SharpnessAwareStep(options)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    real_loss = strategy.loss

    def spy(m, b):
        seen.append({n: p.detach().clone() for n, p in m.named_parameters()})
        return real_loss(m, b)

    strategy.loss = spy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: isolate the perturbation
    strategy.step(model, batch(0), optimizer)
    assert len(seen) == 2
    first, second = seen
    moved = torch.sqrt(sum(((second[n] - first[n]) ** 2).sum() for n in first))
    assert torch.isclose(moved, torch.tensor(0.1), rtol=1e-3), "ascent step is not rho long"
    for name, p in model.named_parameters():  # restored before the optimizer step
        assert torch.equal(p.detach(), original[name])


def test_sam_step_differs_from_plain_step():
    plain, sam = tiny_model(), tiny_model()
    b = batch(1)
    for model, name in ((plain, "standard"), (sam, "sam")):
        options = TrainingOptions(strategy=name, strategy_args={"rho": 0.5}, grad_clip=0.0)
        STRATEGIES[name](options).step(model, b, torch.optim.SGD(model.parameters(), lr=0.1))
    w1 = plain.model.layers[0].mlp.up_proj.weight
    w2 = sam.model.layers[0].mlp.up_proj.weight
    assert not torch.allclose(w1, w2)


def test_importance_is_non_negative_finite_and_restores_the_weights():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    importance = synaptic_importance(model, [batch(i) for i in range(4)], lr=1e-2)
    assert set(importance) == set(before)
    total = 0.0
    for name, omega in importance.items():
        assert bool(torch.isfinite(omega).all()) and bool((omega >= 0).all()), name
        total += float(omega.sum())
        assert torch.equal(dict(model.named_parameters())[name].detach(), before[name])
    assert total > 0


def test_regularizer_is_zero_at_the_pretrained_weights_and_grows_with_drift():
    model = tiny_model()
    options = TrainingOptions(strategy="importance_reg", strategy_args={"lam": 2.0})
    strategy = ImportanceRegularizedStep(options)
    strategy.general_batches = [batch(i) for i in range(3)]
    strategy.prepare(model, [])
    assert float(strategy.penalty(model).detach()) == 0.0
    values = []
    for size in (1e-3, 1e-2, 1e-1):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(strategy.anchor[name] + size)
        values.append(float(strategy.penalty(model).detach()))
    assert 0 < values[0] < values[1] < values[2]
    assert values[2] / values[1] == pytest.approx(100, rel=1e-3)  # quadratic in the drift


def test_regularizer_samples_its_own_general_data_reproducibly():
    options = TrainingOptions(strategy="importance_reg",
                              strategy_args={"importance_steps": 2, "sample_length": 6})
    runs = []
    for _ in range(2):
        strategy = ImportanceRegularizedStep(options)
        strategy.prepare(tiny_model(), [])
        runs.append(strategy)
    first, second = (r.general_batches for r in runs)
    assert len(first) == 2 and first[0]["input_ids"].shape == (4, 6)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))
    for name, weight in runs[0].weights.items():
        assert torch.equal(weight, runs[1].weights[name])


def test_drift_penalty_matches_direct_sum():
    model = tiny_model()
    anchor = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    weights = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    expected = sum(0.5 * (p.detach() ** 2).sum() for p in model.parameters())
    assert torch.isclose(drift_penalty(model, anchor, weights).detach(), expected)
