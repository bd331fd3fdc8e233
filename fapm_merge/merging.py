"""Merge one recipe through mergekit's own ``run_merge``, our methods registered: the one
helper behind ``fapm-merge run``, the demo, the low-memory sweep and the tests."""

from __future__ import annotations

import os
from typing import Any, Optional, Union


def merge(recipe: Union[str, "os.PathLike[str]", dict, Any], out_path: Union[str, os.PathLike],
          options: Any = None, config_source: Optional[str] = None) -> None:
    """Write the merge of ``recipe`` to ``out_path``.

    Args:
        recipe: a YAML file's path, a recipe mapping, or a ``MergeConfiguration``.
        out_path: the output folder (mergekit creates it).
        options: mergekit's ``MergeOptions`` (default: quiet, no tokenizer copy, no model
            card).
        config_source: the YAML text mergekit records in the output (default: the file's
            text when ``recipe`` is a path).
    """
    import yaml
    from mergekit import merge as mergekit_merge  # looked up per call: tests wrap run_merge
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    import fapm_merge

    fapm_merge.register()
    if isinstance(recipe, (str, os.PathLike)):
        with open(recipe, encoding="utf-8") as handle:
            text = handle.read()
        config_source = text if config_source is None else config_source
        recipe = yaml.safe_load(text)
    if isinstance(recipe, dict):
        recipe = MergeConfiguration.model_validate(recipe)
    if options is None:
        options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    mergekit_merge.run_merge(recipe, str(out_path), options=options, config_source=config_source)
