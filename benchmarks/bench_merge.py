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

Scaling (one round per point unless ``--rounds``; tables, growth fits and a plot go to
docs/benchmarks/ and docs/benchmarks.md):

    # Llama-3-8B-shaped slices of 1, 2 and 4 layers: growth per layer, fit at 32 layers
    python benchmarks/bench_merge.py --shape llama3-8b --layers 1,2,4
    # 1, 2, 4 and 8 fine-tunes of the 1-layer slice: growth per added fine-tune
    python benchmarks/bench_merge.py --shape llama3-8b --fine-tunes 1,2,4,8
    # the full 32-layer pair (2 x 16 GB of inputs, 16 GB written per merge), deleted after
    python benchmarks/bench_merge.py --shape llama3-8b --layers 32 \
        --methods task_arithmetic fapm --delete-after
    # the slices and fine-tune counts on a GPU, in one command (make bench-cuda-8b)
    python benchmarks/bench_merge.py --shape llama3-8b --layers 1,2 --fine-tunes 1,2,4 \
        --device cuda --out docs/benchmarks/cuda --delete-after
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
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
# Llama-3-8B's shape: 128k-row untied embeddings (2.1 GB of bf16 each), 14336-wide MLPs;
# one layer is 218M parameters (0.44 GB), 32 layers make 8.0B.
LLAMA3_8B = ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8,
                       vocab=128256)
# The study model's shape (SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 KV heads, vocab
# 49152); the synthetic pair has an untied lm_head, which the real model ties.
SMOLLM2_135M = ModelShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3,
                          vocab=49152)
SHAPES = {"tinyllama": FULL, "llama3-8b": LLAMA3_8B, "smollm2-135m": SMOLLM2_135M}

# Recipes of the compared methods; {base} and {ft} are absolute model paths.
METHODS: Dict[str, str] = {
    "task_arithmetic": "parameters: {{weight: 1.0}}",
    "ties": "parameters: {{weight: 1.0, density: 0.1}}",
    "dare_ties": "parameters: {{weight: 1.0, density: 0.1}}",
    "breadcrumbs": "parameters: {{weight: 1.0, density: 0.1, gamma: 0.01}}",
    "della": "parameters: {{weight: 1.0, density: 0.1, epsilon: 0.05}}",
    "fapm": "parameters: {{sparsity: 0.9}}",
    "fapm_ties": "parameters: {{sparsity: 0.9, weight: 1.0}}",
    # the low-rank rivals: an SVD per 2-D tensor (run them with --methods; slow on big shapes)
    "spectral": "parameters: {{weight: 1.0}}",
    "lowrank": "parameters: {{weight: 1.0}}",
}
# the one-pair run's default: every single-fine-tune method but the SVD-based rivals
PAIR_METHODS = tuple(m for m in METHODS if m not in ("fapm_ties", "spectral", "lowrank"))
# what the scaling runs compare (--layers: one fine-tune; --fine-tunes: several)
LAYER_METHODS = ("task_arithmetic", "ties", "dare_ties", "fapm")
FINE_TUNE_METHODS = ("task_arithmetic", "ties", "fapm", "fapm_ties")
# shared parameters (TIES-style methods: normalized; lowrank: its rank)
SHARED = {"ties": "parameters: {normalize: true}",
          "fapm_ties": "parameters: {consensus: sum, normalize: true}",
          "lowrank": "parameters: {rank: 64}"}
FLOOR = "io_floor"
REFERENCE = "task_arithmetic"
SPARSIFIERS = ("ties", "dare_ties", "breadcrumbs", "della")


def recipe(method: str, base: Path, ft) -> str:
    """The mergekit YAML of one method: an explicit base and one fine-tune (a path) or
    several (a list of paths), each with the method's parameters."""
    params = METHODS[method].format()
    fine_tunes = ft if isinstance(ft, (list, tuple)) else [ft]
    models = "".join(f"  - model: {path}\n    {params}\n" for path in fine_tunes)
    shared = SHARED.get(method, "")
    return (f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}"
            + (f"{shared}\n" if shared else "") + "dtype: bfloat16\n")


# ----------------------------------------------------------------------------- model generation



