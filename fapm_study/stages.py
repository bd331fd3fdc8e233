"""Resumable stages: a stage's outputs are reused only if they were made from the same settings.

Every stage writes ``stage.json`` beside its outputs, holding a hash of everything that
determines them (its own settings and the hashes of the stages it consumed). A stage is
skipped when that file exists and the hash matches; a changed setting anywhere upstream
changes the hash and the stage runs again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

STAMP = "stage.json"


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_hash(*parts: Any) -> str:
    """A short, stable hash of JSON-able settings (dataclasses, dicts, lists, scalars)."""
    text = json.dumps(_plain(list(parts)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_done(folder: Path, digest: str) -> bool:
    """True when ``folder`` holds finished outputs made with settings hashing to ``digest``."""
    stamp = Path(folder) / STAMP
    if not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text()).get("hash") == digest
    except (ValueError, OSError):
        return False


def begin(folder: Path) -> Path:
    """Start a stage afresh: remove stale outputs and return the (empty) folder."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def finish(folder: Path, digest: str, **info: Any) -> None:
    """Mark a stage finished (written last, so an interrupted stage is never reused)."""
    payload = {"hash": digest, **_plain(info)}
    (Path(folder) / STAMP).write_text(json.dumps(payload, indent=2) + "\n")


def read_stamp(folder: Path) -> dict:
    return json.loads((Path(folder) / STAMP).read_text())
