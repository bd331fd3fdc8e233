"""Where a merge's memory peak comes from: resident memory split into anonymous and file-backed.

    python benchmarks/trace_memory.py BASE FINE_TUNE [--methods fapm task_arithmetic]

Runs each method through mergekit in a fresh process (bf16, 1 GB output shards, as
bench_merge.py does) while a thread samples /proc/self/status every 20 ms, and prints, per
output tensor, the largest resident set seen while it was being produced (anonymous and
file-backed parts at that moment). The inputs are memory-mapped safetensors, so their pages
count in the resident set while a tensor is read: clean file-backed pages the kernel can drop,
unlike the anonymous memory (outputs, temporaries, what mergekit's writer holds). BASE and
FINE_TUNE: e.g. the cached 1-layer Llama-3-8B slice that ``bench_merge.py --shape llama3-8b
--layers 1`` generates (under ``~/.cache/fapm-merge-bench``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
import yaml
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import SaveTensor
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

def sample():
    found = {}
    with open("/proc/self/status") as handle:
        for row in handle:
            if row.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                found[row.split(":")[0]] = int(row.split()[1]) * 1024
    return found

method, base, ft, out = sys.argv[1:5]
current = {"largest": {"VmRSS": 0}}
rows = []
lock = threading.Lock()
done = threading.Event()

def watch():
    while not done.wait(0.02):
        now = sample()
        with lock:
            if now["VmRSS"] > current["largest"]["VmRSS"]:
                current["largest"] = now

save = SaveTensor.execute
def traced(self, writer, tensor):
    # a tensor is saved right after it is produced: the peak since the last save is its own
    with lock:
        rows.append({"tensor": self.tensor_name, **current["largest"]})
    result = save(self, writer, tensor)
    with lock:  # the next window starts after the save (which may flush a shard)
        current["largest"] = sample()
    return result
SaveTensor.execute = traced

config = MergeConfiguration.model_validate(yaml.safe_load(
    f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {ft}\n"
    + ("    parameters: {weight: 1.0}\n" if method == "task_arithmetic" else "")
    + "dtype: bfloat16\n"))
threading.Thread(target=watch, daemon=True).start()
run_merge(config, out, MergeOptions(out_shard_size=10**9, lazy_unpickle=False, quiet=True))
done.set()
print(json.dumps(rows))
"""


def trace(method: str, base: Path, ft: Path) -> list:
    """Per output tensor (in save order): the largest resident set while it was produced."""
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", CHILD, method, str(base), str(ft), out],
                              capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("fine_tune", type=Path)
    parser.add_argument("--methods", nargs="+", default=["fapm", "task_arithmetic"])
    parser.add_argument("--top", type=int, default=3, help="tensors shown per method")
    args = parser.parse_args()
    gb = 1e9
    print("| method | tensor | peak RSS GB | anonymous GB | file-backed GB |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        rows = sorted(trace(method, args.base, args.fine_tune), key=lambda r: -r["VmRSS"])
        for row in rows[:args.top]:
            print(f"| `{method}` | `{row['tensor']}` | {row['VmRSS'] / gb:.2f} "
                  f"| {row['RssAnon'] / gb:.2f} | {row['RssFile'] / gb:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