def _weight_scale(name: str, shape: Tuple[int, ...], layers: int) -> float:
    """A typical standard deviation for a trained Llama weight of this kind."""
    if "norm" in name:
        return 0.0  # norms are handled apart: around 1, not around 0
    if "down_proj" in name or "o_proj" in name:
        return 0.02 / math.sqrt(2 * layers)
    return 0.02


def _make_models(name: str, shape: Tuple[int, ...], layers: int, gen: torch.Generator,
                 fine_tunes: int = 1) -> List[torch.Tensor]:
    """One tensor of the base and of each fine-tune, bf16: ``[base, ft_1, ..., ft_n]``.

    Base: Gaussian with a per-row scale (lognormal, sigma 0.25) so rows differ as in trained
    weights; norms are 1 + N(0, 0.1). Fine-tune i: base + its own dense Gaussian delta of
    about 1% of the row scale (a few bf16 ulps), rounded to bf16, so a share of elements is
    unchanged as in real bf16 fine-tunes. With one fine-tune the draws are those of the
    benchmark's first version (cached pairs stay valid).
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
    out = [base16]
    for _ in range(fine_tunes):
        change = torch.empty(shape).normal_(generator=gen).mul_(delta_scale)
        out.append(change.add_(base).to(torch.bfloat16))
    return out


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


def _write_shards(paths: Sequence[Path], tensors, produce) -> None:
    """Write the same shard of every model at once, streaming tensor by tensor.

    The header only depends on the shapes, so it is written first; ``produce(name, shape)``
    returns one bf16 tensor per path, which are written and dropped right away.
    """
    header = _header(tensors)
    handles = [open(path, "wb") for path in paths]
    try:
        for handle in handles:
            handle.write(header)
        for name, shape in tensors:
            for handle, tensor in zip(handles, produce(name, shape)):
                handle.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    finally:
        for handle in handles:
            handle.close()


def _shard_plan(shape: ModelShape, shard_bytes: int,
                per_layer: bool = False) -> List[List[Tuple[str, Tuple[int, ...]]]]:
    """Tensors grouped into shards of at most ``shard_bytes``, or (``per_layer``) one shard
    for the embeddings, one per layer and one for the final norm and head, so that the
    first n layers of the model are whole files (see :func:`layer_view`)."""
    shards: List[List[Tuple[str, Tuple[int, ...]]]] = [[]]
    size, group = 0, None
    for name, dims in shape.tensors():
        nbytes = math.prod(dims) * 2
        mine = name.split(".")[2] if name.startswith("model.layers.") else name in (
            "model.norm.weight", "lm_head.weight")
        if shards[-1] and (mine != group if per_layer else size + nbytes > shard_bytes):
            shards.append([])
            size = 0
        group = mine
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def _fine_tune_names(count: int) -> List[str]:
    return ["ft"] if count == 1 else [f"ft-{i + 1}" for i in range(count)]


def build_models(shape: ModelShape, cache: Path, shard_bytes: int, fine_tunes: int = 1,
                 per_layer: bool = False) -> Tuple[Path, List[Path]]:
    """Create (or reuse) base/ and ``fine_tunes`` fine-tunes under ``cache`` (ft/, or ft-1/,
    ft-2/, ...); returns their absolute paths.

    The generation runs in a spawned process: a child's peak RSS as ``getrusage`` reports it
    includes the high-water mark of the process it was forked from, so a benchmark process
    that once held the generator's tensors (several GB at 8B shapes) would inflate every
    merge it measures."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(_build_models, shape, cache, shard_bytes, fine_tunes,
                           per_layer).result()


def _build_models(shape: ModelShape, cache: Path, shard_bytes: int, fine_tunes: int,
                  per_layer: bool) -> Tuple[Path, List[Path]]:
    """:func:`build_models`' work, tensor by tensor."""
    settings = [asdict(shape), shard_bytes, GENERATOR_VERSION]
    if fine_tunes != 1 or per_layer:  # the one-pair cache keeps its old name
        settings += [fine_tunes, per_layer]
    key = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:10]
    root = (cache / f"llama-{shape.parameters() / 1e6:.0f}M-{key}").resolve()
    folders = [root / "base"] + [root / name for name in _fine_tune_names(fine_tunes)]
    if (root / "complete").exists():
        return folders[0], folders[1:]
    shutil.rmtree(root, ignore_errors=True)
    for folder in folders:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(shape.config(), indent=2))
    shards = _shard_plan(shape, shard_bytes, per_layer)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    gen = torch.Generator().manual_seed(1234)
    with tqdm(total=shape.parameters(), unit="param", unit_scale=True,
              desc=f"generating base + {fine_tunes} fine-tune(s)") as bar:

        def produce(name: str, dims: Tuple[int, ...]):
            bar.update(math.prod(dims))
            return _make_models(name, dims, shape.layers, gen, fine_tunes)

        for shard, filename in zip(shards, names):
            _write_shards([folder / filename for folder in folders], shard, produce)
    total = shape.parameters()
    weight_map = {name: filename for shard, filename in zip(shards, names) for name, _ in shard}
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    for folder in folders:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (root / "complete").write_text("ok\n")
    return folders[0], folders[1:]


