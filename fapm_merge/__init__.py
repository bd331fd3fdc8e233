"""fapm-merge: Forgetting-Aware Pruning (FAPM) as mergekit merge methods.

Importing this package is cheap (no torch, no mergekit); the methods register themselves with
mergekit when ``mergekit.merge_methods`` is imported (see :mod:`fapm_merge._hook`), or
explicitly with :func:`register`.
"""

__version__ = "0.1.0"


def register() -> None:
    """Register ``fapm`` and ``fapm_ties`` with mergekit (idempotent)."""
    from fapm_merge.methods import register_methods

    register_methods()
