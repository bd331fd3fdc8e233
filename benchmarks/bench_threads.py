"""FAPM's kernel at 1 vs N torch threads, on Llama-3-8B tensor shapes, beside mergekit's own.

The kernel runs at torch's current thread count (mergekit's ``--num-threads``, else torch's
default) and never changes it. This prints what that choice costs, per tensor, for FAPM
(``fapm_prune``; its fused pass in C and, for comparison, the torch pass it falls back to)
and for mergekit's ``task_arithmetic`` arithmetic and TIES's magnitude sparsification
(``mergekit.sparsify``) on the same pair, at each thread count, interleaved (median of
``--repeats``)::

    python benchmarks/bench_threads.py                 # 4096 x 14336 (an MLP matrix)
    python benchmarks/bench_threads.py --embedding     # and 128256 x 4096 (the embedding)
    python benchmarks/bench_threads.py --quick         # smoke test, small tensor

Ratios within a row are what carry over between machines; the load of the machine matters
(``os.getloadavg`` is printed with every row).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from unittest import mock

import torch


def pair(shape, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator) * 0.02
    finetuned = base + torch.randn(shape, generator=generator) * 0.002
    return base.bfloat16(), finetuned.bfloat16()


def methods(base, finetuned):
    from mergekit.sparsify import SparsificationMethod, sparsify

    from fapm_merge import kernel

    def task_arithmetic():
        delta = finetuned.float() - base.float()
        return (base.float() + delta).to(base.dtype)

    def ties():
        delta = finetuned.float() - base.float()
        kept = sparsify(delta, density=0.1, method=SparsificationMethod.magnitude)
        return (base.float() + kept).to(base.dtype)

    def fapm_torch_pass():  # the fallback without a C compiler (FAPM_MERGE_NATIVE=0)
        with mock.patch.object(kernel.native, "applies", return_value=False):
            return kernel.fapm_prune(base, finetuned, 0.9)

    fapm = {"fapm 0.9": lambda: kernel.fapm_prune(base, finetuned, 0.9)}
    if kernel.native.library() is not None:
        fapm = {"fapm 0.9 (C pass)": fapm["fapm 0.9"], "fapm 0.9 (torch pass)": fapm_torch_pass}
    return {"task_arithmetic": task_arithmetic, "ties (magnitude 0.1)": ties, **fapm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--embedding", action="store_true", help="also 128256 x 4096")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}")
    args = parser.parse_args()
    shapes = [(512, 1024)] if args.quick else [(14336, 4096)]
    if args.embedding and not args.quick:
        shapes.append((128256, 4096))
    counts = [int(t) for t in args.threads.split(",")]
    before = torch.get_num_threads()
    print(f"cores: {os.cpu_count()}; torch {torch.__version__}; bf16 inputs; seconds per "
          f"tensor, median of {1 if args.quick else args.repeats}")
    print("| shape | method | " + " | ".join(f"{n} thread(s)" for n in counts)
          + " | load average |")
    print("|---|---|" + "---|" * len(counts) + "---|")
    for shape in shapes:
        base, finetuned = pair(shape)
        times = {}
        for _ in range(1 if args.quick else args.repeats):
            for name, run in methods(base, finetuned).items():
                for n in counts:  # interleaved, so drifting load hits every cell alike
                    torch.set_num_threads(n)
                    began = time.perf_counter()
                    run()
                    times.setdefault((name, n), []).append(time.perf_counter() - began)
        for name in methods(base, finetuned):
            cells = [f"{statistics.median(times[(name, n)]):.2f}" for n in counts]
            print(f"| {shape[0]} x {shape[1]} | {name} | " + " | ".join(cells)
                  + f" | {os.getloadavg()[0]:.1f} |")
    torch.set_num_threads(before)


if __name__ == "__main__":
    main()
