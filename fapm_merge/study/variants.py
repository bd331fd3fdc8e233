"""Stage 3, post-hoc variants: every method is one mergekit recipe, run by ``mergekit-yaml``.

All recipes come from one template (:func:`recipe`): the pruning methods differ from FAPM by
one word (``score``) or two (``rescale``), WiSE-FT is mergekit's ``linear`` and the LiNeS-style
scaling is mergekit's ``task_arithmetic`` with a layer gradient on ``weight``. The recipe is
written next to each variant's outputs, so every number in the study can be rebuilt by hand
with ``mergekit-yaml recipe.yml OUT``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import yaml

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


def recipe(variant: Variant, base: Path, finetuned: Path) -> dict:
    """The mergekit recipe of one variant (the single template every method is made from)."""
    base, finetuned = str(Path(base).resolve()), str(Path(finetuned).resolve())
    config = {"base_model": base, "dtype": "float32"}
    if variant.method in ("fapm", "magnitude", "relative", "dare", "sft_fapm", "sam_fapm",
                          "reg_fapm"):
        config["merge_method"] = "fapm"
        config["models"] = [{"model": finetuned, "parameters": {"sparsity": variant.knob}}]
        if variant.method == "dare":
            config["parameters"] = {"score": "random", "rescale": "density",
                                    "seed": variant.seed}
        else:
            trained_then_pruned = variant.method.endswith("_fapm")
            config["parameters"] = {"score": "fapm" if trained_then_pruned else variant.method}
    elif variant.method == "wise":
        config["merge_method"] = "linear"
        config["models"] = [
            {"model": base, "parameters": {"weight": round(1.0 - variant.knob, 6)}},
            {"model": finetuned, "parameters": {"weight": variant.knob}},
        ]
    elif variant.method == "lines":
        # weight of the change rises linearly from `knob` at the first layer to 1 at the last;
        # tensors outside the layers (embeddings, final norm) take the first value (t = 0).
        config["merge_method"] = "task_arithmetic"
        config["models"] = [{"model": finetuned, "parameters": {"weight": [variant.knob, 1.0]}}]
    else:
        raise ValueError(f"unknown method {variant.method!r}")
    return config


def mergekit_yaml() -> str:
    """The ``mergekit-yaml`` script of this interpreter's environment."""
    local = Path(sys.executable).with_name("mergekit-yaml")
    return str(local) if local.exists() else (shutil.which("mergekit-yaml") or "mergekit-yaml")


def build(variant: Variant, base: Path, finetuned: Path, folder: Path, log) -> Path:
    """Write ``recipe.yml`` into ``folder`` and run the real ``mergekit-yaml`` on it."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe_path = folder / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(recipe(variant, base, finetuned), sort_keys=False))
    model_dir = folder / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [mergekit_yaml(), str(recipe_path), str(model_dir), "--no-write-model-card",
               "--copy-tokenizer", "--quiet"]
    done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed for {variant.name} (see {log.name})")
    return model_dir
