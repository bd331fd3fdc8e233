"""Side-by-side merge benchmark: FAPM against mergekit's own methods, through `mergekit-yaml`.

What it does:

1. Builds (once, then cached) a synthetic Llama-architecture pair in bf16 safetensors shards:
   a base with random weights at realistic scales and a "fine-tune" that is the base plus a small
   dense delta. Tensors are generated and written one at a time; no model is ever held whole in
   memory.
2. Runs every merge method as a separate `mergekit-yaml` process, interleaved within each round
   (the order rotates from round to round) and repeated; plus an I/O floor that streams every
   tensor of both models in and writes the output shards with no arithmetic at all.
3. Records wall time, CPU time (user + sys) and peak RSS of every child (``os.wait4``), takes the
   median over rounds and prints and writes the ratios to ``task_arithmetic`` and to the floor:
   JSON and a markdown table under ``--out``, and the results section of ``docs/benchmarks.md``.

Usage (full run, CPU; writes docs/benchmarks/merge.{json,md} and updates docs/benchmarks.md)::

    python benchmarks/bench_merge.py

Smoke test (tiny model, one round; results go to a scratch folder, the docs are untouched)::

    python benchmarks/bench_merge.py --quick --out /tmp/bench-quick

GPU (merge arithmetic on the accelerator; fails with a clear message without CUDA)::

    python benchmarks/bench_merge.py --device cuda --out docs/benchmarks/cuda
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402  (shared helpers of the two benchmark scripts)

REPO = Path(__file__).resolve().parent.parent
GENERATOR_VERSION = 1  # bump when the synthetic weights change, so caches are rebuilt


@dataclass(frozen=True)
class ModelShape:
    """The Llama hyper-parameters of the synthetic pair."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def tensors(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """(name, shape) of every weight, in the order they are written."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        names: List[Tuple[str, Tuple[int, ...]]] = [
            ("model.embed_tokens.weight", (self.vocab, self.hidden))
        ]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            names += [
                (p + "input_layernorm.weight", (self.hidden,)),
                (p + "self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (p + "self_attn.k_proj.weight", (kv, self.hidden)),
                (p + "self_attn.v_proj.weight", (kv, self.hidden)),
                (p + "self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (p + "post_attention_layernorm.weight", (self.hidden,)),
                (p + "mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (p + "mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (p + "mlp.down_proj.weight", (self.hidden, self.intermediate)),
            ]
        names += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return names

    def parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())

    def config(self) -> dict:
        """A config.json that transformers and mergekit read as LlamaForCausalLM."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


# TinyLlama-1.1B's shape (Llama architecture, GQA): 1.1B parameters, 2.2 GB per model in bf16.
FULL = ModelShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
QUICK = ModelShape(hidden=256, intermediate=704, layers=2, heads=4, kv_heads=2, vocab=2048)

# Recipes of the compared methods; {base} and {ft} are absolute model paths.
METHODS: Dict[str, str] = {
    "task_arithmetic": "parameters: {{weight: 1.0}}",
    "ties": "parameters: {{weight: 1.0, density: 0.1}}",
    "dare_ties": "parameters: {{weight: 1.0, density: 0.1}}",
    "breadcrumbs": "parameters: {{weight: 1.0, density: 0.1, gamma: 0.01}}",
    "della": "parameters: {{weight: 1.0, density: 0.1, epsilon: 0.05}}",
    "fapm": "parameters: {{sparsity: 0.9}}",
}
FLOOR = "io_floor"
REFERENCE = "task_arithmetic"
SPARSIFIERS = ("ties", "dare_ties", "breadcrumbs", "della")


def recipe(method: str, base: Path, ft: Path) -> str:
    """The mergekit YAML of one method on the pair (one fine-tune, explicit base)."""
    params = METHODS[method].format()
    return (
        f"merge_method: {method}\n"
        f"base_model: {base}\n"
        f"models:\n  - model: {ft}\n    {params}\n"
        "dtype: bfloat16\n"
    )


# ----------------------------------------------------------------------------- model generation



def _weight_scale(name: str, shape: Tuple[int, ...], layers: int) -> float:
    """A typical standard deviation for a trained Llama weight of this kind."""
    if "norm" in name:
        return 0.0  # norms are handled apart: around 1, not around 0
    if "down_proj" in name or "o_proj" in name:
        return 0.02 / math.sqrt(2 * layers)
    return 0.02


def _make_pair(name: str, shape: Tuple[int, ...], layers: int, gen: torch.Generator):
    """One tensor of the base and of the fine-tune, bf16.

    Base: Gaussian with a per-row scale (lognormal, sigma 0.25) so rows differ as in trained
    weights; norms are 1 + N(0, 0.1). Fine-tune: base + a dense Gaussian delta of about 1% of
    the row scale (a few bf16 ulps), rounded to bf16, so a share of elements is unchanged as in
    real bf16 fine-tunes.
    """
    if "norm" in name:
        base = torch.empty(shape).normal_(0.0, 0.1, generator=gen).add_(1.0)
        delta_scale = torch.full(shape, 0.005)
    else:
        rows = torch.empty(shape[0], 1).normal_(0.0, 0.25, generator=gen).exp_()
        rows.mul_(_weight_scale(name, shape, layers))
        base = torch.empty(shape).normal_(generator=gen).mul_(rows)
        delta_scale = rows.mul_(0.01)
    base16 = base.to(torch.bfloat16)
    base.copy_(base16)  # exact: the fine-tune is a change of the stored bf16 weight
    base.add_(torch.empty(shape).normal_(generator=gen).mul_(delta_scale))
    ft16 = base.to(torch.bfloat16)
    return base16, ft16


def _header(tensors: Sequence[Tuple[str, Tuple[int, ...]]]) -> bytes:
    """The safetensors header (length prefix included) of bf16 tensors stored in this order."""
    header: Dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def _write_shard_pair(paths: Tuple[Path, Path], tensors, produce) -> None:
    """Write the same shard of both models at once, streaming tensor by tensor.

    The header only depends on the shapes, so it is written first; ``produce(name, shape)``
    returns (base, fine-tune) bf16 tensors, which are written and dropped right away.
    """
    header = _header(tensors)
    with open(paths[0], "wb") as fb, open(paths[1], "wb") as ff:
        fb.write(header)
        ff.write(header)
        for name, shape in tensors:
            for handle, tensor in zip((fb, ff), produce(name, shape)):
                handle.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def _shard_plan(shape: ModelShape, shard_bytes: int) -> List[List[Tuple[str, Tuple[int, ...]]]]:
    shards: List[List[Tuple[str, Tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in shape.tensors():
        nbytes = math.prod(dims) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def build_pair(shape: ModelShape, cache: Path, shard_bytes: int) -> Tuple[Path, Path]:
    """Create (or reuse) base/ and ft/ under ``cache``; returns their absolute paths."""
    key = hashlib.sha1(
        json.dumps([asdict(shape), shard_bytes, GENERATOR_VERSION]).encode()
    ).hexdigest()[:10]
    root = (cache / f"llama-{shape.parameters() / 1e6:.0f}M-{key}").resolve()
    base_dir, ft_dir = root / "base", root / "ft"
    if (root / "complete").exists():
        return base_dir, ft_dir
    shutil.rmtree(root, ignore_errors=True)
    for folder in (base_dir, ft_dir):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(shape.config(), indent=2))
    shards = _shard_plan(shape, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    gen = torch.Generator().manual_seed(1234)
    with tqdm(total=shape.parameters(), unit="param", unit_scale=True, desc="generating pair") as bar:

        def produce(name: str, dims: Tuple[int, ...]):
            bar.update(math.prod(dims))
            return _make_pair(name, dims, shape.layers, gen)

        for shard, filename in zip(shards, names):
            _write_shard_pair((base_dir / filename, ft_dir / filename), shard, produce)
    total = shape.parameters()
    weight_map = {name: filename for shard, filename in zip(shards, names) for name, _ in shard}
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    for folder in (base_dir, ft_dir):
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (root / "complete").write_text("ok\n")
    return base_dir, ft_dir


# ----------------------------------------------------------------------------- I/O floor

def io_floor(base: Path, ft: Path, out: Path, shard_bytes: int) -> None:
    """Read every tensor of both models and write the output shards; no arithmetic.

    The output is the fine-tune's tensors, buffered up to ``shard_bytes`` like mergekit does.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    buffer: Dict[str, torch.Tensor] = {}
    buffered = 0
    written: List[Dict[str, torch.Tensor]] = []
    files = sorted(set(index.values()))
    count = 0

    def flush():
        nonlocal buffer, buffered, count
        if buffer:
            count += 1
            name = f"model-{count:05d}.safetensors"
            save_file(buffer, str(out / name), metadata={"format": "pt"})
            written.append({key: name for key in buffer})
            buffer, buffered = {}, 0

    for filename in files:
        with safe_open(str(base / filename), "pt") as fb, safe_open(str(ft / filename), "pt") as ff:
            for name in fb.keys():
                _ = fb.get_tensor(name)
                tensor = ff.get_tensor(name)
                if buffered + tensor.numel() * 2 > shard_bytes:
                    flush()
                buffer[name] = tensor
                buffered += tensor.numel() * 2
                del _
    flush()
    weight_map = {k: v for part in written for k, v in part.items()}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


# ----------------------------------------------------------------------------- running

@dataclass
class Run:
    method: str
    round: int
    wall_s: float
    cpu_s: float
    user_s: float
    sys_s: float
    peak_rss_bytes: int


def run_child(command: List[str], log: Path) -> Tuple[float, "os.struct_rusage"]:
    """Run ``command``, wait for it with ``os.wait4``; (wall seconds, its resource usage)."""
    env = dict(os.environ)
    env.setdefault("TQDM_DISABLE", "1")
    with open(log, "w") as out:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}):\n{tail}")
    return wall, usage


