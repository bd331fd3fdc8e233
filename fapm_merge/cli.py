"""The ``fapm-merge`` command line: run, validate, demo (and the tools built on them).

Heavy imports (torch, mergekit's merge machinery) happen inside the commands: ``fapm-merge
--help`` imports neither. ``run`` takes mergekit-yaml's own flags, built by mergekit when the
command is used (:class:`MergekitOptionsCommand`).
"""

from __future__ import annotations

import copy
import os
import sys
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from mergekit.options import MergeOptions

from fapm_merge import __version__
from fapm_merge.inspect.cli import inspect_command
from fapm_merge.mergekit_schema import referenced_models
from fapm_merge.recipe import RecipeError, check_recipe_file
from fapm_merge.sweep.cli import sweep_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fapm-merge")
def main() -> None:
    """Forgetting-aware pruning of fine-tuned LLMs, as mergekit merge methods.

    The methods `fapm` and `fapm_ties` are registered with mergekit on install, so plain
    `mergekit-yaml recipe.yml OUT` runs them; these commands add checks and tools around it.
    """


class MergekitOptionsCommand(click.Command):
    """A command that also takes every ``mergekit-yaml`` flag, as one ``merge_options``
    argument (mergekit's ``add_merge_options``). The flags are added the first time the
    command parses or prints its options: importing mergekit's options imports torch, which
    ``fapm-merge --help`` and the other commands should not pay for."""

    def get_params(self, ctx: click.Context):
        if not getattr(self, "_merge_options_added", False):
            from mergekit.options import add_merge_options

            wrapped = add_merge_options(self.callback)
            self.params = self.params + list(reversed(wrapped.__click_params__))
            del wrapped.__click_params__
            self.callback = wrapped
            self._merge_options_added = True
        return super().get_params(ctx)


def _checked(config_file: str, check_models: bool = True, allow_uncached: bool = False,
             light: bool = False):
    try:
        return check_recipe_file(config_file, check_models=check_models,
                                 allow_uncached=allow_uncached, light=light)
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
    # without model checks, the recipe is checked against the schema snapshot: no torch
    recipes = _checked(config_file, check_models=not no_model_check, light=no_model_check)
    for recipe in recipes:
        label = f" [{recipe.name}]" if recipe.name else ""
        click.echo(f"ok{label}: merge_method {recipe.source['merge_method']}, "
                   f"{len(referenced_models(recipe.source))} model(s)")


@main.command(cls=MergekitOptionsCommand,
              short_help="Validate, then merge CONFIG_FILE into OUT_PATH (mergekit-yaml's flags).")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True,
              help="Replace OUT_PATH if it is an earlier output of `fapm-merge run`.")
@click.option("--manifest", is_flag=True,
              help="Record what FAPM pruned per tensor in OUT_PATH/fapm_manifest.jsonl.")
@click.option("--no-model-check", is_flag=True,
              help="Skip the checks of model folders and tensor headers (mergekit still "
                   "checks what it needs while merging).")
def run(
    merge_options: MergeOptions, config_file: str, out_path: str, force: bool, manifest: bool,
    no_model_check: bool,
) -> None:
    """Validate, then merge CONFIG_FILE into OUT_PATH (same options as mergekit-yaml).

    The merge is staged in a hidden folder beside OUT_PATH (.NAME.partial-PID) and moved into
    place only when it is complete, so a failed or interrupted run never leaves an output that
    looks finished. OUT_PATH may not be, contain or lie inside an input model folder, and
    --force replaces only an earlier output of this command (it carries a marker file).
    """
    from fapm_merge import output

    _check_device(merge_options)
    from huggingface_hub import constants

    # online, an uncached hub model is mergekit's to download (validate never downloads)
    recipes = _checked(config_file, check_models=not no_model_check,
                       allow_uncached=not constants.HF_HUB_OFFLINE)
    if len(recipes) != 1:
        raise click.ClickException(
            f"{config_file} holds {len(recipes)} recipes: run it with "
            "`mergekit-multi --no-lazy -I INTERMEDIATE_DIR --out-path OUT`"
        )
    recipe = recipes[0]
    out_path = os.path.abspath(out_path)
    try:
        output.check_not_over_inputs(out_path, _input_folders(recipe.config), config_file)
        replace = output.check_replaceable(out_path, force)
        for stale in output.remove_stale_staging(out_path):
            click.echo(f"removed {stale}, left by an interrupted run", err=True)
    except output.OutputError as error:
        raise click.ClickException(str(error)) from None

    from fapm_merge.merging import merge

    merge_options.apply_global_options()
    with open(config_file, encoding="utf-8") as handle:
        source = handle.read()
    try:
        with output.staged(out_path, replace) as staging:
            config = _config_for_run(recipe, out_path, staging.path)
            if merge_options.lora_merge_cache is None:  # mergekit refuses `+lora` without one
                merge_options = merge_options.model_copy(
                    update={"lora_merge_cache": os.path.join(staging.outer, "lora-merges")}
                )
            manifest_file = os.path.join(staging.path, "fapm_manifest.jsonl") if manifest else None
            try:
                # FAPM_MANIFEST: see fapm_merge.manifest (a `manifest: path` in the recipe wins)
                with output.environment("FAPM_MANIFEST", manifest_file):
                    merge(config, staging.path, options=merge_options, config_source=source)
            except Exception as error:
                if merge_options.verbosity:
                    raise
                raise click.ClickException(
                    f"merge failed, nothing written to {out_path}: {type(error).__name__}: {error}"
                ) from None
            staging.commit()
    except output.OutputError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"merged model written to {out_path}", err=True)


