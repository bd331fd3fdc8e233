"""The sweep against the naive loop a user runs today, on one model, in one script.

Naive loop, per sweep point: ``mergekit-yaml recipe.yml DIR`` (a full model written), then
``lm-eval run --model hf --model_args pretrained=DIR`` (a fresh process and load), plus the
two references scored the same way. Sweep: one ``fapm-merge sweep`` process (base and
fine-tune loaded once, every variant built in memory).

Both run as child processes; wall time and peak RSS come from ``os.wait4``. Printed: the
wall ratio (sweep / naive), the sweep's peak RSS over the model's size (absolute, and above
the RSS of a process that only imports the libraries), the share of the sweep's wall spent in
its own work outside lm-eval (loading the models, scoring every tensor, applying the masks),
what else the process spends outside lm-eval's evaluation (imports, task set-up, the report),
and whether every score is identical.

Usage (a ~100M-parameter float32 Llama pair and a small local task, cached in ``--cache``;
``--size 250m`` for a ~245M pair, where the libraries' own memory weighs less)::

    python benchmarks/bench_sweep.py [--items 300] [--size 250m]

Smoke test (tiny model, one point, the naive loop without its references and no import
baseline; what tests/test_sweep.py runs)::

    python benchmarks/bench_sweep.py --quick --cache /tmp/bench-sweep-quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

WORDS = ("the cat dog sat ran on mat red blue green one two three four five yes no big small "
         "old new hot cold up down left right").split()
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


SHAPES = {  # Llama shapes: ~0.4M (smoke test), ~88M and ~245M parameters
    "quick": dict(hidden_size=32, intermediate_size=2112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
                 num_attention_heads=12, num_key_value_heads=4, vocab_size=16384),
    "250m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
}


def build_pair(folder: Path, quick: bool, seed: int = 0, size: str = "100m") -> int:
    """A random Llama base and a 'fine-tune' (base + a small dense change); returns the
    parameter count. Cached: rebuilt only when missing."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    marker = folder / "params.txt"
    if marker.exists():
        return int(marker.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    corpus = [" ".join(random.Random(i).choices(WORDS, k=10)) for i in range(500)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    shape = SHAPES["quick" if quick else size]
    config = LlamaConfig(max_position_embeddings=128, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * param.std() * 0.3)
    model.save_pretrained(folder / "ft")
    tokenizer.save_pretrained(folder / "ft")
    count = sum(p.numel() for p in model.parameters())
    marker.write_text(str(count))
    return count


def write_tasks(folder: Path, items: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("bench_task", "bench_general"):
        rng = random.Random(name)
        rows = [{"query": " ".join(rng.choices(WORDS, k=12)),
                 "choices": [" cat", " dog", " mat", " red"], "gold": i % 4}
                for i in range(items)]
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
            "doc_to_text: \"{{query}}\"\ndoc_to_choice: \"{{choices}}\"\n"
            "doc_to_target: \"{{gold}}\"\nmetric_list:\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")


def run_measured(command) -> tuple:
    """(wall, peak RSS in bytes, stdout) of one child process, via os.wait4."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([str(c) for c in command], stdout=out, stderr=err,
                                   text=True, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - began
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{stdout[-2000:]}\n"
                         f"{stderr[-4000:]}")
    return wall, usage.ru_maxrss * 1024, stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one point")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "fapm-bench-sweep"))
    parser.add_argument("--items", type=int, default=None, help="items per task")
    parser.add_argument("--batch-size", default="16")
    parser.add_argument("--size", choices=["100m", "250m"], default="100m",
                        help="the pair's shape (about 88M or 245M parameters)")
    args = parser.parse_args()
    sparsities = [0.9] if args.quick else [0.5, 0.8, 0.9, 0.95, 0.99]
    items = args.items or (8 if args.quick else 100)
    cache = Path(args.cache) / ("quick" if args.quick else
                                ("full" if args.size == "100m" else args.size))
    params = build_pair(cache / "models", args.quick, size=args.size)
    tasks = cache / "tasks"
    write_tasks(tasks, items)
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-", dir=cache))
    recipe = work / "recipe.yml"
    config = {"merge_method": "fapm", "base_model": str(cache / "models" / "base"),
              "models": [{"model": str(cache / "models" / "ft")}],
              "parameters": {"score": "fapm"}, "dtype": "float32"}
    recipe.write_text(yaml.safe_dump(config, sort_keys=False))
    model_bytes = params * 4
    print(f"model: {params / 1e6:.1f}M parameters, float32 ({model_bytes / 2**20:.0f} MiB); "
          f"{len(sparsities)} points; 2 tasks x {items} items", flush=True)
    common = ["--include-path", tasks, "--batch-size", args.batch_size]

    # the naive loop: mergekit-yaml + a fresh lm-eval per point, and the two references
    naive_wall, naive_rss, naive_scores = 0.0, 0, {}
    points = [] if args.quick else [("pretrained", cache / "models" / "base"),
                                     ("finetuned", cache / "models" / "ft")]
    points += [(f"fapm-{s:g}", None) for s in sparsities]
    for name, folder in points:
        target = folder
        if folder is None:
            sparsity = float(name.split("-")[1])
            variant = work / f"{name}.yml"
            variant.write_text(yaml.safe_dump(
                dict(config, parameters={"score": "fapm", "sparsity": sparsity})))
            target = work / name
            wall, rss, _ = run_measured([tool("mergekit-yaml"), variant, target,
                                         "--no-write-model-card", "--copy-tokenizer", "--quiet"])
            naive_wall += wall
            naive_rss = max(naive_rss, rss)
        out = work / f"{name}-lm-eval"
        wall, rss, _ = run_measured([
            tool("lm-eval"), "run", "--model", "hf", "--model_args",
            f"pretrained={target},tokenizer={cache / 'models' / 'base'},dtype=float32",
            "--tasks", "bench_task,bench_general", "--include_path", tasks,
            "--batch_size", args.batch_size, "--device", "cpu", "--output_path", out])
        naive_wall += wall
        naive_rss = max(naive_rss, rss)
        result = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
        naive_scores[name] = {t: result[t]["acc_norm,none"] for t in ("bench_task", "bench_general")}
        if folder is None:
            shutil.rmtree(target)
        print(f"  naive {name}: done ({naive_wall:.0f} s so far)", flush=True)

    sweep_out = work / "sweep"
    sweep_wall, sweep_rss, _ = run_measured([
        tool("fapm-merge"), "sweep", recipe, sweep_out, "--sparsity",
        ",".join(f"{s:g}" for s in sparsities), "--task-tasks", "bench_task",
        "--general-tasks", "bench_general", "--quiet", *common])
    data = json.loads((sweep_out / "results.json").read_text())
    sweep_scores = {e["name"]: {t: e["scores"][t]["value"] for t in ("bench_task", "bench_general")}
                    for e in data["variants"].values()}
    eval_s = data["timing"]["eval_s"]
    imports_wall, imports_rss = 0.0, 0
    if not args.quick:
        imports_wall, imports_rss, _ = run_measured([sys.executable, "-c",
            "import torch, transformers, mergekit.merge, lm_eval.evaluator, "
            "lm_eval.models.huggingface, fapm_merge.sweep.run"])
    own_s = data["timing"]["setup_s"] + data["timing"]["build_s"]
    rest_s = sweep_wall - eval_s - own_s
    identical = all(sweep_scores.get(name) == scores for name, scores in naive_scores.items())
    lines = [
        f"naive loop: {naive_wall:.1f} s wall, peak RSS {naive_rss / 2**20:.0f} MiB",
        f"sweep:      {sweep_wall:.1f} s wall, peak RSS {sweep_rss / 2**20:.0f} MiB "
        f"(lm-eval {eval_s:.1f} s, setup {data['timing']['setup_s']:.1f} s, building variants "
        f"{data['timing']['build_s']:.1f} s)",
        f"wall ratio sweep / naive: {sweep_wall / naive_wall:.2f} (target <= 0.5)",
        f"peak RSS / model size: {sweep_rss / model_bytes:.2f} (target <= 3)"
        + (f"; above the {imports_rss / 2**20:.0f} MiB of a process that only imports the "
           f"libraries: {(sweep_rss - imports_rss) / model_bytes:.2f}" if imports_rss else ""),
        f"share of the sweep's wall in its own work outside lm-eval (loading, scoring, "
        f"applying masks: set-up + builds): {own_s / sweep_wall:.2f} (target <= 0.20)",
        f"the rest of the process outside lm-eval's evaluation: {rest_s:.1f} s = "
        f"{rest_s / sweep_wall:.2f} of its wall"
        + (f" (importing the libraries: {imports_wall:.1f} s; reading the tasks, the report "
           f"and plots, exit: {rest_s - imports_wall:.1f} s)" if imports_wall else ""),
        f"scores identical: {identical}",
    ]
    print("\n".join(lines))
    if args.quick:
        print("(quick mode: a smoke test; the ratios above mean nothing at this size)")
    if not identical:
        for name in naive_scores:
            if naive_scores[name] != sweep_scores.get(name):
                print(f"  differs: {name}: naive {naive_scores[name]} sweep {sweep_scores.get(name)}")
    shutil.rmtree(work, ignore_errors=True)
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
