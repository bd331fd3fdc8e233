"""The embedded demo: a tiny pre-train / fine-tune / FAPM merge, built locally in seconds.

The "pre-trained" model learns a general skill (continue sequences that count up by 1); the
fine-tune learns a conflicting task (sequences that count up by 5) and forgets part of the
general skill. FAPM and plain magnitude pruning of the task vector are then merged through
mergekit at the same sparsity, reloaded with transformers and compared.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Dict, List, Tuple

import torch

VOCAB = 64
SEQUENCE = 24
GENERAL_STRIDE = 1
TASK_STRIDE = 5


def tiny_llama_config(**overrides):
    """A Llama config small enough to train on a laptop CPU in seconds."""
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def progressions(stride: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, SEQUENCE]`` token ids ``start + stride * i (mod VOCAB)``."""
    start = torch.randint(VOCAB, (count, 1), generator=generator)
    return (start + stride * torch.arange(SEQUENCE)) % VOCAB


def train(model, stride: int, steps: int, lr: float, seed: int) -> None:
    """Full-parameter AdamW on next-token prediction of one progression family."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = progressions(stride, 32, generator)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


@torch.no_grad()
def loss_on(model, stride: int, seed: int = 1234) -> float:
    """Mean next-token loss on 256 held-out progressions of the given stride."""
    batch = progressions(stride, 256, torch.Generator().manual_seed(seed))
    return float(model(input_ids=batch, labels=batch).loss)


def build_pair(out_dir: str, seed: int = 0) -> Tuple[str, str]:
    """Train and save ``base`` and ``finetuned`` model folders under ``out_dir``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config())
    train(model, GENERAL_STRIDE, steps=150, lr=3e-3, seed=seed)
    base_dir = os.path.join(out_dir, "base")
    model.save_pretrained(base_dir)
    train(model, TASK_STRIDE, steps=60, lr=2e-3, seed=seed + 1)
    finetuned_dir = os.path.join(out_dir, "finetuned")
    model.save_pretrained(finetuned_dir)
    return base_dir, finetuned_dir


RECIPE = """\
# Written by `fapm-merge demo`: FAPM-prune the demo fine-tune's task vector.
merge_method: fapm
base_model: {base}
models:
  - model: {finetuned}
    parameters:
      sparsity: {sparsity}
parameters:
  score: {score}
dtype: float32
"""


def merge(recipe_path: str, out_path: str) -> None:
    """Merge a recipe through mergekit's own ``run_merge`` (our methods registered)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import fapm_merge

    fapm_merge.register()
    with open(recipe_path, encoding="utf-8") as handle:
        config = MergeConfiguration.model_validate(yaml.safe_load(handle))
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(config, out_path, options=options)


def module_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj``; norms grouped as ``norm``."""
    if "norm" in name:
        return "norm"
    parts = [p for p in name.split(".") if p not in ("weight", "bias") and not p.isdigit()]
    return parts[-1] if parts else name


def summarize(base_sd, finetuned_sd, merged_sd, sparsity: float) -> List[Dict[str, float]]:
    """Per module type: kept fraction, task-vector energy kept, kept elements not in the
    magnitude mask. Measured from the merged weights themselves, not from our masks."""
    from fapm_merge.kernel import prune_mask

    totals: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for name, base in base_sd.items():
        change = finetuned_sd[name].float() - base.float()
        kept = merged_sd[name] != base
        magnitude = prune_mask(base, finetuned_sd[name], sparsity, score="magnitude")
        row = totals[module_type(name)]
        row["elements"] += base.numel()
        row["kept"] += int(kept.sum())
        row["energy_kept"] += float((change[kept] ** 2).sum())
        row["energy"] += float((change**2).sum())
        row["not_in_magnitude"] += int((kept & ~magnitude).sum())
    rows = []
    for module, row in sorted(totals.items()):
        rows.append(
            dict(
                module=module,
                elements=int(row["elements"]),
                kept_fraction=row["kept"] / row["elements"],
                energy_kept=row["energy_kept"] / row["energy"] if row["energy"] else 0.0,
                not_in_magnitude=int(row["not_in_magnitude"]),
                kept=int(row["kept"]),
            )
        )
    return rows


def run_demo(out_dir: str, sparsity: float = 0.9, seed: int = 0) -> Dict[str, object]:
    """Build, merge, reload and report; returns the figures it printed."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # four tiny loads; their bars are noise
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    print(f"[1/4] training a tiny base and fine-tune in {out_dir}")
    base_dir, finetuned_dir = build_pair(out_dir, seed)
    merged = {}
    for score in ("fapm", "magnitude"):
        recipe_path = os.path.join(out_dir, f"recipe-{score}.yml")
        with open(recipe_path, "w", encoding="utf-8") as handle:
            handle.write(
                RECIPE.format(
                    base=base_dir, finetuned=finetuned_dir, sparsity=sparsity, score=score
                )
            )
        merged[score] = os.path.join(out_dir, f"merged-{score}")
        print(f"[2/4] mergekit: {os.path.basename(recipe_path)} -> {merged[score]}")
        merge(recipe_path, merged[score])

    print("[3/4] reloading every model with transformers")
    models = {
        label: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        for label, path in [
            ("base", base_dir),
            ("fine-tuned", finetuned_dir),
            (f"FAPM {sparsity}", merged["fapm"]),
            (f"magnitude {sparsity}", merged["magnitude"]),
        ]
    }
    losses = {
        label: (loss_on(model, TASK_STRIDE), loss_on(model, GENERAL_STRIDE))
        for label, model in models.items()
    }
    state = {label: model.state_dict() for label, model in models.items()}
    rows = summarize(state["base"], state["fine-tuned"], state[f"FAPM {sparsity}"], sparsity)

    print(f"[4/4] results (sparsity {sparsity})\n")
    print(f"{'model':<18} {'task loss':>10} {'general loss':>13}")
    for label, (task, general) in losses.items():
        print(f"{label:<18} {task:>10.3f} {general:>13.3f}")
    print(f"\n{'module':<14} {'elements':>9} {'kept':>7} {'energy kept':>12} "
          f"{'kept, not in magnitude mask':>28}")
    for row in rows:
        print(f"{row['module']:<14} {row['elements']:>9} {row['kept_fraction']:>7.3f} "
              f"{row['energy_kept']:>12.3f} {row['not_in_magnitude']:>28}")
    print(f"\nrecipes and models are in {out_dir}; rerun a merge with\n"
          f"  mergekit-yaml {os.path.join(out_dir, 'recipe-fapm.yml')} OUT")
    return {"losses": losses, "modules": rows, "merged": merged}