def mergekit_command(method_file: Path, out: Path, shard_bytes: int, device: str) -> List[str]:
    exe = Path(sys.executable).with_name("mergekit-yaml")
    command = [
        str(exe if exe.exists() else "mergekit-yaml"),
        str(method_file),
        str(out),
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "--out-shard-size",
        str(shard_bytes),
        "--quiet",
    ]
    if device == "cuda":
        command.append("--cuda")
    return command


def check_output(out: Path) -> None:
    shards = list(out.glob("*.safetensors"))
    if not shards:
        raise RuntimeError(f"no output shards in {out}")


def run_all(
    methods: Sequence[str], base: Path, ft: Path, rounds: int, shard_bytes: int, device: str,
    work: Path, jobs: int = 1,
) -> List[Run]:
    """Every method (and the floor) once per round, order rotated per round; all the runs.

    ``jobs`` > 1 runs that many children at once (only for smoke tests: it spoils timings).
    """
    for method in methods:
        (work / f"{method}.yml").write_text(recipe(method, base, ft))
    entries = [FLOOR] + list(methods)
    progress = tqdm(total=rounds * len(entries), desc="merging", unit="run")

    def one(r: int, method: str) -> Run:
        progress.set_postfix_str(f"round {r + 1}: {method}")
        out = work / f"out-{method}"
        shutil.rmtree(out, ignore_errors=True)
        if method == FLOOR:
            command = [sys.executable, __file__, "--floor-worker", str(base), str(ft), str(out),
                       str(shard_bytes)]
        else:
            command = mergekit_command(work / f"{method}.yml", out, shard_bytes, device)
        wall, usage = run_child(command, work / f"{method}.log")
        check_output(out)
        shutil.rmtree(out, ignore_errors=True)
        progress.update()
        return Run(method, r, wall, usage.ru_utime + usage.ru_stime, usage.ru_utime,
                   usage.ru_stime, usage.ru_maxrss * 1024)

    runs: List[Run] = []
    for r in range(rounds):
        shift = r % len(entries)
        order = entries[shift:] + entries[:shift]
        if jobs > 1:
            with ThreadPoolExecutor(jobs) as pool:
                runs += list(pool.map(lambda m: one(r, m), order))
        else:
            runs += [one(r, method) for method in order]
    progress.close()
    return runs


