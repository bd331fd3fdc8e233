"""Regenerates the "Inspect a fine-tune" example of README.md from the demo models.

    python docs/inspect_example.py [WORK_DIR]

Trains the demo's tiny base and fine-tune (fapm_merge.demo.build_pair, seed 0, a few seconds
on a CPU; reused when WORK_DIR already has them), runs ``fapm-merge inspect`` on them into
WORK_DIR/inspect (default: a temporary folder), copies the trade-off plot to
docs/images/inspect-tradeoff.png and prints the report excerpt that README.md shows. Nothing in
the README example is typed by hand.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from fapm_merge.demo import build_pair
from fapm_merge.inspect.stats import inspect_models

DOCS = Path(__file__).resolve().parent


def main(work: str) -> None:
    base, finetuned = Path(work) / "base", Path(work) / "finetuned"
    if not (base.is_dir() and finetuned.is_dir()):
        base, finetuned = build_pair(work, seed=0)
    out = Path(work) / "inspect"
    inspect_models(base, finetuned, sparsity=0.9, out=out, progress=False)
    (DOCS / "images").mkdir(exist_ok=True)
    shutil.copyfile(out / "tradeoff.png", DOCS / "images" / "inspect-tradeoff.png")
    report = (out / "report.md").read_text(encoding="utf-8")
    summary = report.split("## Summary\n\n", 1)[1].split("\n\n", 1)[0]
    per_layer = report.split("## Per layer\n\n", 1)[1].split("\n\n", 2)[1]
    print(summary)
    print()
    print(per_layer)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as folder:
            main(folder)
