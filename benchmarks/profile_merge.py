"""Where a `mergekit-yaml` run spends its time: imports, the method's kernel, reading, writing.

Runs ``task_arithmetic`` and ``fapm`` on the pair of ``bench_merge.py`` (built if missing),
each in its own process under ``cProfile``, and splits the run into mergekit's import, the
merge method's ``merge_group``, mergekit's lazy reads and the safetensors serialisation of the
output. Writes ``profile.json`` / ``profile.md`` under ``--out`` (default docs/benchmarks) and
the ``profile`` section of docs/benchmarks.md.

    python benchmarks/profile_merge.py            # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402
import bench_merge  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PARTS = {
    "import": "importing mergekit (transformers, peft, ...)",
    "kernel": "the method's `merge_group` (the merge arithmetic)",
    "write": "`safetensors` serialisation of the output",
    "read": "reading the inputs (mergekit's lazy loader)",
}


def profile_worker(recipe: Path, out: Path, shard_bytes: int) -> Dict[str, float]:
    """Run mergekit-yaml's entry point in this process under cProfile; seconds per part."""
    sys.argv = ["mergekit-yaml", str(recipe), str(out), "--no-copy-tokenizer",
                "--no-write-model-card", "--out-shard-size", str(shard_bytes), "--quiet"]
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    from mergekit.scripts.run_yaml import main

    main(standalone_mode=False)
    profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats

    def cumulative(test) -> float:  # summed over matching functions (none nest in another)
        return sum(row[3] for (file, _, name), row in stats.items() if test(file, name))

    return {
        "total": total,
        "import": cumulative(lambda f, n: n == "<module>" and f.endswith("run_yaml.py")),
        "kernel": cumulative(lambda f, n: n == "merge_group"),
        "write": cumulative(lambda f, n: n == "_save_st" and "tensor_writer" in f),
        "read": cumulative(lambda f, n: n == "get_tensor" and "lazy_tensor_loader" in f),
    }


def markdown(parts: Dict[str, Dict[str, float]]) -> str:
    methods = list(parts)
    lines = [
        "One `mergekit-yaml` run of each under `cProfile`, in one process (interpreter start "
        "and exit not included; profiling adds some overhead to Python-heavy parts).",
        "",
        "| part of the run | " + " | ".join(f"`{m}`" for m in methods) + " |",
        "|---|" + "---|" * len(methods),
        "| whole run in the process | " + " | ".join(f"{parts[m]['total']:.1f} s" for m in methods) + " |",
    ]
    for key, label in PARTS.items():
        lines.append(f"| {label} | " + " | ".join(f"{parts[m][key]:.1f} s" for m in methods) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny pair")
    parser.add_argument("--cache", type=Path, default=_report.default_cache())
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        recipe, out, size = args.worker
        print(json.dumps(profile_worker(Path(recipe), Path(out), int(size))))
        return 0

    shape = bench_merge.QUICK if args.quick else bench_merge.FULL
    shard_bytes = 4_000_000 if args.quick else int(1e9)
    base, (ft,) = bench_merge.build_models(shape, args.cache, shard_bytes)
    parts: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fapm-profile-", dir=args.cache) as tmp:
        for method in ("task_arithmetic", "fapm"):
            recipe = Path(tmp) / f"{method}.yml"
            recipe.write_text(bench_merge.recipe(method, base, ft))
            out = Path(tmp) / "out"
            done = subprocess.run(
                [sys.executable, __file__, "--worker", str(recipe), str(out), str(shard_bytes)],
                capture_output=True, text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-3000:])
            parts[method] = json.loads(done.stdout.strip().splitlines()[-1])
            shutil.rmtree(out, ignore_errors=True)
    meta = _report.machine("cpu")
    meta["command"] = _report.command_line(
        sys.argv if argv is None else ["benchmarks/profile_merge.py", *argv]
    )
    table = markdown(parts)
    out_dir = args.out or (args.cache / "quick-results" if args.quick else REPO / "docs" / "benchmarks")
    doc = None if args.no_doc or args.quick else REPO / "docs" / "benchmarks.md"
    _report.publish(out_dir, "profile", {"meta": meta, "parts": parts}, table, meta, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