def summarize(runs: Sequence[Run]) -> Dict[str, Dict[str, float]]:
    """Medians per method and their ratios to task_arithmetic and to the I/O floor."""
    methods = list(dict.fromkeys(run.method for run in runs))
    med: Dict[str, Dict[str, float]] = {}
    for method in methods:
        mine = [run for run in runs if run.method == method]
        med[method] = {
            "wall_s": statistics.median(r.wall_s for r in mine),
            "cpu_s": statistics.median(r.cpu_s for r in mine),
            "sys_s": statistics.median(r.sys_s for r in mine),
            "peak_rss_gb": statistics.median(r.peak_rss_bytes for r in mine) / 1e9,
            "rounds": len(mine),
        }
    for method in methods:
        row = med[method]
        for ref, tag in ((REFERENCE, "ta"), (FLOOR, "floor")):
            if ref in med:
                row[f"wall_vs_{tag}"] = row["wall_s"] / med[ref]["wall_s"]
                row[f"cpu_vs_{tag}"] = row["cpu_s"] / med[ref]["cpu_s"]
                row[f"rss_vs_{tag}"] = row["peak_rss_gb"] / med[ref]["peak_rss_gb"]
    return med


def targets(med: Dict[str, Dict[str, float]]) -> Dict[str, bool]:
    """The issue's targets, checked on the medians (only where the methods ran)."""
    result: Dict[str, bool] = {}
    if "fapm" in med and REFERENCE in med:
        result["fapm wall <= 1.5x task_arithmetic"] = med["fapm"]["wall_vs_ta"] <= 1.5
        result["fapm peak RSS <= 1.10x task_arithmetic"] = med["fapm"]["rss_vs_ta"] <= 1.10
        for other in SPARSIFIERS:
            if other in med:
                result[f"fapm faster than {other}"] = med["fapm"]["wall_s"] < med[other]["wall_s"]
    return result


