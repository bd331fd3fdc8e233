"""Stage 2, fine-tune: full-parameter SFT (every weight, AdamW) of the pre-trained model.

The stage is built to be extended. :class:`TrainingOptions` holds every setting (it is
hashed, so a changed option reruns the stage), and *how* one optimisation step is taken is a
:class:`StepStrategy`, looked up by ``TrainingOptions.strategy`` in :data:`STRATEGIES`.
A new training method is a subclass registered under a new name, for example:

- SAM overrides :meth:`StepStrategy.step` (two forward/backward passes per step);
- an importance-weighted drift regularizer overrides :meth:`StepStrategy.prepare` (estimate
  importances, keep a copy of the pre-trained weights) and :meth:`StepStrategy.penalty`
  (``sum_i F_i (w_i - w_i^pre)^2``), which :meth:`StepStrategy.loss` adds to the task loss.

Strategy-specific settings go in ``TrainingOptions.strategy_args``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Type

import torch


@dataclass(frozen=True)
class TrainingOptions:
    """Settings of the SFT stage. Defaults are the full study's (see docs/study/README.md)."""

    learning_rate: float = 5e-4
    epochs: int = 3
    batch_size: int = 8
    max_length: int = 96
    weight_decay: float = 0.0
    warmup_steps: int = 2
    grad_clip: float = 1.0
    seed: int = 0
    # Standard SFT: the loss covers the answer tokens only.
    loss_on_prompt: bool = False
    strategy: str = "standard"
    strategy_args: Dict[str, Any] = field(default_factory=dict)


class StepStrategy:
    """One optimisation step: the standard SFT step (loss, backward, clip, AdamW step)."""

    def __init__(self, options: TrainingOptions):
        self.options = options

    def prepare(self, model: torch.nn.Module, batches: List[Dict[str, torch.Tensor]]) -> None:
        """Called once before training (e.g. to estimate weight importances). No-op here."""

    def penalty(self, model: torch.nn.Module) -> Optional[torch.Tensor]:
        """An extra loss term on the weights (e.g. a drift regularizer). None here."""
        return None

    def loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        loss = model(**batch).loss
        extra = self.penalty(model)
        return loss if extra is None else loss + extra

    def step(
        self,
        model: torch.nn.Module,
        batch: Dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
    ) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(model, batch)
        loss.backward()
        if self.options.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.options.grad_clip)
        optimizer.step()
        return float(loss.detach())


STRATEGIES: Dict[str, Type[StepStrategy]] = {"standard": StepStrategy}


def register_strategy(name: str) -> Callable[[Type[StepStrategy]], Type[StepStrategy]]:
    """Class decorator: make a :class:`StepStrategy` subclass selectable by ``name``."""

    def add(cls: Type[StepStrategy]) -> Type[StepStrategy]:
        if name in STRATEGIES and STRATEGIES[name] is not cls:
            raise ValueError(f"training strategy {name!r} is already registered")
        STRATEGIES[name] = cls
        return cls

    return add


def make_batches(rows: List[dict], tokenizer, options: TrainingOptions, rng: random.Random):
    """Shuffle ``{"prompt", "answer"}`` rows into padded batches with SFT label masks."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    batches = []
    for start in range(0, len(order), options.batch_size):
        ids, labels = [], []
        for index in order[start : start + options.batch_size]:
            prompt = tokenizer(rows[index]["prompt"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(rows[index]["answer"], add_special_tokens=False)["input_ids"]
            answer = answer + [eos]
            prompt = prompt[-(options.max_length - len(answer)) :]  # keep the question's end
            ids.append(prompt + answer)
            masked = prompt if options.loss_on_prompt else [-100] * len(prompt)
            labels.append(list(masked) + answer)
        width = max(len(x) for x in ids)
        batch = {
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
        }
        batches.append(batch)
    return batches


def _resident_peak(reset: bool = False) -> Optional[float]:
    """Peak resident memory of this process in GB (Linux); ``reset`` restarts the count."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def finetune(base_dir: Path, train_file: Path, out_dir: Path, options: TrainingOptions) -> dict:
    """Fine-tune every weight of the model in ``base_dir``; save it to ``out_dir``.

    Returns a summary (steps, tokens, wall time, loss curve), also written to ``train.json``.
    """
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if options.strategy not in STRATEGIES:
        raise ValueError(f"unknown training strategy {options.strategy!r}; "
                         f"known: {', '.join(sorted(STRATEGIES))}")
    torch.manual_seed(options.seed)
    rng = random.Random(options.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train()
    rows = [json.loads(line) for line in Path(train_file).read_text().splitlines()]
    epochs = [make_batches(rows, tokenizer, options, rng) for _ in range(options.epochs)]
    total = sum(len(e) for e in epochs)
    _resident_peak(reset=True)
    started = time.time()
    strategy = STRATEGIES[options.strategy](options)
    strategy.prepare(model, epochs[0])
    prepare_s = time.time() - started
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay
    )

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to 10%
        if step < options.warmup_steps:
            return (step + 1) / options.warmup_steps
        progress = (step - options.warmup_steps) / max(1, total - options.warmup_steps)
        return max(0.1, 1.0 - 0.9 * progress)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses, tokens = [], 0
    with tqdm(total=total, desc="fine-tune", unit="step", dynamic_ncols=True) as bar:
        for batches in epochs:
            for batch in batches:
                loss = strategy.step(model, batch, optimizer)
                scheduler.step()
                losses.append(loss)
                tokens += int(batch["attention_mask"].sum())
                bar.set_postfix(loss=f"{loss:.3f}")
                bar.update()
                if not math.isfinite(loss):
                    raise RuntimeError(f"fine-tuning diverged (loss {loss})")
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = {
        "steps": total,
        "examples": len(rows),
        "tokens": tokens,
        "wall_s": round(time.time() - started, 1),
        "strategy": options.strategy,
        "strategy_prepare_s": round(prepare_s, 1),
        "peak_rss_gb": _resident_peak(),
        "first_loss": losses[0],
        "last_loss": sum(losses[-5:]) / len(losses[-5:]),
        "losses": [round(x, 4) for x in losses],
    }
    (Path(out_dir) / "train.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
