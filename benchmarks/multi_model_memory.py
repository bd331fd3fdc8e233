"""Peak memory of one tensor merged from several fine-tunes: fapm_ties's kernel vs mergekit ties.

    python benchmarks/multi_model_memory.py fapm 3
    python benchmarks/multi_model_memory.py mergekit 3

One process per run: it builds an 8192 x 8192 bf16 base and N fine-tunes, then merges them
(normalize on, TIES ``sum``; FAPM sparsity 0.9, mergekit's magnitude density 0.1) and prints
the resident memory before the merge and the process's peak (``VmHWM``, which also covers
building the inputs). docs/benchmarks.md quotes it; the "before" column there is this script
run at commit 4f229b3 (before the multi-model path kept its deltas in one buffer).
"""

from __future__ import annotations

import sys
import time

import torch


def _status(key: str) -> float:
    """A /proc/self/status memory field in GiB."""
    with open("/proc/self/status") as handle:
        line = next(row for row in handle if row.startswith(key))
    return int(line.split()[1]) / 2**20


def main() -> None:
    which, models = sys.argv[1], int(sys.argv[2])
    generator = torch.Generator().manual_seed(0)
    base = (torch.randn(8192, 8192, generator=generator) * 0.02).bfloat16()
    finetuned = [(base.float() + torch.randn(8192, 8192, generator=generator) * 0.002).bfloat16()
                 for _ in range(models)]
    before = _status("VmRSS")
    began = time.perf_counter()
    if which == "mergekit":  # the body of mergekit's ties, on the same tensors
        from mergekit.merge_methods.generalized_task_arithmetic import get_mask
        from mergekit.sparsify import SparsificationMethod, sparsify

        deltas = torch.stack([sparsify(f - base, density=0.1,
                                       method=SparsificationMethod.magnitude) for f in finetuned])
        weights = torch.ones(models, dtype=deltas.dtype).view(-1, 1, 1)
        weighted = deltas * weights
        mask = get_mask(weighted, method="sum", mask_dtype=base.dtype)
        mixed = (weighted * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
        (base + mixed / divisor).to(base.dtype)
    else:
        from fapm_merge import kernel

        kernel.merge_task_vectors(base, finetuned, sparsity=[0.9] * models,
                                  weight=[1.0] * models, score="fapm", normalize=True,
                                  consensus="sum")
    print(f"{which}, {models} fine-tunes: resident before the merge {before:.2f} GiB, "
          f"peak {_status('VmHWM'):.2f} GiB, {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
