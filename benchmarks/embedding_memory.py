"""Peak extra memory of one FAPM prune of a Llama-3 embedding (128256 x 4096, bf16).

    python benchmarks/embedding_memory.py [--rows 128256] [--cols 4096]

Each measurement runs in a fresh subprocess: inputs are built, the kernel's peak resident set
counter is reset (Linux /proc/self/clear_refs), the kernel runs, and the peak minus the resident
size before it is the extra memory. Printed as a multiple of the tensor's float32 size, beside
mergekit's task-arithmetic arithmetic (`base + (ft - base)`) on the same tensor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
rows, cols, which = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
base = torch.empty(rows, cols, dtype=torch.bfloat16)
ft = torch.empty_like(base)
for start in range(0, rows, 4096):  # chunked, so building the inputs has no big temporaries
    block = torch.randn(min(4096, rows - start), cols, generator=g) * 0.02
    base[start:start + 4096] = block
    ft[start:start + 4096] = block + torch.randn(block.shape, generator=g) * 2e-4
    del block

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

from fapm_merge.kernel import fapm_prune
import ctypes, gc
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed input-building memory back to the OS
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = status("VmRSS:")
started = time.perf_counter()
if which == "fapm":
    out = fapm_prune(base, ft, 0.9)
else:  # what mergekit's task_arithmetic does per tensor (float32 delta, add back, cast)
    out = (base.float() + (ft.float() - base.float())).to(base.dtype)
elapsed = time.perf_counter() - started
print(json.dumps({"extra": status("VmHWM:") - before, "seconds": elapsed}))
"""


def measure(rows: int, cols: int, which: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(rows), str(cols), which],
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128256)
    parser.add_argument("--cols", type=int, default=4096)
    args = parser.parse_args()
    fp32 = args.rows * args.cols * 4
    print(f"tensor {args.rows} x {args.cols} bf16; float32 size {fp32 / 2**30:.2f} GiB")
    for which in ("task_arithmetic", "fapm"):
        figures = measure(args.rows, args.cols, which)
        print(f"{which:>16}: extra {figures['extra'] / 2**30:.2f} GiB = "
              f"{figures['extra'] / fp32:.2f}x float32 tensor, {figures['seconds']:.1f} s")


if __name__ == "__main__":
    main()
