"""The ``fapm-merge`` command line: run, validate, demo (and the tools built on them).

Heavy imports (torch, mergekit's merge machinery) happen inside the commands, except for
mergekit's option definitions, which ``run`` reuses so its flags are exactly mergekit-yaml's.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import click
from mergekit.options import MergeOptions, add_merge_options

from fapm_merge import __version__
from fapm_merge.inspect_cli import inspect_command
from fapm_merge.recipe import RecipeError, check_recipe_file
from fapm_merge.study.cli import study
from fapm_merge.sweep.cli import sweep_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fapm-merge")
def main() -> None:
    """Forgetting-aware pruning of fine-tuned LLMs, as mergekit merge methods.

    The methods `fapm` and `fapm_ties` are registered with mergekit on install, so plain
    `mergekit-yaml recipe.yml OUT` runs them; these commands add checks and tools around it.
    """


def _checked(config_file: str, check_models: bool = True):
    try:
        return check_recipe_file(config_file, check_models=check_models)
    except RecipeError as error:
        raise click.ClickException(str(error)) from None


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option(
    "--no-model-check",
    is_flag=True,
    help="Only check the YAML and parameters, not the model folders and tensor headers.",
)
def validate(config_file: str, no_model_check: bool) -> None:
    """Check a mergekit-yaml or mergekit-multi recipe without merging.

    Rejects unknown parameter keys (which mergekit silently ignores), out-of-range values,
    missing model folders, and tensors that are missing or shaped differently between the
    base and a fine-tune (from the safetensors headers only).
    """
    recipes = _checked(config_file, check_models=not no_model_check)
    for recipe in recipes:
        label = f" [{recipe.name}]" if recipe.name else ""
        click.echo(f"ok{label}: merge_method {recipe.config.merge_method}, "
                   f"{len(recipe.config.referenced_models())} model(s)")


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace OUT_PATH if it already exists.")
@click.option("--manifest", is_flag=True,
              help="Record what FAPM pruned per tensor in OUT_PATH/fapm_manifest.jsonl.")
@add_merge_options
def run(
    merge_options: MergeOptions, config_file: str, out_path: str, force: bool, manifest: bool
) -> None:
    """Validate, then merge CONFIG_FILE into OUT_PATH (same options as mergekit-yaml).

    The merge is written to a temporary folder beside OUT_PATH and moved into place only
    when it is complete, so a failed run never leaves an output that looks finished.
    """
    recipes = _checked(config_file)
    if len(recipes) != 1:
        raise click.ClickException(
            f"{config_file} holds {len(recipes)} recipes: run it with "
            "`mergekit-multi --no-lazy -I INTERMEDIATE_DIR --out-path OUT`"
        )
    out_path = os.path.abspath(out_path)
    if os.path.exists(out_path) and os.listdir(out_path) and not force:
        raise click.ClickException(f"{out_path} already exists; pass --force to replace it")

    from mergekit.merge import run_merge

    merge_options.apply_global_options()
    parent = os.path.dirname(out_path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_path)}.partial-", dir=parent)
    with open(config_file, encoding="utf-8") as handle:
        source = handle.read()
    if manifest:  # see fapm_merge.manifest (an explicit `manifest: path` in the recipe wins)
        os.environ["FAPM_MANIFEST"] = os.path.join(staging, "fapm_manifest.jsonl")
    try:
        run_merge(recipes[0].config, staging, options=merge_options, config_source=source)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, (KeyboardInterrupt, SystemExit)) or merge_options.verbosity:
            raise
        raise click.ClickException(
            f"merge failed, nothing written to {out_path}: {type(error).__name__}: {error}"
        ) from None
    if os.path.exists(out_path):
        shutil.rmtree(out_path)
    os.replace(staging, out_path)
    click.echo(f"merged model written to {out_path}", err=True)


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False), default="out/demo")
@click.option("--sparsity", default=0.9, show_default=True, type=click.FloatRange(0, 1))
@click.option("--seed", default=0, show_default=True)
def demo(out_dir: str, sparsity: float, seed: int) -> None:
    """Build a small base and fine-tuned model here, merge them with FAPM, and report.

    No downloads: both models are tiny Llamas trained for a few seconds on synthetic data.
    """
    from fapm_merge.demo import run_demo

    run_demo(out_dir, sparsity=sparsity, seed=seed)


main.add_command(inspect_command)
main.add_command(study)
main.add_command(sweep_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
