"""Stage 3, post-hoc variants: the study's names for them, and how ``fapm-merge sweep`` builds each.

Every merged variant is a variant of ``fapm-merge sweep`` on the study's recipe of its
fine-tune (:func:`pair_recipe`): the pruning methods are sweep points (``score``), DARE, WiSE-FT
(mergekit ``linear``) and the LiNeS-style scaling (mergekit ``task_arithmetic`` with a layer
gradient on ``weight``) are the sweep's baselines. So the study and the product build and
score variants by one code path, and every number can be rebuilt by hand with
``mergekit-yaml recipe.yml OUT`` (docs/study/recipes/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

# method -> (pretty name, knob name, colour) for tables and plots
METHODS = {
    "fapm": ("FAPM", "sparsity", "tab:red"),
    "magnitude": ("Magnitude of dW", "sparsity", "tab:blue"),
    "relative": ("Relative only", "sparsity", "tab:purple"),
    "dare": ("DARE (random + 1/(1-s))", "sparsity", "tab:green"),
    "wise": ("WiSE-FT (linear)", "alpha", "tab:orange"),
    "lines": ("LiNeS-style (layer gradient)", "first-layer weight", "tab:brown"),
    # training-time comparison (every fine-tune over training seeds): the fine-tune itself,
    # and FAPM applied to it
    "sft": ("Full SFT", "", "dimgray"),
    "sft_fapm": ("Full SFT, then FAPM", "sparsity", "darkred"),
    "sam": ("SFT + SAM", "rho", "tab:cyan"),
    "sam_fapm": ("SFT + SAM, then FAPM", "sparsity", "tab:pink"),
    "reg": ("SFT + importance reg.", "lambda", "tab:olive"),
    "reg_fapm": ("SFT + importance reg., then FAPM", "sparsity", "tab:gray"),
}
# which fine-tune (models/<name>) a training-time variant comes from
TRAINED = {"sft": "full_sft", "sft_fapm": "full_sft", "sam": "sft_sam", "sam_fapm": "sft_sam",
           "reg": "sft_reg", "reg_fapm": "sft_reg"}
# the variants that are a fine-tune itself, not a merge
FINETUNES = ("sft", "sam", "reg")


def finetune_name(source: str, seed: int, main_seed: int = 0) -> str:
    """Folder name of one fine-tune: ``full_sft`` for the main seed, ``full_sft-seed1`` else."""
    return source if seed == main_seed else f"{source}-seed{seed}"


def training_sweep(methods) -> List[Variant]:
    """The training-time comparison: each fine-tune alone, then FAPM on it, at every seed.

    ``Variant.seed`` is the fine-tune's training seed here (for DARE, its drop seed).
    """
    variants = []
    for seed in methods.seeds:
        variants += [Variant("sft", 0.0, seed), Variant("sam", methods.sam_rho, seed),
                     Variant("reg", methods.regularizer_lam, seed)]
        for s in methods.fapm_sparsities:
            variants += [Variant(m, s, seed) for m in ("sft_fapm", "sam_fapm", "reg_fapm")]
    return variants


@dataclass(frozen=True)
class Variant:
    """One model of the study: a method, its knob value and a seed (DARE's drop seed, or the
    training seed of a training-time variant; None where nothing is random)."""

    method: str
    knob: float
    seed: Optional[int] = None

    @property
    def name(self) -> str:
        tail = f"-seed{self.seed}" if self.seed is not None else ""
        return f"{self.method}-{self.knob:g}{tail}"


def sweep(sweeps) -> List[Variant]:
    """Every variant of the study, in the order they are run."""
    variants = []
    for s in sweeps.sparsities:
        for method in sweeps.pruning_methods:
            variants.append(Variant(method, s))
        for seed in sweeps.dare_seeds:
            variants.append(Variant("dare", s, seed))
    variants += [Variant("wise", a) for a in sweeps.wise_alphas]
    variants += [Variant("lines", low) for low in sweeps.lines_lows]
    return variants


def sweep_variant(variant: Variant):
    """The sweep's variant (:class:`fapm_merge.sweep.variants.Variant`) that builds this
    study variant from its fine-tune: a fine-tune itself is the sweep's ``finetuned``
    reference; every merge is a sweep point or one of the sweep's baselines."""
    from fapm_merge.sweep.variants import Variant as SweepVariant

    method = variant.method
    if method in FINETUNES:
        return SweepVariant("reference", reference="finetuned")
    if method in ("fapm", "magnitude", "relative") or method.endswith("_fapm"):
        score = "fapm" if method.endswith("_fapm") else method
        return SweepVariant("sweep", score=score, sparsity=variant.knob)
    if method == "dare":
        return SweepVariant("dare", sparsity=variant.knob, seed=variant.seed)
    if method == "wise":
        return SweepVariant("wise", alpha=variant.knob)
    if method == "lines":
        return SweepVariant("lines", first_layer=variant.knob)
    raise ValueError(f"unknown method {method!r}")


def pair_recipe(base: Path, finetuned: Path) -> dict:
    """The study's recipe of one fine-tune: FAPM on (base, fine-tune) in float32. Every merged
    variant is this recipe with the sweep's changes (:func:`fapm_merge.sweep.variants.variant_recipe`)."""
    return {"merge_method": "fapm", "base_model": str(Path(base).resolve()),
            "models": [{"model": str(Path(finetuned).resolve())}],
            "parameters": {"score": "fapm"}, "dtype": "float32"}