def _check_device(options: MergeOptions) -> None:
    """Fail before any work when the requested accelerator is not usable by this torch."""
    device = str(options.device or "")
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA device"
        raise click.ClickException(
            f"--cuda / --device {device} requested, but this torch ({torch.__version__}) {build}."
            " Drop the flag to merge on the CPU, or install a CUDA build of torch "
            "(https://pytorch.org/get-started/locally/, e.g. `pip install torch --index-url "
            "https://download.pytorch.org/whl/cu126`)."
        )


def _input_folders(config) -> list:
    """(label, local folder) of every model a recipe reads: models, LoRA adapters, tokenizer
    sources; hub ids by their cached snapshot (unresolvable ones cannot be written over)."""
    from fapm_merge.references import ReferenceError, resolve

    references = list(config.referenced_models())
    for source in (config.tokenizer_source, getattr(config.tokenizer, "source", None)):
        if source is not None and not isinstance(source, str):
            references.append(source)
    folders = []
    for reference in references:
        try:
            model, lora = resolve(reference)
        except ReferenceError:
            continue
        folders += [(str(reference), path) for path in (model, lora) if path]
    return folders


def _config_for_run(recipe, out_path: str, staging: str):
    """The recipe's config as mergekit gets it: offline, hub ids point at their cached
    snapshots (mergekit 0.1.5 would ask the Hub); every `manifest:` file inside OUT is moved
    into the staging folder (so it ends up in OUT with the model, not written over)."""
    from huggingface_hub import constants

    from fapm_merge import manifest as manifest_module
    from fapm_merge.recipe import parameter_blocks
    from fapm_merge.references import localized_source

    source = copy.deepcopy(recipe.source)
    moved = False
    if constants.HF_HUB_OFFLINE:
        localized = localized_source(source)
        moved, source = localized != source, localized
    for _, block in parameter_blocks(source):
        setting = block.get("manifest")
        if not isinstance(setting, str) or manifest_module.target(setting) != setting:
            continue
        path = os.path.abspath(setting)
        if path == out_path or path.startswith(out_path + os.sep):
            block["manifest"] = os.path.join(staging, os.path.relpath(path, out_path))
            moved = True
    if not moved:
        return recipe.config
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate(source)


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


@main.command(add_help_option=False,
              context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def study(ctx: click.Context) -> None:
    """Forgetting study on SmolLM2-135M (research code of a source checkout; docs/study/)."""
    # The study is not part of the plugin: it lives in fapm_study/ beside fapm_merge/ and is
    # imported only here (a wheel does not ship it).
    try:
        from fapm_study.cli import study as command
    except ImportError:
        raise click.ClickException(
            "the forgetting study is research code that lives in the source repository "
            "(fapm_study/), not in the installed plugin: clone the repository and run "
            "`make study` (or `pip install -e '.[study]'` there, then `fapm-merge study`)"
        ) from None
    command.main(args=ctx.args, prog_name="fapm-merge study", standalone_mode=False)


main.add_command(inspect_command)
main.add_command(sweep_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
