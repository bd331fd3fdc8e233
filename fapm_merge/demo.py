"""The embedded demo: a tiny pre-train / fine-tune / FAPM merge and sweep, built locally.

Token sequences stand in for text. The "pre-trained" model learns a general skill (count up by
one: ``7 8 9 10``) and a second one behind a marker (``B 7 12 17``: count up by five); after
the marker ``A`` it counts by one like everywhere else. The fine-tune teaches one new task:
count by five after ``A``. The base already has the machinery, so the task could live in a
small, structured change (what the marker ``A`` leads to), the way a real fine-tune's task
lives in a sparse part of its task vector; but full fine-tuning on task data alone also
overwrites the general skill (forgetting). FAPM then prunes the task vector through mergekit,
and a small ``fapm-merge sweep`` (lm-eval on two local tasks) shows where the task is kept and
the forgetting gone.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from typing import Dict, List, Tuple

import torch

from fapm_merge.inspect.stats import module_type
from fapm_merge.merging import merge

# token ids: 0 end of text, 1 and 2 the markers, then the numbers 0..60 (counting is mod 61)
EOS, MARK_TASK, MARK_OTHER = 0, 1, 2
NUMBERS = 61
VOCAB = 3 + NUMBERS
SEQUENCE = 24
GENERAL_STRIDE = 1
TASK_STRIDE = 5
SPARSITIES = (0.8, 0.85, 0.9, 0.95)


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
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def progressions(stride: int, count: int, generator: torch.Generator,
                 marker: int = None) -> torch.Tensor:
    """``[count, SEQUENCE]`` token ids of ``start + stride * i (mod NUMBERS)``, after
    ``marker`` when one is given."""
    length = SEQUENCE - (marker is not None)
    start = torch.randint(NUMBERS, (count, 1), generator=generator)
    numbers = (start + stride * torch.arange(length)) % NUMBERS + 3
    if marker is None:
        return numbers
    return torch.cat([torch.full((count, 1), marker), numbers], dim=1)


def pretraining_batch(generator: torch.Generator) -> torch.Tensor:
    """Counting by one (plain and after ``A``) and by five after ``B``."""
    return torch.cat([progressions(GENERAL_STRIDE, 16, generator),
                      progressions(GENERAL_STRIDE, 8, generator, MARK_TASK),
                      progressions(TASK_STRIDE, 8, generator, MARK_OTHER)])


def task_batch(generator: torch.Generator) -> torch.Tensor:
    """The fine-tune's data: counting by five after ``A``, nothing else."""
    return progressions(TASK_STRIDE, 32, generator, MARK_TASK)


def train(model, batches, steps: int, lr: float, seed: int) -> None:
    """Full-parameter AdamW on next-token prediction of ``batches(generator)``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = batches(generator)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def word_tokenizer(words):
    """A whitespace word-level tokenizer: ``<eos>`` (id 0; also bos, pad and unknown), then
    ``words`` in order (ids 1, 2, ...). What the demo and the tests' tiny models speak."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{word: index + 1 for index, word in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<eos>", eos_token="<eos>",
                                   pad_token="<eos>", unk_token="<eos>")


def tokenizer():
    """The demo's tokens: ``A`` (id 1), ``B`` (2) and the numbers (3 + n)."""
    assert (EOS, MARK_TASK, MARK_OTHER) == (0, 1, 2)
    return word_tokenizer(["A", "B"] + [str(n) for n in range(NUMBERS)])


