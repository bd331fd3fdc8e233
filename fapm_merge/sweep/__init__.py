"""``fapm-merge sweep``: score a fine-tune's FAPM variants on the user's own lm-eval tasks.

Modules (import-light: torch, mergekit's merge machinery and lm-eval are imported inside
functions, so ``fapm-merge --help`` stays cheap):

- :mod:`.variants`: the user's recipe, what the sweep supports, one recipe per variant;
- :mod:`.engine`: every variant built in memory, bit-identical to ``mergekit-yaml``;
- :mod:`.evaluate`: lm-eval glue (task names, metric choice, standard errors);
- :mod:`.results`: the results file (atomic, resumable), figures of merit, the rule, report;
- :mod:`.run`: the sweep itself; :mod:`.cli`: the click command.
"""
