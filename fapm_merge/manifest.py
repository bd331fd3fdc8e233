"""Opt-in pruning manifest: one JSON line per merged tensor, written during a merge.

Turned on by the ``manifest`` parameter of the ``fapm`` / ``fapm_ties`` methods, or by the
environment variable ``FAPM_MANIFEST``, so it works with plain ``mergekit-yaml``:

- ``manifest: path/to/file.jsonl`` (recipe): append to that file (relative paths are relative
  to the working directory of the merge; point it into the output folder, e.g.
  ``./merged/fapm_manifest.jsonl``, so the merged model carries its record);
- ``manifest: true``: append to ``$FAPM_MANIFEST`` if set, else ``./fapm_manifest.jsonl``;
- ``manifest: false`` (the default): off, unless ``FAPM_MANIFEST`` is set, which turns it on
  for every tensor of every fapm merge in that process.

Lines are appended (never truncated): each carries a ``run`` id (UTC start time and process
id) so several merges into one file stay apart; :func:`read_manifest` returns one run.

Each line records, per fine-tune, the *pruning* step exactly as the merge applied it (same
mask: the kernel's :func:`~fapm_merge.kernel.prune_mask` with the same sparsity, score and
random generator): kept count, task-vector energy kept, mean relative change of what was
kept, and the zeros of ``W_pre``. It does not record the TIES sign election that ``fapm_ties``
applies afterwards. Cost: the masks are computed a second time (about one extra pruning
pass per tensor); nothing is computed when the manifest is off.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence, Union

import torch

from fapm_merge import kernel

ENV = "FAPM_MANIFEST"
DEFAULT_FILE = "fapm_manifest.jsonl"
SCHEMA_VERSION = 1
RUN_ID = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{os.getpid()}"

_LOCK = threading.Lock()
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0", ""}


def target(setting: Union[bool, str, None]) -> Optional[str]:
    """The file to append to for the recipe value ``setting``, or ``None`` when off."""
    env = os.environ.get(ENV) or None
    if isinstance(setting, str):
        lowered = setting.strip().lower()
        if lowered in _TRUE:
            setting = True
        elif lowered in _FALSE:
            setting = False
        else:
            return setting
    if setting:
        return env or DEFAULT_FILE
    return env


def tensor_record(
    method: str,
    tensor: str,
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    models: Sequence[str],
    sparsity: Sequence[float],
    score: str,
    seed: int = 0,
) -> Dict[str, object]:
    """The manifest line (a dict) of one merged tensor; recomputes each fine-tune's mask."""
    from fapm_merge.inspect.stats import tensor_tally

    entries: List[Dict[str, object]] = []
    base_zero = int((base == 0).count_nonzero())
    for index, (model, ft, s) in enumerate(zip(models, finetuned, sparsity)):
        generator = (
            kernel.tensor_generator(seed, tensor, index, base.device) if score == "random" else None
        )
        mask = kernel.prune_mask(base, ft, s, score, generator)
        tally = tensor_tally(base, ft, {"kept": mask}, sparsity=s)
        del mask
        summary = tally.summary()
        entries.append(
            {
                "model": model,
                "sparsity": float(f"{float(s):.7g}"),
                "kept_budget": tally.budget,
                "kept": tally.masks["kept"].kept,
                "unchanged": tally.unchanged,
                "energy_kept": summary["energy_kept_kept"],
                "kept_ratio_mean": summary["kept_ratio_mean_kept"],
                "kept_base_zero": tally.masks["kept"].base_zero,
                "dw_abs_mean": summary["dw_abs_mean"],
            }
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "run": RUN_ID,
        "method": method,
        "tensor": tensor,
        "shape": list(base.shape),
        "dtype": str(base.dtype).replace("torch.", ""),
        "numel": base.numel(),
        "base_zero": base_zero,
        "score": score,
        "finetuned": entries,
    }


def record(path: str, **kwargs) -> None:
    """Append :func:`tensor_record` ``(**kwargs)`` as one JSON line to ``path``."""
    line = json.dumps(tensor_record(**kwargs), allow_nan=False)
    folder = os.path.dirname(os.path.abspath(path))
    with _LOCK:
        os.makedirs(folder, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def read_manifest(path: str, run: Optional[str] = "last") -> List[Dict[str, object]]:
    """The records of one run (``"last"``: the run of the last line; ``None``: all runs)."""
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    if run == "last" and records:
        run = records[-1]["run"]
    return [r for r in records if run is None or r["run"] == run]
