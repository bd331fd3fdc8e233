"""``kernel.keep_top_k`` of the working tree against the one at an earlier commit, in one process.

bench_selection.py runs each method in its own process, so its absolute times move with the
machine between runs; a regression check needs both versions side by side. This loads the
kernel module of ``--rev`` from git (``git show REV:fapm_merge/kernel.py``) beside the current
one and times them interleaved on the same scores (top 10% of a standard normal float32
tensor, exactly k kept by both).

    python benchmarks/compare_selection.py --rev 31b7179
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(4096, 14336), (128256, 4096)]


def kernel_at(rev: str, folder: Path):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:fapm_merge/kernel.py"],
                            capture_output=True, text=True, check=True).stdout
    path = folder / "kernel_at_rev.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("kernel_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the earlier commit")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from fapm_merge import kernel

    with tempfile.TemporaryDirectory() as folder:
        versions = {args.rev: kernel_at(args.rev, Path(folder)), "working tree": kernel}
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
              f"{args.repeats}, interleaved")
        print(f"| shape | {args.rev} s | working tree s | ratio |\n|---|---|---|---|")
        for shape in SHAPES:
            scores = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            k = round(0.1 * scores.numel())
            times = {name: [] for name in versions}
            for _ in range(args.repeats):
                for name, module in versions.items():
                    start = time.perf_counter()
                    mask = module.keep_top_k(scores, k)
                    times[name].append(time.perf_counter() - start)
                    if int(mask.sum()) != k:
                        print(f"{name} kept {int(mask.sum())} of k = {k}", file=sys.stderr)
                        return 1
            old, new = (statistics.median(times[name]) for name in versions)
            print(f"| {shape[0]} x {shape[1]} | {old:.3f} | {new:.3f} | {new / old:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
