"""The ``fapm-merge inspect`` command (torch and matplotlib are imported only when it runs)."""

from __future__ import annotations

import click


@click.command("inspect")
@click.argument("base", type=click.Path())
@click.argument("finetuned", metavar="FT", type=click.Path())
@click.option("--sparsity", default=0.9, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of each task vector that pruning removes (keep 1 - sparsity).")
@click.option("--out", "out_dir", default="inspect-out", show_default=True,
              type=click.Path(file_okay=False), help="Folder for report.md, stats.json, PNGs.")
@click.option("--modules", default=None, metavar="REGEX",
              help="Inspect only tensors whose name matches (re.search), e.g. 'q_proj|down_proj'.")
@click.option("--exclude", default=None, metavar="REGEX",
              help="Skip tensors whose name matches, e.g. 'lm_head|embed_tokens'.")
@click.option("--heatmap", "heatmaps", multiple=True, metavar="TENSOR",
              help="Draw heatmaps of this 2-D tensor (repeatable; default: q_proj and down_proj "
                   "of the first and last layer).")
@click.option("--heatmap-size", default=256, show_default=True, type=click.IntRange(8, 2048),
              help="Heatmaps are block-mean pooled to at most this many pixels a side.")
@click.option("--top", default=15, show_default=True, type=click.IntRange(0),
              help="Rows in the report's top-risk table.")
@click.option("--no-plots", is_flag=True, help="Write report.md and stats.json only.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def inspect_command(base, finetuned, sparsity, out_dir, modules, exclude, heatmaps,
                    heatmap_size, top, no_plots, quiet) -> None:
    """Show where FT's forgetting risk sits relative to BASE, before and after pruning.

    BASE and FT are model references as in a recipe: local Hugging Face model folders
    (model.safetensors, or shards with model.safetensors.index.json) or hub ids
    (`org/name[@revision]`) already in the Hugging Face cache (never downloaded). Tensors are read one pair at a time. Per tensor, module
    type and layer: mean |dW|, the relative change |dW|/|W_pre|, the share of negative FAPM
    scores, and what FAPM and magnitude pruning each keep at --sparsity (overlap, task-vector
    energy, relative change of the kept part). See docs/inspect.md.
    """
    from fapm_merge.inspect.stats import InspectError, inspect_models

    base, finetuned = _local(base), _local(finetuned)
    try:
        stats = inspect_models(
            base,
            finetuned,
            sparsity=sparsity,
            out=out_dir,
            modules=modules,
            exclude=exclude,
            heatmaps=list(heatmaps) if heatmaps else None,
            heatmap_size=heatmap_size,
            top=top,
            plots=not no_plots,
            progress=not quiet,
        )
    except InspectError as error:
        raise click.ClickException(str(error)) from None
    s = stats["summary"]

    def fmt(value):
        return "–" if value is None else f"{value:.3g}"

    click.echo(
        f"{s['tensors']} tensors: energy kept FAPM {fmt(s['energy_kept_fapm'])} / magnitude "
        f"{fmt(s['energy_kept_magnitude'])}; kept relative change FAPM "
        f"{fmt(s['kept_ratio_mean_fapm'])} / magnitude {fmt(s['kept_ratio_mean_magnitude'])}; "
        f"Jaccard {fmt(s.get('jaccard'))}"
    )
    click.echo(f"report: {out_dir}/report.md")


def _local(text: str) -> str:
    """The local folder of a model reference; a `+lora` one is refused (inspect reads
    weights from disk, and the adapter is only merged into them by mergekit)."""
    from mergekit.common import ModelReference

    from fapm_merge.references import ReferenceError, local_folder

    reference = ModelReference.model_validate(text)
    if reference.lora is not None:
        raise click.ClickException(
            f"{text}: inspect reads weights from disk and cannot apply a LoRA adapter; merge it "
            "first (e.g. a mergekit `passthrough` recipe with that model, or peft's "
            "merge_and_unload) and inspect the merged folder"
        )
    try:
        return local_folder(reference.model.path, reference.model.revision)
    except ReferenceError as error:
        raise click.ClickException(str(error)) from None
