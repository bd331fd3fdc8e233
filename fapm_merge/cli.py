"""The ``fapm-merge`` command line: run, validate, demo (and the tools built on them)."""

from __future__ import annotations

import click

from fapm_merge import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fapm-merge")
def main() -> None:
    """Forgetting-aware pruning of fine-tuned LLMs, as mergekit merge methods."""