def markdown(med: Dict[str, Dict[str, float]], checks: Dict[str, bool], meta: dict) -> str:
    lines = [
        f"Pair: synthetic Llama, {meta['parameters'] / 1e9:.2f}B parameters per model "
        f"({meta['model']}), bf16, {meta['shards']} shards each; device `{meta['device']}`; "
        f"{meta['rounds']} rounds, medians; output shards of {meta['out_shard_bytes'] / 1e9:g} GB"
        + (f"; {meta['jobs']} runs at a time, so timings mean nothing." if meta["jobs"] > 1 else "."),
        "",
        "| method | wall s | CPU s (sys) | peak RSS GB | wall / task_arithmetic | wall / I/O floor "
        "| CPU / task_arithmetic | RSS / task_arithmetic |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, row in med.items():
        lines.append(
            f"| `{method}` | {row['wall_s']:.1f} | {row['cpu_s']:.1f} ({row['sys_s']:.1f}) "
            f"| {row['peak_rss_gb']:.2f} | {row.get('wall_vs_ta', float('nan')):.2f} "
            f"| {row.get('wall_vs_floor', float('nan')):.2f} "
            f"| {row.get('cpu_vs_ta', float('nan')):.2f} | {row.get('rss_vs_ta', float('nan')):.2f} |"
        )
    if checks:
        lines += ["", "Targets on these medians:", ""]
        lines += [f"- {'met' if ok else 'MISSED'}: {name}" for name, ok in checks.items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one round (smoke test)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, 1 with --quick)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--cache", type=Path, default=_report.default_cache(),
                        help="where the synthetic pair is kept between runs")
    parser.add_argument("--out", type=Path, help="results folder (default docs/benchmarks; "
                        "with --quick a scratch folder under the cache)")
    parser.add_argument("--doc", type=Path, help="markdown file whose results section is "
                        "regenerated (default docs/benchmarks.md for a full CPU run)")
    parser.add_argument("--no-doc", action="store_true", help="do not touch any doc")
    parser.add_argument("--shard-gb", type=float, default=1.0,
                        help="input and output shard size in GB (default 1)")
    parser.add_argument("--jobs", type=int, help="children at a time (default 1; 2 with "
                        "--quick, whose timings do not matter)")
    parser.add_argument("--floor-worker", nargs=4, metavar=("BASE", "FT", "OUT", "BYTES"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.floor_worker:
        base, ft, out, size = args.floor_worker
        io_floor(Path(base), Path(ft), Path(out), int(size))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "bench_merge: --device cuda needs a CUDA build of torch and a visible GPU; "
                       f"torch {torch.__version__} reports none (torch.cuda.is_available() is "
                       "False).\n")

    shape = QUICK if args.quick else FULL
    rounds = args.rounds or (1 if args.quick else 3)
    shard_bytes = int(args.shard_gb * 1e9) if not args.quick else 4_000_000
    out_dir = args.out or (args.cache / "quick-results" if args.quick else REPO / "docs" / "benchmarks")
    doc = None
    if not args.no_doc:
        doc = args.doc or (None if args.quick or args.device != "cpu" else REPO / "docs" / "benchmarks.md")

    base, ft = build_pair(shape, args.cache, shard_bytes)
    with tempfile.TemporaryDirectory(prefix="fapm-bench-", dir=args.cache) as tmp:
        jobs = args.jobs or (2 if args.quick else 1)
        runs = run_all(args.methods, base, ft, rounds, shard_bytes, args.device, Path(tmp), jobs)
    med = summarize(runs)
    checks = targets(med)
    meta = {
        "model": ", ".join(f"{k} {v}" for k, v in asdict(shape).items()),
        "parameters": shape.parameters(),
        "shards": len(_shard_plan(shape, shard_bytes)),
        "device": args.device,
        "rounds": rounds,
        "out_shard_bytes": shard_bytes,
        "quick": args.quick,
        "jobs": jobs,
    }
    meta.update(_report.machine(args.device))
    meta["command"] = _report.command_line(sys.argv if argv is None else ["benchmarks/bench_merge.py", *argv])
    table = markdown(med, checks, meta)
    result = {"meta": meta, "medians": med, "targets": checks, "runs": [asdict(r) for r in runs]}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "merge.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "merge.md").write_text(table)
    if doc is not None:
        _report.update_doc(doc, "merge", table, meta)
    print(table)
    print(f"results: {out_dir / 'merge.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
