"""Settings of the forgetting study: the full run and the quick (CI) run.

All counts and sweep points live here, so the README's numbers can be checked against one
place. Every stage hashes the part of these settings it depends on (see
:mod:`fapm_study.stages`), so editing a value reruns exactly what it affects.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

from fapm_study.finetune import TrainingOptions


@dataclass(frozen=True)
class ItemCounts:
    """How many items each split has (the general tasks are capped at ``general`` each)."""

    train: int = 128
    test: int = 40
    # per skill (a skill whose own task has fewer is filled up from prepare.EXTRA_SOURCES)
    general: int = 150
    # the shortest HumanEval problems: their prompts are long, so this bounds evaluation cost
    # (150 would take 3.5x the tokens of the other three skills together, while the standard
    # error of forgetting is set by knowledge's 70 items: 60 vs 150 changes it by < 0.005)
    code: int = 60
    perplexity: int = 6
    # QASC items whose answer has more words are left out
    max_answer_words: int = 3


@dataclass(frozen=True)
class Sweeps:
    """The knob of every post-hoc method and the points it is swept over."""

    sparsities: Tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)
    # score-based pruning methods swept over ``sparsities`` (DARE is always added)
    pruning_methods: Tuple[str, ...] = ("fapm", "magnitude", "relative")
    dare_seeds: Tuple[int, ...] = (0, 1, 2)
    # WiSE-FT: W = (1 - a) W_pre + a W_ft (mergekit ``linear``).
    wise_alphas: Tuple[float, ...] = (0.25, 0.5, 0.75)
    # LiNeS-style: task_arithmetic with weight rising from ``low`` (first layer) to 1 (last).
    lines_lows: Tuple[float, ...] = (0.0, 0.25, 0.5)


@dataclass(frozen=True)
class TrainingMethods:
    """Training-time anti-forgetting methods (fapm_study/antiforgetting.py).

    Each is a fine-tune of its own with the same data, steps and optimizer as full SFT, then
    evaluated alone and with FAPM at ``fapm_sparsities``. The knobs are not tuned.
    """

    sam_rho: float = 0.05
    # weight of the mean importance-weighted squared drift (about 1e-5 after full SFT here)
    regularizer_lam: float = 1e5
    importance_steps: int = 16
    fapm_sparsities: Tuple[float, ...] = (0.5, 0.9, 0.95)
    # Training seeds (data order) of every fine-tune compared here, full SFT included: the
    # spread between methods is read against the spread between seeds of one method.
    seeds: Tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class SecondTask:
    """A task the fine-tune has to learn from scratch, studied post hoc (fapm_study/pilot.py).

    BIG-bench ``word_sorting`` with a bare answer: the pre-trained model scores 0, the
    fine-tune needs hundreds of steps, and WiSE-FT at a small alpha loses most of it (unlike
    QASC). ``test`` items are held out, the first ``train`` of the rest trained on.
    """

    name: str = "word_sorting"
    template: str = "Sort these words alphabetically: {input}\nAnswer:"
    max_tokens: int = 64
    test: int = 200
    train: int = 1500
    training: TrainingOptions = field(default_factory=lambda: replace(
        TrainingOptions(), epochs=3, learning_rate=5e-4, max_length=128))
    # ``fapm-merge sweep`` options: the task vector carries a task learned from scratch, so
    # the sparsities reach lower than the QASC study's
    sweep: str = ("--sparsity 0.3,0.5,0.7,0.9 --score fapm,magnitude --dare-seeds 0 "
                  "--wise 0.25,0.5,0.75 --lines 0 --spectral --lowrank 16,64")

    @property
    def folder(self) -> str:
        """Where the study publishes this task's report, under its own (``word-sorting``)."""
        return self.name.replace("_", "-")


@dataclass(frozen=True)
class StudyConfig:
    quick: bool = False
    seed: int = 0
    counts: ItemCounts = field(default_factory=ItemCounts)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    sweeps: Sweeps = field(default_factory=Sweeps)
    training_methods: TrainingMethods = field(default_factory=TrainingMethods)
    eval_batch_size: int = 16
    # run after the QASC study by ``fapm-merge study`` (None: QASC only)
    second_task: Optional[SecondTask] = field(default_factory=SecondTask)


# The general suite of the first committed run (docs/study/results.md): 40-50 items per skill,
# each skill's own task only. ``fapm-merge study --suite small`` reruns it item for item.
SMALL_SUITE = ItemCounts(general=50, code=40)
SUITES = {"full": ItemCounts(), "small": SMALL_SUITE}


def full_config(suite: str = "full") -> StudyConfig:
    """SmolLM2-135M-Instruct, full-parameter SFT on QASC with bare answers; ``suite`` names
    the general suite's size (:data:`SUITES`)."""
    return StudyConfig(counts=SUITES[suite])


def quick_config() -> StudyConfig:
    """A tiny local Llama, a handful of items and sweep points: checks the pipeline only."""
    return StudyConfig(
        quick=True,
        counts=ItemCounts(train=32, test=8, general=8, code=8, perplexity=4),
        training=replace(TrainingOptions(), epochs=2, batch_size=8, max_length=64,
                         learning_rate=3e-3),
        sweeps=Sweeps(sparsities=(0.9,), pruning_methods=("fapm", "magnitude"),
                      dare_seeds=(0, 1), wise_alphas=(0.5,),
                      lines_lows=(0.0,)),
        training_methods=TrainingMethods(importance_steps=2, fapm_sparsities=(0.9,),
                                         seeds=(0, 1)),
        eval_batch_size=8,
        second_task=SecondTask(test=8, train=32, training=replace(
            TrainingOptions(), epochs=2, batch_size=8, max_length=64, learning_rate=3e-3),
            sweep="--sparsity 0.9 --score fapm --wise 0.5 --lowrank 4"),
    )
