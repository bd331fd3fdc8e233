"""``python -m fapm_study``: the same command as ``fapm-merge study``."""

from fapm_study.cli import study

study(prog_name="python -m fapm_study")