def layer_view(model: Path, layers: int, view: Path) -> Path:
    """The first ``layers`` layers of a per-layer-sharded ``model`` as a model folder of its
    own: config and index rewritten, shards linked (nothing copied), so one generated set
    serves every layer count."""
    config = json.loads((model / "config.json").read_text())
    index = json.loads((model / "model.safetensors.index.json").read_text())
    kept = {name: filename for name, filename in index["weight_map"].items()
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers}
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for filename in sorted(set(kept.values())):
        os.symlink(model / filename, view / filename)
    mixed = set(kept.values()) & {f for n, f in index["weight_map"].items() if n not in kept}
    if mixed:
        raise RuntimeError(f"{model}: shards {sorted(mixed)} mix layers; build it per_layer")
    (view / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=layers), indent=2))
    (view / "model.safetensors.index.json").write_text(json.dumps({"weight_map": kept}))
    return view


# ----------------------------------------------------------------------------- I/O floor

def io_floor(base: Path, fine_tunes: Sequence[Path], out: Path, shard_bytes: int) -> None:
    """Read every tensor of the base and of every fine-tune and write the output shards; no
    arithmetic. The output is the last fine-tune's tensors, buffered up to ``shard_bytes``
    like mergekit does; only the tensors the index names are read (see :func:`layer_view`).
    """
    from contextlib import ExitStack

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
        with ExitStack() as stack:
            handles = [stack.enter_context(safe_open(str(folder / filename), "pt"))
                       for folder in (base, *fine_tunes)]
            for name in (n for n, f in index.items() if f == filename):
                tensor = None
                for handle in handles:
                    tensor = handle.get_tensor(name)
                if buffered + tensor.numel() * 2 > shard_bytes:
                    flush()
                buffer[name] = tensor
                buffered += tensor.numel() * 2
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
    # the sampled peak of anonymous memory (RssAnon): what cannot be given back to the page
    # cache. The RSS peak also counts the inputs' clean, file-backed pages (safetensors are
    # memory-mapped), which the kernel can drop under pressure.
    peak_anon_bytes: int = 0
    read_bytes: int = 0  # from storage (page-cache misses), getrusage's ru_inblock
    write_bytes: int = 0
    failed: str = ""  # why the run did not finish (the memory limit), else empty


class OverMemory(RuntimeError):
    """A child stopped by the benchmark's memory limit (so that it cannot take the machine
    down with it); the run is recorded as failed, the benchmark goes on."""