def build_pair(out_dir: str, seed: int = 0) -> Tuple[str, str]:
    """Train and save ``base`` and ``finetuned`` model folders (with the tokenizer)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread (5x here)
    try:
        train(model, pretraining_batch, steps=300, lr=3e-3, seed=seed)
        base_dir = os.path.join(out_dir, "base")
        model.save_pretrained(base_dir)
        train(model, task_batch, steps=60, lr=2e-3, seed=seed + 1)
    finally:
        torch.set_num_threads(threads)
    finetuned_dir = os.path.join(out_dir, "finetuned")
    model.save_pretrained(finetuned_dir)
    for folder in (base_dir, finetuned_dir):
        tokenizer().save_pretrained(folder)
    return base_dir, finetuned_dir


def write_tasks(folder: str, items: int = 100) -> str:
    """Two local lm-eval tasks, multiple choice between four continuations (count by 5, 1, 2
    or 3): ``demo_task`` after ``A`` (the fine-tune's task, answer: by five) and
    ``demo_general`` without a marker (what the base could do, answer: by one)."""
    os.makedirs(folder, exist_ok=True)
    for name, stride, marker in (("demo_task", TASK_STRIDE, "A "), ("demo_general",
                                                                    GENERAL_STRIDE, "")):
        rng = random.Random(name)
        rows = []
        for _ in range(items):
            start = rng.randrange(NUMBERS)
            prompt = marker + " ".join(str((start + stride * i) % NUMBERS) for i in range(8))
            last = start + stride * 7
            strides = [stride] + [s for s in (1, 2, 3, 5) if s != stride][:3]
            rng.shuffle(strides)
            choices = [" ".join(str((last + s * i) % NUMBERS) for i in range(1, 5))
                       for s in strides]
            rows.append({"prompt": prompt, "choices": choices, "gold": strides.index(stride)})
        data = os.path.join(folder, f"{name}.jsonl")
        with open(data, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as handle:
            handle.write(
                f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
                "doc_to_text: \"{{prompt}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                "doc_to_target: \"{{gold}}\"\nmetric_list:\n  - metric: acc\n"
                "    aggregation: mean\n    higher_is_better: true\n")
    return folder


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


def run_demo(out_dir: str, sparsity: float = 0.9, seed: int = 0,
             sweep: bool = True) -> Dict[str, object]:
    """Build the pair, merge it with a FAPM recipe through mergekit, reload it, say what FAPM
    kept, then sweep the sparsity with lm-eval (when installed). Returns what it printed."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # tiny loads; their bars are noise
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    print(f"[1/4] training a tiny base and fine-tune in {out_dir}", flush=True)
    base_dir, finetuned_dir = build_pair(out_dir, seed)
    recipe_path = os.path.join(out_dir, "recipe-fapm.yml")
    with open(recipe_path, "w", encoding="utf-8") as handle:
        handle.write(RECIPE.format(base=base_dir, finetuned=finetuned_dir, sparsity=sparsity,
                                   score="fapm"))
    merged = os.path.join(out_dir, "merged-fapm")
    print(f"[2/4] mergekit: {os.path.basename(recipe_path)} -> {merged}", flush=True)
    merge(recipe_path, merged)

    print("[3/4] reloading with transformers: what FAPM kept of the task vector", flush=True)
    state = {label: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
             for label, path in (("base", base_dir), ("fine-tuned", finetuned_dir),
                                 ("merged", merged))}
    rows = summarize(state["base"], state["fine-tuned"], state["merged"], sparsity)
    print(f"\n{'module':<14} {'elements':>9} {'kept':>7} {'energy kept':>12} "
          f"{'kept, not in magnitude mask':>28}")
    for row in rows:
        print(f"{row['module']:<14} {row['elements']:>9} {row['kept_fraction']:>7.3f} "
              f"{row['energy_kept']:>12.3f} {row['not_in_magnitude']:>28}")
    result: Dict[str, object] = {"modules": rows, "merged": merged, "recipe": recipe_path}
    print(f"\nrerun the merge with\n  mergekit-yaml {recipe_path} OUT\n")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        sweep = False
        print("[4/4] skipped: the sweep evaluates with lm-eval; pip install "
              "'fapm-merge[sweep]' (make demo does) and rerun")
    if sweep:
        result["sweep"] = _sweep(recipe_path, out_dir)
    return result


def _sweep(recipe_path: str, out_dir: str) -> dict:
    """[4/4]: ``fapm-merge sweep`` of the demo recipe on the demo's two lm-eval tasks."""
    from fapm_merge.sweep.evaluate import TaskSpec
    from fapm_merge.sweep.run import SweepOptions, run_sweep

    tasks = write_tasks(os.path.join(out_dir, "tasks"))
    sweep_dir = os.path.join(out_dir, "sweep")
    command = (f"fapm-merge sweep {recipe_path} {sweep_dir} --sparsity "
               f"{','.join(f'{s:g}' for s in SPARSITIES)} --score fapm,magnitude --wise 0.5 "
               f"--task-tasks demo_task --general-tasks demo_general --include-path {tasks}")
    print(f"[4/4] {command}", flush=True)
    options = SweepOptions(
        recipe=recipe_path, out_dir=sweep_dir, sparsities=list(SPARSITIES),
        scores=["fapm", "magnitude"], wise=[0.5], task_tasks=[TaskSpec("demo_task")],
        general_tasks=[TaskSpec("demo_general")], include_path=tasks, batch_size="32",
        quiet=True, command=command.split())
    import contextlib

    # lm-eval draws its own progress bars, a set per variant: noise here, kept in a log
    log = os.path.join(out_dir, "sweep.log")
    with open(log, "w", encoding="utf-8") as stream, contextlib.redirect_stderr(stream):
        data = run_sweep(options, echo=lambda text: None)
    entries = [data["variants"][key] for key in data["current"]]
    print(f"\n{'model':<16} {'task acc':>9} {'general acc':>12} {'retention':>10} "
          f"{'forgetting':>11}")
    for entry in entries:
        f = entry["figures"]
        print(f"{entry['name']:<16} {f['task']:>9.2f} {f['general']:>12.2f} "
              f"{f['retention']:>10.2f} {f['forgetting']:>+11.2f}")
    choice = data["recommendation"]
    if choice["chosen"]:
        chosen = next(e for e in entries if e["name"] == choice["chosen"])
        f = chosen["figures"]
        print(f"\nrecommended: {chosen['name']} (keeps {f['retention']:.0%} of the fine-tune's "
              f"task accuracy, forgetting {f['forgetting']:+.0%}; the fine-tune forgot "
              f"{next(e for e in entries if e['name'] == 'finetuned')['figures']['forgetting']:.0%})"
              f" -> {os.path.join(sweep_dir, 'recommended.yml')}")
        if choice["within_standard_errors"]:
            print(f"  (within the standard errors of the runner-up {choice['runner_up']})")
    else:
        print(f"\nno recommendation: {choice['reason']}")
    print(f"report and plots: {sweep_dir}/results.md, pareto.png, tradeoff-fapm.png "
          f"(lm-eval's log: {log})")
    return data
