"""``fapm-merge study``: the click command (heavy imports happen inside the call)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click


@click.command("study")
@click.option("--quick", is_flag=True,
              help="Tiny local model and a handful of items: checks the pipeline in seconds.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Report folder [default: docs/study, or WORK_DIR/report with --quick].")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Models, tasks and per-variant results [default: out/study/MODE].")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Downloaded packages and the converted model "
                   "[default: ~/.cache/fapm-merge/study or $FAPM_STUDY_CACHE].")
@click.option("--threads", type=int, default=None,
              help="Torch threads [default: 1 when the load average exceeds the cores, "
                   "else all cores].")
@click.option("--suite", type=click.Choice(["full", "small"]), default="full", show_default=True,
              help="General suite: full (150 items per skill) or small (40-50 per skill, "
                   "the first committed run's).")
@click.option("--second-task/--no-second-task", default=True, show_default=True,
              help="After the QASC study, fine-tune on BIG-bench word_sorting (learned from "
                   "scratch) and sweep it; its report goes to OUT/word-sorting.")
def study(quick: bool, out_dir, work_dir, cache_dir, threads, suite, second_task) -> None:
    """Forgetting study: fine-tune SmolLM2-135M, prune/merge every way, evaluate, plot.

    Resumable: a stage whose outputs exist (made with the same settings) is skipped.
    """
    from fapm_study.prepare import DownloadError
    from fapm_study.run import run_study

    command = "fapm-merge " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        run_study(quick=quick, out_dir=out_dir, work_dir=work_dir, cache_dir=cache_dir,
                  command=command, threads=threads, suite=suite, second_task=second_task)
    except DownloadError as error:
        raise click.ClickException(str(error)) from None