def _resident_bytes(pid: int) -> Tuple[int, int]:
    """(resident, anonymous resident) bytes of a process now; zeros once it has gone."""
    found = {"VmRSS:": 0, "RssAnon:": 0}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for row in handle:
                key = row.split(None, 1)[0] if row.strip() else ""
                if key in found:
                    found[key] = int(row.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return found["VmRSS:"], found["RssAnon:"]


def run_child(command: List[str], log: Path,
              memory_limit: int = 0) -> Tuple[float, "os.struct_rusage", int]:
    """Run ``command``, wait for it with ``os.wait4``; (wall seconds, its resource usage, its
    peak anonymous memory in bytes, sampled every 50 ms).

    ``memory_limit`` (bytes, 0: none): the child is killed once its resident memory passes
    it, and :class:`OverMemory` is raised."""
    import threading

    env = dict(os.environ)
    env.setdefault("TQDM_DISABLE", "1")
    stopped = threading.Event()
    killed = []
    peak_anon = [0]

    def watch(pid: int) -> None:
        while not stopped.wait(0.05):
            resident, anon = _resident_bytes(pid)
            peak_anon[0] = max(peak_anon[0], anon)
            if memory_limit and resident > memory_limit:
                killed.append(True)
                os.kill(pid, 9)
                return

    with open(log, "w") as out:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        watcher = threading.Thread(target=watch, args=(child.pid,), daemon=True)
        watcher.start()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        stopped.set()
        watcher.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    if killed:
        raise OverMemory(f"over the {memory_limit / 1e9:.1f} GB memory limit after {wall:.0f} s")
    if child.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}):\n{tail}")
    return wall, usage, peak_anon[0]


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
    methods: Sequence[str], base: Path, ft, rounds: int, shard_bytes: int, device: str,
    work: Path, jobs: int = 1, label: str = "", memory_limit: int = 0,
) -> List[Run]:
    """Every method (and the floor) once per round, order rotated per round; all the runs.

    ``ft``: one fine-tune's path or a list of them. ``jobs`` > 1 runs that many children at
    once (only for smoke tests: it spoils timings).
    """
    fine_tunes = list(ft) if isinstance(ft, (list, tuple)) else [ft]
    for method in methods:
        (work / f"{method}.yml").write_text(recipe(method, base, fine_tunes))
    entries = [FLOOR] + list(methods)
    progress = tqdm(total=rounds * len(entries), desc=f"merging{label}", unit="run")

    def one(r: int, method: str) -> Run:
        progress.set_postfix_str(f"round {r + 1}: {method}")
        out = work / f"out-{method}"
        shutil.rmtree(out, ignore_errors=True)
        if method == FLOOR:
            command = [sys.executable, __file__, "--floor-worker", str(out), str(shard_bytes),
                       str(base), *map(str, fine_tunes)]
        else:
            command = mergekit_command(work / f"{method}.yml", out, shard_bytes, device)
        try:
            wall, usage, peak_anon = run_child(command, work / f"{method}.log", memory_limit)
        except OverMemory as error:
            shutil.rmtree(out, ignore_errors=True)
            progress.update()
            tqdm.write(f"{method}: {error}")
            return Run(method, r, math.nan, math.nan, math.nan, math.nan, memory_limit,
                       failed=str(error))
        check_output(out)
        shutil.rmtree(out, ignore_errors=True)
        progress.update()
        return Run(method, r, wall, usage.ru_utime + usage.ru_stime, usage.ru_utime,
                   usage.ru_stime, usage.ru_maxrss * 1024, peak_anon, usage.ru_inblock * 512,
                   usage.ru_oublock * 512)

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
        mine = [run for run in runs if run.method == method and not run.failed]
        if not mine:
            failed = next(run.failed for run in runs if run.method == method)
            med[method] = {"failed": failed, "rounds": 0}
            continue
        med[method] = {
            "wall_s": statistics.median(r.wall_s for r in mine),
            "cpu_s": statistics.median(r.cpu_s for r in mine),
            "sys_s": statistics.median(r.sys_s for r in mine),
            "peak_rss_gb": statistics.median(r.peak_rss_bytes for r in mine) / 1e9,
            "peak_anon_gb": statistics.median(r.peak_anon_bytes for r in mine) / 1e9,
            "read_gb": statistics.median(r.read_bytes for r in mine) / 1e9,
            "written_gb": statistics.median(r.write_bytes for r in mine) / 1e9,
            "rounds": len(mine),
        }
    for method in methods:
        row = med[method]
        for ref, tag in ((REFERENCE, "ta"), (FLOOR, "floor")):
            if ref in med and "failed" not in med[ref] and "failed" not in row:
                row[f"wall_vs_{tag}"] = row["wall_s"] / med[ref]["wall_s"]
                row[f"cpu_vs_{tag}"] = row["cpu_s"] / med[ref]["cpu_s"]
                row[f"rss_vs_{tag}"] = row["peak_rss_gb"] / med[ref]["peak_rss_gb"]
    return med


