"""Microbenchmark of exact top-k selection: FAPM's ``kernel.keep_top_k`` against torch's own.

Keeping the top 10% of one float32 tensor (k = floor(0.1 n)) of two Llama-sized shapes,
4096 x 14336 (an MLP projection of an 8B model) and 128256 x 4096 (its embedding):

- ``keep_top_k``: the kernel's selection (sampled bracket, one chunked pass, exact ties);
- ``argsort``: a full descending sort, then the first k indices, as mergekit's magnitude
  pruning (``ties``) does;
- ``topk``: ``torch.topk(sorted=False)``, then a mask from its indices;
- ``kthvalue``: ``torch.kthvalue`` for the threshold, then ``scores >= threshold`` (exact
  threshold, but ties at it are not resolved, so the count can exceed k).

Every (method, shape) runs in a fresh process, so its peak memory is its own: extra memory is
the peak RSS (``ru_maxrss``; on CUDA ``max_memory_allocated``) minus the baseline with the
input in memory. A separate process checks exactness: ``keep_top_k``'s mask against the first
k indices of a stable descending full sort (the reference set: ties go to the lowest index).

Usage::

    python benchmarks/bench_selection.py                 # CPU, writes docs/benchmarks/selection.*
    python benchmarks/bench_selection.py --quick --out /tmp/sel-quick   # smoke test, in process
    python benchmarks/bench_selection.py --device cuda --out docs/benchmarks/cuda
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FULL_SHAPES = [(4096, 14336), (128256, 4096)]
QUICK_SHAPES = [(512, 1792)]
METHODS = ("keep_top_k", "argsort", "topk", "kthvalue")
DENSITY = 0.1


def make_scores(shape: Tuple[int, int], device: str) -> torch.Tensor:
    """Deterministic standard-normal float32 scores, filled in place (no temporary)."""
    generator = torch.Generator(device=device).manual_seed(shape[0] * 7919 + shape[1])
    return torch.empty(shape, dtype=torch.float32, device=device).normal_(generator=generator)


def select(method: str, scores: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask of the kept elements by ``method``."""
    from fapm_merge import kernel

    if method == "keep_top_k":
        return kernel.keep_top_k(scores, k)
    flat = scores.reshape(-1)
    if method == "kthvalue":
        threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
        return scores >= threshold
    if method == "argsort":
        kept = torch.argsort(flat, descending=True)[:k]
    elif method == "topk":
        kept = torch.topk(flat, k, sorted=False).indices
    else:
        raise ValueError(method)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[kept] = True
    return mask.view(scores.shape)


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_worker(method: str, shape: Tuple[int, int], repeats: int, device: str) -> dict:
    """Runs in its own process: time ``repeats`` selections, report the extra peak memory."""
    warm = make_scores((256, 4096), device)  # thread pools, allocator, first-call costs
    select(method, warm, int(DENSITY * warm.numel()))
    del warm
    scores = make_scores(shape, device)
    k = math.floor(DENSITY * scores.numel())
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = _peak_bytes(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mask = select(method, scores, k)
        _sync(device)
        times.append(time.perf_counter() - start)
        kept = int(torch.count_nonzero(mask))  # (mask.sum() would make an int64 copy)
        del mask
    return {
        "method": method,
        "shape": list(shape),
        "k": k,
        "kept": kept,
        "times_s": times,
        "time_s": statistics.median(times),
        "extra_bytes": max(0, _peak_bytes(device) - baseline),
        "tensor_bytes": scores.numel() * 4,
        "threads": torch.get_num_threads(),
    }


def verify_worker(shape: Tuple[int, int], device: str) -> dict:
    """keep_top_k's mask against a stable descending full sort, and the other methods' sets."""
    scores = make_scores(shape, device)
    flat = scores.reshape(-1)
    k = math.floor(DENSITY * flat.numel())
    ours = select("keep_top_k", scores, k).reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    reference = torch.zeros_like(ours)
    reference[order] = True
    threshold = flat[order[-1]].item()
    del order
    result = {
        "shape": list(shape),
        "keep_top_k_equals_stable_sort": bool(torch.equal(ours, reference)),
        "keep_top_k_count": int(torch.count_nonzero(ours)),
        "k": k,
        "ties_at_threshold": int(torch.count_nonzero(flat == threshold)),
    }
    del ours
    for method in ("topk", "kthvalue"):
        mask = select(method, scores, k).reshape(-1)
        result[f"{method}_equals_stable_sort"] = bool(torch.equal(mask, reference))
        del mask
    return result


def run_worker(args: List[str]) -> dict:
    """Run this script as a worker subprocess and parse its one-line JSON answer."""
    command = [sys.executable, __file__, *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(rows: Sequence[dict], checks: Sequence[dict], meta: dict) -> str:
    lines = [
        f"Top {DENSITY:.0%} of one float32 tensor (standard normal), device `{meta['device']}`; "
        f"median of {meta['repeats']} runs per process (every method on the largest tensor: "
        f"{'one run' if meta['large_repeats'] == 1 else str(meta['large_repeats']) + ' runs'}); "
        "extra memory = peak minus the baseline with the input loaded, each method in a fresh "
        "process."
        + (" Quick mode: all in one process, so the figures mean nothing." if meta["quick"] else ""),
        "",
        "| shape | method | time s | extra memory GB | extra / tensor (fp32) | speed-up vs argsort "
        "| kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape in dict.fromkeys(tuple(r["shape"]) for r in rows):
        mine = [r for r in rows if tuple(r["shape"]) == shape]
        argsort = next((r for r in mine if r["method"] == "argsort"), None)
        for r in mine:
            speedup = argsort["time_s"] / r["time_s"] if argsort else float("nan")
            lines.append(
                f"| {shape[0]} x {shape[1]} | `{r['method']}` | {r['time_s']:.3f} "
                f"| {r['extra_bytes'] / 1e9:.2f} | {r['extra_bytes'] / r['tensor_bytes']:.2f} "
                f"| {speedup:.1f} | {r['kept']} (k = {r['k']}) |"
            )
    lines += ["", "Exactness (each against the first k of a stable descending full sort):", ""]
    for c in checks:
        lines.append(
            f"- {c['shape'][0]} x {c['shape'][1]}: `keep_top_k` "
            f"{'identical' if c['keep_top_k_equals_stable_sort'] else 'DIFFERENT'} "
            f"({c['keep_top_k_count']} kept, {c['ties_at_threshold']} element(s) equal to the "
            f"threshold); `topk` {'identical' if c['topk_equals_stable_sort'] else 'different'}; "
            f"`kthvalue` threshold mask "
            f"{'identical' if c['kthvalue_equals_stable_sort'] else 'different'}"
        )
    targets = meta.get("targets", {})
    if targets:
        lines += ["", "Targets:", ""]
        lines += [f"- {'met' if ok else 'MISSED'}: {name}" for name, ok in targets.items()]
    return "\n".join(lines) + "\n"


def targets(rows: Sequence[dict], checks: Sequence[dict]) -> Dict[str, bool]:
    result: Dict[str, bool] = {}
    for shape in dict.fromkeys(tuple(r["shape"]) for r in rows):
        mine = {r["method"]: r for r in rows if tuple(r["shape"]) == shape}
        ours = mine.get("keep_top_k")
        if ours is None:
            continue
        tag = f"{shape[0]} x {shape[1]}"
        if "argsort" in mine:
            result[f"{tag}: keep_top_k >= 10x faster than argsort"] = (
                mine["argsort"]["time_s"] >= 10 * ours["time_s"]
            )
        result[f"{tag}: keep_top_k extra memory <= 1.5x the tensor"] = (
            ours["extra_bytes"] <= 1.5 * ours["tensor_bytes"]
        )
    for c in checks:
        result[f"{c['shape'][0]} x {c['shape'][1]}: keep_top_k exact"] = c[
            "keep_top_k_equals_stable_sort"
        ]
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, one run (smoke test)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, help="runs per process (default 3, 1 with --quick)")
    parser.add_argument("--large-repeats", type=int, default=1,
                        help="runs per process for the 128256 x 4096 tensor (default 1)")
    parser.add_argument("--skip-large-argsort", action="store_true",
                        help="skip argsort and the reference sort on 128256 x 4096 (~75 s, +10 GB)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--jobs", type=int, help="worker processes at a time (default 1)")
    parser.add_argument("--out", type=Path, help="results folder (default docs/benchmarks; "
                        "with --quick a scratch folder under the cache)")
    parser.add_argument("--doc", type=Path, help="doc whose results section is regenerated "
                        "(default docs/benchmarks.md for a full CPU run)")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--time-worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--verify-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.time_worker:
        method, rows, cols, repeats = args.time_worker
        print(json.dumps(time_worker(method, (int(rows), int(cols)), int(repeats), args.device)))
        return 0
    if args.verify_worker:
        rows, cols, device = args.verify_worker
        print(json.dumps(verify_worker((int(rows), int(cols)), device)))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "bench_selection: --device cuda needs a CUDA build of torch and a "
                       f"visible GPU; torch {torch.__version__} reports none.\n")

    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    repeats = args.repeats or (1 if args.quick else 3)
    large = max(shapes, key=lambda s: s[0] * s[1])
    jobs = args.jobs or 1
    tasks: List[Tuple[str, List[str]]] = []
    for shape in shapes:
        for method in args.methods:
            if shape == large and not args.quick and method == "argsort" and args.skip_large_argsort:
                continue
            r = args.large_repeats if (shape == large and not args.quick) else repeats
            tasks.append(("time", ["--device", args.device, "--time-worker", method,
                                   str(shape[0]), str(shape[1]), str(r)]))
        if not (shape == large and not args.quick and args.skip_large_argsort):
            tasks.append(("verify", ["--verify-worker", str(shape[0]), str(shape[1]), args.device]))

    rows, checks = [], []
    with tqdm(total=len(tasks), desc="selection", unit="run") as progress:
        def run(task):
            if args.quick:  # in this process: quicker; the memory figures then mean nothing
                inner = parser.parse_args(task[1])
                result = (time_worker(inner.time_worker[0], tuple(map(int, inner.time_worker[1:3])),
                                      int(inner.time_worker[3]), inner.device)
                          if task[0] == "time" else
                          verify_worker(tuple(map(int, inner.verify_worker[:2])),
                                        inner.verify_worker[2]))
            else:
                result = run_worker(task[1])
            progress.update()
            return task[0], result

        with ThreadPoolExecutor(jobs) as pool:
            for kind, result in pool.map(run, tasks):
                (rows if kind == "time" else checks).append(result)

    meta = {"device": args.device, "repeats": repeats, "large_repeats": args.large_repeats,
            "quick": args.quick, "shapes": [list(s) for s in shapes]}
    meta.update(_report.machine(args.device))
    meta["command"] = _report.command_line(
        sys.argv if argv is None else ["benchmarks/bench_selection.py", *argv]
    )
    meta["targets"] = targets(rows, checks)
    table = markdown(rows, checks, meta)
    out_dir = args.out or (_report.default_cache() / "quick-results" if args.quick
                           else REPO / "docs" / "benchmarks")
    doc = None
    if not args.no_doc:
        doc = args.doc or (None if args.quick or args.device != "cpu"
                           else REPO / "docs" / "benchmarks.md")
    _report.publish(out_dir, "selection", {"meta": meta, "runs": rows, "exactness": checks},
                    table, meta, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
