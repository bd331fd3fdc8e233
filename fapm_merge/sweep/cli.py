"""``fapm-merge sweep``: the click command (heavy imports happen inside it)."""

from __future__ import annotations

import click


def _fail(error: Exception) -> click.ClickException:
    return click.ClickException(str(error))


def _command_line() -> list:
    """The command as it can be rerun: the arguments and every option not at its default."""
    context = click.get_current_context()
    line = ["fapm-merge", context.info_name or "sweep"]
    for parameter in context.command.params:
        value = context.params.get(parameter.name)
        if isinstance(parameter, click.Argument):
            line.append(str(value))
        elif value not in (None, False, "") and value != parameter.default:
            flag = max(parameter.opts, key=len)
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # --limit 200, as typed, not 200.0
            line += [flag] if parameter.is_flag else [flag, str(value)]
    return line


def _integers(text: str, option: str) -> list:
    from fapm_merge.sweep.variants import SweepInputError

    values = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                values.append(int(part))
            except ValueError:
                raise SweepInputError(f"{option}: {part!r} is not an integer") from None
    return values


@click.command("sweep")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--sparsity", "sparsity", required=True,
              help="Comma-separated sparsities in [0, 1] that replace the recipe's default "
                   "sparsity (filter: overrides stay), e.g. 0.5,0.8,0.9,0.95,0.99.")
@click.option("--score", default=None,
              help="Comma-separated scores to sweep (fapm, magnitude, relative, random); "
                   "default: the recipe's own.")
@click.option("--task-tasks", required=True,
              help="lm-eval task(s) the fine-tune was trained for: TASK[:METRIC[,FILTER]],...")
@click.option("--general-tasks", required=True,
              help="lm-eval task(s) of what the pre-trained model could do (forgetting).")
@click.option("--extra-tasks", default="",
              help="lm-eval task(s) scored and reported beside the others but not in the "
                   "figures of merit (e.g. a perplexity): TASK[:METRIC[,FILTER]],...")
@click.option("--include-path", type=click.Path(file_okay=False), default=None,
              help="Folder of local lm-eval task YAMLs.")
@click.option("--limit", type=float, default=None,
              help="Items per task (lm-eval's --limit; < 1 is a fraction).")
@click.option("--num-fewshot", type=int, default=None, help="lm-eval's --num_fewshot.")
@click.option("--wise", default="", help="WiSE-FT baselines: fine-tune weights, e.g. 0.25,0.5.")
@click.option("--lines", default="",
              help="LiNeS-style baselines (task_arithmetic, the change scaled from this weight "
                   "at the first layer to 1 at the last), e.g. 0,0.25,0.5.")
@click.option("--spectral", is_flag=True,
              help="Spectral-repair baseline: each 2-D task vector reduced to the rank the "
                   "Gavish-Donoho hard threshold chooses (merge_method spectral).")
@click.option("--lowrank", default="",
              help="Low-rank baselines: the task vector truncated to these ranks, e.g. "
                   "8,32,128 (merge_method lowrank).")
@click.option("--dare-seeds", default="",
              help="DARE baselines (score random, rescale density) at every --sparsity, one "
                   "per seed, e.g. 0,1,2.")
@click.option("--min-retention", type=float, default=0.95, show_default=True,
              help="The rule: least forgetting among sweep points keeping at least this "
                   "fraction of the fine-tune's task score; ties to the lower sparsity.")
@click.option("--device", default="cpu", show_default=True,
              help="Where the model is evaluated (cpu, cuda, cuda:1, ...), as lm-eval's.")
@click.option("--batch-size", default="8", show_default=True, help="lm-eval's --batch_size.")
@click.option("--model-args", default="",
              help="lm-eval --model_args passed through (e.g. parallelize=True, "
                   "max_length=2048; with --low-memory any backend's arguments).")
@click.option("--low-memory", is_flag=True,
              help="Write each variant with mergekit to a temporary folder, score it, delete "
                   "it (same results; for models that do not fit 2.5x in memory).")
@click.option("--backend", default="hf", show_default=True,
              help="lm-eval model backend for --low-memory (hf, vllm, ...).")
@click.option("--tokenizer", type=click.Path(file_okay=False), default=None,
              help="Tokenizer folder (default: the base model's).")
@click.option("--bootstrap-iters", type=int, default=1000, show_default=True,
              help="lm-eval's bootstrap iterations for standard errors of non-mean metrics.")
@click.option("--force", is_flag=True,
              help="Discard results in OUT_DIR that come from a different recipe or models.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sweep_command(recipe, out_dir, sparsity, score, task_tasks, general_tasks, extra_tasks,
                  include_path, limit, num_fewshot, wise, lines, spectral, lowrank, dare_seeds,
                  min_retention, device, batch_size,
                  model_args, low_memory, backend, tokenizer, bootstrap_iters, force, quiet):
    """Score FAPM variants of RECIPE (base + one fine-tune) on your lm-eval tasks.

    Writes OUT_DIR/results.json, results.md, tradeoff-<score>.png, pareto.png and
    recommended.yml (the recipe at the chosen sparsity). Reruns score only what is new.
    See docs/sweep.md.
    """
    from fapm_merge.sweep.evaluate import parse_tasks
    from fapm_merge.sweep.variants import SweepInputError, parse_fractions

    try:
        if limit is not None and limit <= 0:
            raise SweepInputError("--limit: a positive number of items (or a fraction < 1)")
        seeds, ranks = _integers(dare_seeds, "--dare-seeds"), _integers(lowrank, "--lowrank")
        if any(rank < 1 for rank in ranks):
            raise SweepInputError("--lowrank: ranks are positive integers")
        from fapm_merge.sweep.run import SweepOptions, run_sweep

        options = SweepOptions(
            recipe=recipe, out_dir=out_dir,
            sparsities=parse_fractions(sparsity, "--sparsity"),
            scores=[s.strip() for s in score.split(",") if s.strip()] if score else None,
            task_tasks=parse_tasks(task_tasks, "--task-tasks"),
            general_tasks=parse_tasks(general_tasks, "--general-tasks"),
            extra_tasks=parse_tasks(extra_tasks, "--extra-tasks"),
            include_path=include_path,
            limit=int(limit) if limit is not None and limit >= 1 else limit,
            num_fewshot=num_fewshot, wise=parse_fractions(wise, "--wise"), dare_seeds=seeds,
            lines=parse_fractions(lines, "--lines"), spectral=spectral, lowrank=ranks,
            min_retention=min_retention, device=device, batch_size=batch_size,
            model_args=model_args, low_memory=low_memory, backend=backend, force=force,
            bootstrap_iters=bootstrap_iters, tokenizer=tokenizer, command=_command_line(),
            quiet=quiet,
        )
        run_sweep(options, echo=lambda text: click.echo(text, err=True))
    except SweepInputError as error:
        raise _fail(error) from None
