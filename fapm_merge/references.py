"""Model references as mergekit reads them: local folders, hub ids (``org/name[@revision]``)
and ``model+lora_adapter``, resolved to local folders **without downloading**.

mergekit parses a reference with its own ``ModelReference``; so do we. A hub id is looked up
in the Hugging Face cache (``huggingface_hub.snapshot_download(..., local_files_only=True)``,
which honours ``HF_HOME`` / ``HF_HUB_CACHE`` and works offline). mergekit 0.1.5 itself asks the
Hub for the file list of every non-local model, even with ``HF_HUB_OFFLINE=1``, so a fully
cached model fails under plain ``mergekit-yaml`` offline; ``fapm-merge run`` hands mergekit
the cached snapshot folders instead (:func:`localized_source`).
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# keys of a raw recipe whose string values are model references
_REFERENCE_KEYS = ("model", "base_model", "tokenizer_source", "source")


class ReferenceError(ValueError):
    """A model reference that cannot be resolved locally; the message says how to fix it."""


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def looks_like_hub_id(path: str) -> bool:
    """``org/name`` or ``name`` (what the Hub accepts), not an explicit filesystem path."""
    return bool(_REPO_ID.match(path)) and not path.startswith((".", "/", "~")) and ".." not in path


def local_folder(path: str, revision: Optional[str] = None, what: str = "model") -> str:
    """The local folder holding ``path`` (a folder, or a hub id found in the cache).

    Raises :class:`ReferenceError` when it is neither; nothing is ever downloaded.
    """
    if os.path.isdir(path):
        return path
    shown = f"{path}@{revision}" if revision else path
    if not looks_like_hub_id(path):
        raise ReferenceError(
            f"{what} {shown!r} not found (looked in {os.path.abspath(os.path.expanduser(path))}). "
            "Give the path of a local model folder; relative paths are taken from the "
            "directory you run the command in."
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, revision=revision, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, a bad revision, a damaged cache entry
        pass
    raise ReferenceError(
        f"{what} {shown!r} is neither a local folder (looked in {os.path.abspath(path)}) nor in "
        f"the Hugging Face cache ({_cache_dir()}). fapm-merge never downloads; `mergekit-yaml` "
        f"would download it. To get it first: `huggingface-cli download {path}"
        + (f" --revision {revision}" if revision else "")
        + "`, or fix the path if it is meant to be a local folder."
    )


def resolve(reference: Any) -> Tuple[str, Optional[str]]:
    """(model folder, LoRA adapter folder or None) of a mergekit ``ModelReference``."""
    model = local_folder(reference.model.path, reference.model.revision)
    lora = None
    if reference.lora is not None:
        lora = local_folder(reference.lora.path, reference.lora.revision, what="LoRA adapter")
    return model, lora


def check_lora(adapter: str, model_folder: str, tensor_names: List[str], label: str) -> List[str]:
    """Check a LoRA adapter folder against the model it is merged into; returns warnings.

    Raises :class:`ReferenceError` when the adapter is not a LoRA adapter or targets modules
    the model does not have (peft would fail, or silently adapt nothing).
    """
    config_path = os.path.join(adapter, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ReferenceError(f"{label}: {adapter} has no adapter_config.json: not a PEFT adapter")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except ValueError:
        raise ReferenceError(f"{label}: {config_path} is not valid JSON") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ReferenceError(
            f"{label}: {config_path} is a {config.get('peft_type')!r} adapter; mergekit merges "
            "LoRA adapters only"
        )
    modules = {name.rsplit(".", 1)[0] for name in tensor_names}
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # peft: a regex matched against the full module name
        matched = any(re.fullmatch(targets, module) for module in modules)
        missing = [] if matched else [targets]
    else:
        missing = [t for t in targets
                   if not any(m == t or m.endswith("." + t) for m in modules)]
    if missing:
        raise ReferenceError(
            f"{label}: the adapter targets module(s) {', '.join(map(repr, missing))} that the "
            f"model in {model_folder} does not have: it was trained for another architecture"
        )
    warnings = []
    base_name = config.get("base_model_name_or_path")
    if base_name and os.path.basename(os.path.normpath(str(base_name))) != os.path.basename(
        os.path.normpath(model_folder)
    ) and str(base_name) not in model_folder:
        warnings.append(
            f"{label}: the adapter was trained on {base_name!r}, and is merged here into "
            f"{model_folder}; make sure that is the same model"
        )
    return warnings


def localized_source(source: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of a raw recipe with every hub reference replaced by its cached snapshot folder
    (LoRA parts too), so mergekit never asks the Hub. Local folders stay as written."""
    from mergekit.common import ModelReference

    def localize(text: str) -> str:
        reference = ModelReference.model_validate(text)
        try:
            model, lora = resolve(reference)
        except ReferenceError:  # unchecked (--no-model-check): mergekit reports it
            return text
        if model == reference.model.path and (lora is None or lora == reference.lora.path):
            return text
        return model + (f"+{lora}" if lora else "")

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key in _REFERENCE_KEYS and isinstance(value, str) and value not in (
                    "base", "union"
                ):
                    out[key] = localize(value)
                elif key != "parameters":
                    out[key] = walk(value)
                else:
                    out[key] = value
            return out
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return walk(copy.deepcopy(source))
