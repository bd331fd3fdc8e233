"""Where ``fapm-merge run`` writes a merge: never over a user's models, never half-written.

The rules, in the order they are checked (all before any tensor is read):

- OUT must not be, contain or lie inside an input model folder (base, fine-tunes, LoRA
  adapters, tokenizer sources; real paths, so symlinks count), nor contain the recipe file.
- An existing, non-empty OUT is replaced only with ``--force`` *and* only when it carries the
  marker file that ``run`` writes into every output (:data:`MARKER`); anything else is
  described (what ``--force`` would delete) and left alone.
- The merge is staged in ``PARENT/.NAME.partial-PID/NAME`` beside OUT (same file system, so
  the final move is a rename) and moved into place only when complete. The inner folder has
  OUT's own name because mergekit titles the model card after the folder it writes to.
  SIGINT, SIGTERM and SIGHUP remove the staging folder; a folder left by SIGKILL or a crash is
  recognised at the next run into the same OUT (its process is gone) and removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Tuple

MARKER = ".fapm-merge-output"
_STAGING_TAG = ".partial-"


class OutputError(ValueError):
    """OUT cannot be written safely; the message says why and what to do."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _inside(path: str, folder: str) -> bool:
    """``path`` lies strictly inside ``folder`` (both real, absolute paths)."""
    return path != folder and path.startswith(folder.rstrip(os.sep) + os.sep)


def check_not_over_inputs(
    out_path: str, models: Iterable[Tuple[str, str]], recipe_file: str
) -> None:
    """Refuse an OUT that would overwrite or delete an input.

    ``models``: (label, local folder) of every model the recipe reads.
    """
    out = _real(out_path)
    for label, folder in models:
        folder = _real(folder)
        if out == folder:
            relation = "is the folder of"
        elif _inside(out, folder):
            relation = "lies inside"
        elif _inside(folder, out):
            relation = "contains"
        else:
            continue
        raise OutputError(
            f"output folder {out_path} {relation} the input model {label} ({folder}): "
            "writing there could destroy the input. Choose an output folder outside every "
            "input model folder."
        )
    recipe = _real(recipe_file)
    if _inside(recipe, out):
        raise OutputError(
            f"output folder {out_path} contains the recipe {recipe_file}: replacing it would "
            "delete the recipe. Choose another output folder."
        )


def _describe(folder: str, limit: int = 5) -> str:
    entries = sorted(os.listdir(folder))
    size = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                size += os.path.getsize(os.path.join(root, name))
    shown = ", ".join(entries[:limit]) + (f", ... ({len(entries)} entries)" if len(entries) > limit else "")
    return f"{shown}; {size / 1e6:.1f} MB"


def is_merge_output(folder: str) -> bool:
    """``folder`` was written by ``fapm-merge run`` (it carries :data:`MARKER`)."""
    return os.path.isfile(os.path.join(folder, MARKER))


def check_replaceable(out_path: str, force: bool) -> bool:
    """Whether OUT exists with content that the merge will replace (raises if it may not)."""
    if not os.path.lexists(out_path):
        return False
    if not os.path.isdir(out_path):
        raise OutputError(f"{out_path} exists and is not a folder; choose another output path")
    if not os.listdir(out_path):
        return False
    if not force:
        raise OutputError(
            f"{out_path} already exists; pass --force to replace it (only an earlier output "
            "of fapm-merge run is replaced)"
        )
    if not is_merge_output(out_path):
        raise OutputError(
            f"{out_path} is not an output of fapm-merge run (it has no {MARKER} file), so "
            f"--force will not delete it. It holds: {_describe(out_path)}. Delete it yourself "
            "if it is expendable, or choose another output folder."
        )
    return True


def _staging_prefix(out_path: str) -> str:
    return os.path.join(os.path.dirname(out_path), f".{os.path.basename(out_path)}{_STAGING_TAG}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(out_path: str) -> List[str]:
    """Remove staging folders of OUT whose process is gone; return what was removed.

    Raises if a live process is staging into the same OUT (two runs would race).
    """
    prefix = _staging_prefix(out_path)
    parent = os.path.dirname(prefix)
    removed = []
    if not os.path.isdir(parent):
        return removed
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not path.startswith(prefix) or not os.path.isdir(path):
            continue
        tail = path[len(prefix):]
        pid = int(tail) if tail.isdigit() else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            raise OutputError(
                f"another fapm-merge run (process {pid}) is writing {out_path} (staging in "
                f"{path}); wait for it to finish or stop it"
            )
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM / SIGHUP into SystemExit for a while, so cleanup code runs."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = {}
    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is None:
            continue
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@dataclass
class Staging:
    """A staging folder for OUT; :meth:`commit` moves it into place."""

    out_path: str
    replace: bool
    outer: str = ""

    @property
    def path(self) -> str:
        """The folder the merge writes to; its name is OUT's name."""
        return os.path.join(self.outer, os.path.basename(self.out_path))

    def commit(self) -> None:
        """Mark the output and move it to OUT; an earlier output is swapped out, then deleted."""
        with open(os.path.join(self.path, MARKER), "w", encoding="utf-8") as handle:
            json.dump({"written_by": "fapm-merge run", "format": 1}, handle)
            handle.write("\n")
        old = None
        if os.path.lexists(self.out_path) and os.listdir(self.out_path):
            if not (self.replace and is_merge_output(self.out_path)):
                kept = f"{self.out_path}.merged-{os.getpid()}"
                os.replace(self.path, kept)
                raise OutputError(
                    f"{self.out_path} appeared while merging and is left alone; the finished "
                    f"merge is in {kept}: move it yourself"
                )
            old = os.path.join(self.outer, "previous")
            os.replace(self.out_path, old)
        elif os.path.isdir(self.out_path):
            os.rmdir(self.out_path)  # empty: nothing is lost
        os.replace(self.path, self.out_path)
        shutil.rmtree(self.outer, ignore_errors=True)


@contextlib.contextmanager
def staged(out_path: str, replace: bool) -> Iterator[Staging]:
    """Stage a merge for ``out_path``; removed on any failure or signal, moved on commit."""
    out_path = os.path.abspath(out_path)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    staging = Staging(out_path, replace, _staging_prefix(out_path) + str(os.getpid()))
    shutil.rmtree(staging.outer, ignore_errors=True)
    os.makedirs(staging.path)
    try:
        with _signals_raise():
            yield staging
    finally:
        shutil.rmtree(staging.outer, ignore_errors=True)


@contextlib.contextmanager
def environment(name: str, value: Optional[str]) -> Iterator[None]:
    """Set (or leave) an environment variable for a while; restored afterwards."""
    if value is None:
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
