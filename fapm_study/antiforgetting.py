"""Training-time anti-forgetting methods, as step strategies of the study's SFT stage.

- ``sam``: sharpness-aware minimization for fine-tuning (Foret et al. 2021; applied to LLM
  fine-tuning against forgetting by Li et al. 2024, "Revisiting Catastrophic Forgetting in
  Large Language Model Tuning", arXiv 2406.04836). Each step takes the gradient at
  ``w + rho * g / ||g||`` and applies it at ``w``. Knob: ``rho``.
- ``importance_reg``: an element-wise importance of each weight for general knowledge in the
  style of Synaptic Intelligence (Zenke et al. 2017), and the fine-tuning loss
  ``CE + lam * sum_l c_l * sum_{i in l} Omega_i (w_i - w_i^pre)^2`` with per-layer
  coefficients ``c_l``, after Song et al. 2025, "How to Alleviate Catastrophic Forgetting in
  LLMs Finetuning? Hierarchical Layer-Wise and Element-Wise Regularization" (arXiv 2501.13669).
  Knobs: ``lam``, ``importance_steps``, ``importance_lr``, ``damping``.

Where the second paper's exact formulas are not known to us, these are the choices made:

- importance: ``omega_i = sum_t max(0, -g_i(t) * dw_i(t))`` along ``importance_steps`` plain SGD
  steps on general data from the pre-trained weights (text sampled from the pre-trained model
  itself unless general batches are given: no dataset that could overlap the evaluation) (each step's first-order contribution to
  the loss decrease, negative contributions dropped so importance is non-negative), then
  ``Omega_i = omega_i / (Delta_i^2 + damping)`` with ``Delta_i`` the total change of that run;
  the run's weights are discarded;
- layer-wise balance: importances are divided by their mean within each weight tensor (a
  tensor's element-wise pattern is kept, its overall scale is set by ``c_l``), and
  ``c_l = 1 / N`` (N parameters in the model): every tensor gets the same weight per parameter,
  so no layer dominates because its raw importances happen to be large, and the penalty is a
  mean squared drift whose scale does not depend on the model's size.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from fapm_study.finetune import StepStrategy, register_strategy


@register_strategy("sam")
class SharpnessAwareStep(StepStrategy):
    """SAM: ascend to ``w + rho * g/||g||``, take the gradient there, step from ``w``."""

    def step(self, model, batch, optimizer) -> float:
        rho = float(self.options.strategy_args.get("rho", 0.05))
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(model, batch)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
        )
        scale = rho / (float(norm) + 1e-12)
        originals = []
        with torch.no_grad():
            for p in params:
                originals.append(p.detach().clone())  # restore exactly, not by subtracting
                p.add_(p.grad, alpha=scale)
        optimizer.zero_grad(set_to_none=True)
        self.loss(model, batch).backward()  # the sharpness-aware gradient
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)
        del originals
        if self.options.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.options.grad_clip)
        optimizer.step()
        return float(loss.detach())


def synaptic_importance(
    model: torch.nn.Module,
    batches: List[Dict[str, torch.Tensor]],
    lr: float = 1e-4,
    damping: float = 1e-3,
) -> Dict[str, torch.Tensor]:
    """Synaptic-Intelligence importance of every parameter for the data in ``batches``.

    Runs plain SGD on ``batches`` from the current weights, accumulating each step's
    first-order loss decrease ``max(0, -g * dw)`` per element, divides by the squared total
    change plus ``damping``, and restores the weights. Returns float32 tensors, non-negative
    and finite, keyed by parameter name.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    start = {name: p.detach().clone() for name, p in params.items()}
    omega = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.train()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        with torch.no_grad():
            for name, p in params.items():
                if p.grad is None:
                    continue
                step = -lr * p.grad
                omega[name].add_((-p.grad * step).clamp_min_(0))
                p.add_(step)
    importance = {}
    with torch.no_grad():
        for name, p in params.items():
            total = (p - start[name]).float()
            importance[name] = omega[name] / (total * total + damping)
            p.copy_(start[name])
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return importance


@register_strategy("importance_reg")
class ImportanceRegularizedStep(StepStrategy):
    """CE + importance-weighted squared drift from the pre-trained weights.

    The general data is ``general_batches`` when set; otherwise text the pre-trained model
    samples itself (:func:`self_generated_batches`): what it "knows", with no dataset that
    could overlap the evaluation items.
    """

    general_batches: Optional[List[Dict[str, torch.Tensor]]] = None

    def prepare(self, model, batches) -> None:
        args = self.options.strategy_args
        steps = int(args.get("importance_steps", 16))
        if not self.general_batches:
            self.general_batches = self_generated_batches(
                model, steps, int(args.get("sample_length", 48)), self.options.seed
            )
        raw = synaptic_importance(
            model,
            self.general_batches[:steps],
            lr=float(args.get("importance_lr", 1e-4)),
            damping=float(args.get("damping", 1e-3)),
        )
        total = sum(t.numel() for t in raw.values())
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.weights = {}
        for name, omega in raw.items():
            mean = float(omega.mean())
            shape = omega / mean if mean > 0 else torch.ones_like(omega)
            self.weights[name] = shape / total  # c_l = 1 / N
        self.lam = float(args.get("lam", 1.0))

    def penalty(self, model) -> Optional[torch.Tensor]:
        return self.lam * drift_penalty(model, self.anchor, self.weights)


@torch.no_grad()
def self_generated_batches(
    model: torch.nn.Module, count: int, length: int, seed: int, batch_size: int = 4
) -> List[Dict[str, torch.Tensor]]:
    """``count`` batches of text sampled from the model itself, from its BOS token.

    Sampling (temperature 1, fixed seed) rather than greedy decoding, so the batches cover
    what the model assigns probability to, not one repeated string.
    """
    config = model.config
    start = config.bos_token_id if config.bos_token_id is not None else 0
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    batches = []
    for _ in range(count):
        ids = torch.full((batch_size, 1), start, dtype=torch.long)
        for _ in range(length - 1):
            logits = model(input_ids=ids).logits[:, -1, :].float()
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            ids = torch.cat([ids, token], dim=1)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    model.train(was_training)
    return batches


def drift_penalty(
    model: torch.nn.Module,
    anchor: Dict[str, torch.Tensor],
    weights: Dict[str, torch.Tensor],
) -> torch.Tensor:
    """``sum_i weights_i * (w_i - anchor_i)^2`` over the named parameters in ``weights``."""
    terms = [
        (weights[name] * (p - anchor[name]).pow(2)).sum()
        for name, p in model.named_parameters()
        if name in weights
    ]
    return torch.stack(terms).sum()