def targets(med: Dict[str, Dict[str, float]]) -> Dict[str, bool]:
    """The issue's targets, checked on the medians (only where the methods ran)."""
    result: Dict[str, bool] = {}
    if "fapm" in med and REFERENCE in med and "wall_vs_ta" in med["fapm"]:
        result["fapm wall <= 1.5x task_arithmetic"] = med["fapm"]["wall_vs_ta"] <= 1.5
        result["fapm peak RSS <= 1.10x task_arithmetic"] = med["fapm"]["rss_vs_ta"] <= 1.10
        for other in SPARSIFIERS:
            if other in med and "wall_s" in med[other]:
                result[f"fapm faster than {other}"] = med["fapm"]["wall_s"] < med[other]["wall_s"]
    return result


def markdown(med: Dict[str, Dict[str, float]], checks: Dict[str, bool], meta: dict) -> str:
    lines = [
        f"Pair: synthetic Llama, {meta['parameters'] / 1e9:.2f}B parameters per model "
        f"({meta['model']}), bf16, {meta['shards']} shards each; device `{meta['device']}`; "
        f"{meta['rounds']} rounds, medians; output shards of {meta['out_shard_bytes'] / 1e9:g} GB"
        + (f"; {meta['jobs']} runs at a time, so timings mean nothing." if meta["jobs"] > 1 else "."),
        "",
        "| method | wall s | CPU s (sys) | peak RSS GB | peak anon GB | wall / task_arithmetic "
        "| wall / I/O floor | CPU / task_arithmetic | RSS / task_arithmetic |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in med.items():
        if "failed" in row:
            lines.append(f"| `{method}` | stopped: {row['failed']} |" + " |" * 7)
            continue
        lines.append(
            f"| `{method}` | {row['wall_s']:.1f} | {row['cpu_s']:.1f} ({row['sys_s']:.1f}) "
            f"| {row['peak_rss_gb']:.2f} | {row['peak_anon_gb']:.2f} "
            f"| {row.get('wall_vs_ta', float('nan')):.2f} "
            f"| {row.get('wall_vs_floor', float('nan')):.2f} "
            f"| {row.get('cpu_vs_ta', float('nan')):.2f} | {row.get('rss_vs_ta', float('nan')):.2f} |"
        )
    if checks:
        lines += ["", "Targets on these medians:", ""]
        lines += [f"- {'met' if ok else 'MISSED'}: {name}" for name, ok in checks.items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- scaling

def _label(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits, '.', '_' and '-' only")
    return text


def _counts(text: str) -> List[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: positive integers, comma-separated")
    return sorted(set(values))


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> Dict[str, object]:
    """Least squares ``y = intercept + slope * x``: the slope, its standard error (None with
    fewer than 3 points) and the residuals, so a reader sees how straight the growth is."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    intercept = my - slope * mx
    residuals = [y - (intercept + slope * x) for x, y in zip(xs, ys)]
    se = (math.sqrt(sum(r * r for r in residuals) / (n - 2) / sxx) if n > 2 and sxx else None)
    return {"slope": slope, "intercept": intercept, "slope_se": se, "residuals": residuals}


def growth(points: Dict[int, Dict[str, Dict[str, float]]], extrapolate: Optional[int] = None):
    """Per method: the fitted growth of wall time and peak RSS over the points' x values."""
    xs = sorted(points)
    methods = list(points[xs[0]])
    fits: Dict[str, Dict[str, object]] = {}
    for method in methods:
        row: Dict[str, object] = {}
        done = [x for x in xs if "failed" not in points[x].get(method, {"failed": ""})]
        if len(done) < 2:
            continue  # nothing to fit: the method did not finish at two points
        for metric in ("wall_s", "peak_rss_gb"):
            fit = fit_line(done, [points[x][method][metric] for x in done])
            if extrapolate is not None:
                fit["at_" + str(extrapolate)] = fit["intercept"] + fit["slope"] * extrapolate
            row[metric] = fit
        fits[method] = row
    return fits


def scaling_targets(kind: str, points, fits, full_layers: int = 0) -> Dict[str, bool]:
    """The scaling issue's targets on the medians, per point (ratios within one run); at a
    full-size point (``full_layers``) also fapm's absolute peak RSS and 1.1x wall."""
    checks: Dict[str, bool] = {}
    for x, med in sorted(points.items()):
        tag = f"{x} layer(s)" if kind == "layers" else f"{x} fine-tune(s)"
        if any("failed" in med.get(m, {}) for m in ("fapm", REFERENCE, FLOOR)):
            checks[f"{tag}: fapm, task_arithmetic and the floor finish"] = False
            continue
        if kind == "layers" and x == full_layers and "fapm" in med and REFERENCE in med:
            checks[f"{tag} (full size): fapm peak RSS < 4 GB"] = med["fapm"]["peak_rss_gb"] < 4.0
            checks[f"{tag} (full size): fapm wall <= 1.1x task_arithmetic"] = (
                med["fapm"]["wall_vs_ta"] <= 1.1)
        if kind == "layers" and "fapm" in med and REFERENCE in med:
            checks[f"{tag}: fapm wall <= 1.0x task_arithmetic"] = med["fapm"]["wall_vs_ta"] <= 1.0
            checks[f"{tag}: fapm wall <= 1.2x I/O floor"] = med["fapm"]["wall_vs_floor"] <= 1.2
            checks[f"{tag}: fapm peak RSS <= 1.1x task_arithmetic"] = med["fapm"]["rss_vs_ta"] <= 1.1
        if kind == "fine_tunes" and "fapm_ties" in med and "ties" in med:
            ours, theirs = med["fapm_ties"], med["ties"]
            if "failed" in ours or "failed" in theirs:  # the one that finished wins
                note = " (ties stopped at the memory limit)" if "failed" in theirs else ""
                checks[f"{tag}: fapm_ties finishes where ties does{note}"] = "failed" not in ours
                continue
            checks[f"{tag}: fapm_ties wall <= 1.0x ties"] = ours["wall_s"] <= theirs["wall_s"]
            checks[f"{tag}: fapm_ties peak RSS <= 1.0x ties"] = (
                ours["peak_rss_gb"] <= theirs["peak_rss_gb"])
    if kind == "layers" and "fapm" in fits and len(points) > 2:
        fit = fits["fapm"]["peak_rss_gb"]
        checks["fapm peak RSS does not grow with layers (|slope| <= 2 standard errors)"] = (
            abs(fit["slope"]) <= 2 * fit["slope_se"])
    return checks


def scaling_markdown(kind: str, points, fits, checks, meta) -> str:
    unit = "layer" if kind == "layers" else "fine-tune"
    lines = [
        f"Synthetic {meta['shape']} shape ({meta['model']}), bf16, "
        + (f"{meta['base_layers']} layer(s) per model, the base and N fine-tunes merged per "
           "row; " if kind == "fine_tunes" else "the base and one fine-tune; ")
        + f"device `{meta['device']}`; {meta['rounds']} "
        "round(s) per point, methods interleaved, medians; output shards of "
        f"{meta['out_shard_bytes'] / 1e9:g} GB.", "",
        f"| {unit}s | method | wall s | CPU s | peak RSS GB | peak anon GB | read GB "
        "| written GB | wall / task_arithmetic | wall / I/O floor | RSS / task_arithmetic |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x, med in sorted(points.items()):
        for method, row in med.items():
            if "failed" in row:
                lines.append(f"| {x} | `{method}` | stopped: {row['failed']} |" + " |" * 8)
                continue
            lines.append(
                f"| {x} | `{method}` | {row['wall_s']:.1f} | {row['cpu_s']:.1f} "
                f"| {row['peak_rss_gb']:.2f} | {row['peak_anon_gb']:.2f} | {row['read_gb']:.2f} "
                f"| {row['written_gb']:.2f} "
                f"| {row.get('wall_vs_ta', float('nan')):.2f} "
                f"| {row.get('wall_vs_floor', float('nan')):.2f} "
                f"| {row.get('rss_vs_ta', float('nan')):.2f} |")
    far = meta.get("extrapolate")
    lines += ["", f"Inputs: {meta['inputs_gb']:.1f} GB of safetensors generated for this run"
              + (" (deleted afterwards)." if meta.get("deleted") else ".")]
    lines += [] if not fits else ["", f"Growth per added {unit} (least squares over {len(points)} points; "
              "residuals in the units of the column)" + (f" and the fit at {far} {unit}s:" if far
                                                        else ":"), "",
              f"| method | wall s per {unit} | wall residuals | peak RSS GB per {unit} (SE) "
              "| RSS residuals" + (f" | wall s at {far} | RSS GB at {far} |" if far else " |"),
              "|---|---|---|---|---|" + ("---|---|" if far else "")]
    for method, row in fits.items():
        wall, rss = row["wall_s"], row["peak_rss_gb"]
        se = f" ({rss['slope_se']:.3f})" if rss["slope_se"] is not None else ""
        cells = [f"`{method}`", f"{wall['slope']:.2f}",
                 ", ".join(f"{r:+.2f}" for r in wall["residuals"]), f"{rss['slope']:.3f}{se}",
                 ", ".join(f"{r:+.3f}" for r in rss["residuals"])]
        if far:
            cells += [f"{wall['at_' + str(far)]:.0f}", f"{rss['at_' + str(far)]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if checks:
        lines += ["", "Targets:", ""]
        lines += [f"- {'met' if ok else 'MISSED'}: {name}" for name, ok in checks.items()]
    return "\n".join(lines) + "\n"


def plot_growth(kind: str, points, path: Path) -> None:
    """Wall time and peak RSS against the number of layers or of fine-tunes, a line per
    method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted(points)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in points[xs[0]]:
        done = [x for x in xs if "failed" not in points[x].get(method, {"failed": ""})]
        for axis, metric in zip(axes, ("wall_s", "peak_rss_gb")):
            axis.plot(done, [points[x][method][metric] for x in done], marker="o", label=method)
    label = "layers" if kind == "layers" else "fine-tunes merged"
    for axis, title in zip(axes, ("wall time (s)", "peak RSS (GB)")):
        axis.set_xlabel(label)
        axis.set_title(title)
        axis.set_xticks(xs)
        axis.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling_main(args, shape: ModelShape, argv) -> int:
    """``--layers`` and/or ``--fine-tunes``: one point per count, the growth fitted."""
    from dataclasses import replace

    rounds = args.rounds or 1
    shard_bytes = int(args.shard_gb * 1e9) if not args.quick else 4_000_000
    out_dir = args.out or (args.cache / "quick-results" if args.quick
                           else REPO / "docs" / "benchmarks")
    doc = None
    if not args.no_doc and not args.quick and args.device == "cpu":
        doc = args.doc or REPO / "docs" / "benchmarks.md"
    jobs = args.jobs or (2 if args.quick else 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    name = "quick" if args.quick else args.shape
    plans = []
    if args.layers:
        plans.append(("layers", args.layers))
    if args.fine_tunes:
        plans.append(("fine_tunes", args.fine_tunes))
    for kind, counts in plans:
        methods = args.methods or list(LAYER_METHODS if kind == "layers" else FINE_TUNE_METHODS)
        points: Dict[int, Dict[str, Dict[str, float]]] = {}
        all_runs: List[Run] = []
        with tempfile.TemporaryDirectory(prefix="fapm-bench-", dir=args.cache) as tmp:
            work = Path(tmp)
            if kind == "layers":
                base, (ft,) = build_models(replace(shape, layers=max(counts)), args.cache,
                                           shard_bytes, per_layer=True)
            else:
                base, fts = build_models(replace(shape, layers=args.fine_tune_layers),
                                         args.cache, shard_bytes, fine_tunes=max(counts))
            generated = base.parent
            inputs_gb = sum(f.stat().st_size for f in generated.rglob("*.safetensors")) / 1e9
            for count in counts:
                if kind == "layers":
                    inputs = (layer_view(base, count, work / f"view-{count}" / "base"),
                              [layer_view(ft, count, work / f"view-{count}" / "ft")])
                else:
                    inputs = (base, fts[:count])
                runs = run_all(methods, inputs[0], inputs[1], rounds, shard_bytes, args.device,
                               work, jobs, label=f" ({count} {kind.replace('_', '-')})",
                               memory_limit=int(args.memory_limit_gb * 1e9))
                points[count] = summarize(runs)
                all_runs += [dict(asdict(r), count=count) for r in runs]
            if args.delete_after:
                shutil.rmtree(generated)
        extrapolate = (shape.layers if kind == "layers" and not args.quick
                       and max(counts) < shape.layers else None)
        fits = growth(points, extrapolate) if len(points) > 1 else {}
        checks = scaling_targets(kind, points, fits, 0 if args.quick else shape.layers)
        stem = "layers" if kind == "layers" else "fine-tunes"
        stem += f"-{name}" + (f"-{counts[0]}" if len(counts) == 1 else "")
        stem += f"-{args.label}" if args.label else ""
        meta = {"shape": name, "model": ", ".join(f"{k} {v}" for k, v in asdict(shape).items()
                                                 if k != "layers"),
                "base_layers": args.fine_tune_layers, "device": args.device, "rounds": rounds,
                "out_shard_bytes": shard_bytes, "quick": args.quick, "jobs": jobs,
                "extrapolate": extrapolate, "counts": counts, "inputs_gb": inputs_gb,
                "deleted": args.delete_after}
        meta.update(_report.machine(args.device))
        meta["command"] = _report.command_line(
            sys.argv if argv is None else ["benchmarks/bench_merge.py", *argv])
        table = scaling_markdown(kind, points, fits, checks, meta)
        if len(points) > 1:
            plot_growth(kind, points, out_dir / f"{stem}.png")
            table += f"\n![wall and peak RSS, {stem}](benchmarks/{stem}.png)\n"
        result = {"meta": meta, "points": {str(x): med for x, med in points.items()},
                  "growth": fits, "targets": checks, "runs": all_runs}
        _report.publish(out_dir, stem, result, table, meta, doc)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one round (smoke test)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, 1 with --quick)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        help="methods to run (default: all but fapm_ties, spectral and lowrank; in a scaling run "
                        f"{', '.join(LAYER_METHODS)} with --layers, {', '.join(FINE_TUNE_METHODS)} "
                        "with --fine-tunes)")
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
    parser.add_argument("--shape", choices=list(SHAPES), default="tinyllama",
                        help="the synthetic models' shape (default tinyllama: 1.1B)")
    parser.add_argument("--layers", type=_counts, help="scaling run: these numbers of layers "
                        "of --shape (e.g. 1,2,4), one fine-tune; growth fitted per layer")
    parser.add_argument("--fine-tunes", type=_counts, help="scaling run: merge this many "
                        "fine-tunes (e.g. 1,2,4,8) of a --fine-tune-layers slice of --shape")
    parser.add_argument("--fine-tune-layers", type=int, default=1,
                        help="layers of the slice --fine-tunes merges (default 1)")
    parser.add_argument("--memory-limit-gb", type=float, default=0.8 * _report.ram_gb(),
                        help="stop a merge whose resident memory passes this (default: 80%% of "
                        "RAM) and record it as stopped, so one method cannot take the machine")
    parser.add_argument("--delete-after", action="store_true", help="delete the generated "
                        "models after a scaling run (a full-size pair is 32 GB)")
    parser.add_argument("--label", type=_label, help="suffix of a scaling run's files and docs section "
                        "(e.g. the machine), so that a run elsewhere sits beside, not over, "
                        "the published one")
    parser.add_argument("--floor-worker", nargs="+", metavar="OUT BYTES BASE FT",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.floor_worker:
        out, size, base, *fine_tunes = args.floor_worker
        io_floor(Path(base), [Path(f) for f in fine_tunes], Path(out), int(size))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "bench_merge: --device cuda needs a CUDA build of torch and a visible GPU; "
                       f"torch {torch.__version__} reports none (torch.cuda.is_available() is "
                       "False).\n")

    shape = QUICK if args.quick else SHAPES[args.shape]
    if args.layers or args.fine_tunes:
        return scaling_main(args, shape, argv)
    rounds = args.rounds or (1 if args.quick else 3)
    shard_bytes = int(args.shard_gb * 1e9) if not args.quick else 4_000_000
    out_dir = args.out or (args.cache / "quick-results" if args.quick else REPO / "docs" / "benchmarks")
    doc = None
    if not args.no_doc:
        doc = args.doc or (None if args.quick or args.device != "cpu" else REPO / "docs" / "benchmarks.md")

    base, (ft,) = build_models(shape, args.cache, shard_bytes)
    with tempfile.TemporaryDirectory(prefix="fapm-bench-", dir=args.cache) as tmp:
        jobs = args.jobs or (2 if args.quick else 1)
        methods = args.methods or list(PAIR_METHODS)
        runs = run_all(methods, base, ft, rounds, shard_bytes, args.device, Path(tmp), jobs,
                       memory_limit=int(args.memory_limit_gb * 1e9))
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
    _report.publish(out_dir, "merge", result, table, meta, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
