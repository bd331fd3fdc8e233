"""The values a recipe may give FAPM's string parameters, defined once (no torch here).

The kernel dispatches on them and :mod:`fapm_merge.methods` declares mergekit's parameter
types from them, so a new value is added in one place.
"""

SCORES = ("fapm", "magnitude", "relative", "random")
DETERMINISTIC_SCORES = SCORES[:3]  # the scores that rank without a random generator
RESCALES = ("none", "density", "l1", "l2")
CONSENSUS = ("sum", "count")
