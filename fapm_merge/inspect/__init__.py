"""``fapm-merge inspect``: why FAPM prunes what it prunes, before any merge.

``stats`` (per-tensor statistics, also what a merge's manifest records), ``report``
(markdown and JSON), ``plots`` (matplotlib) and ``cli`` (the command). Nothing here is
imported by a merge unless it writes a manifest.
"""
