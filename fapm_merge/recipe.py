"""Recipe checks that mergekit does not make, run before any tensor is read.

mergekit silently ignores unknown parameter keys (``sparsty: 0.5`` runs with the default), only
finds a missing model or tensor mid-merge, and leaves a partial output behind. These checks
read the YAML and the safetensors *headers* only, so they take milliseconds, and every message
names the file or tensor and the fix.
"""

from __future__ import annotations

import difflib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import yaml


class RecipeError(ValueError):
    """A recipe that cannot run as written; the message says where and how to fix it."""


@dataclass(frozen=True)
class Recipe:
    """One YAML document of a recipe file (mergekit-multi files hold several)."""

    path: str
    index: int
    name: Optional[str]
    source: Dict[str, Any]
    config: Any  # mergekit.config.MergeConfiguration

    @property
    def where(self) -> str:
        label = f" (document {self.index + 1}" + (f", name {self.name!r})" if self.name else ")")
        return f"{self.path}{label if self.index or self.name else ''}"


def load_recipes(path: str) -> List[Recipe]:
    """Parse every document of ``path`` with mergekit's own configuration model."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    if not os.path.isfile(path):
        raise RecipeError(f"{path}: recipe file not found")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if not documents:
        raise RecipeError(f"{path}: the recipe is empty")
    recipes = []
    for index, document in enumerate(documents):
        if not isinstance(document, dict):
            raise RecipeError(f"{path}: document {index + 1} is not a mapping of recipe keys")
        document = dict(document)
        name = document.pop("name", None)
        try:
            config = MergeConfiguration.model_validate(document)
        except (ValidationError, RuntimeError, ValueError) as error:
            raise RecipeError(f"{path}: document {index + 1}: {_short(error)}") from None
        recipes.append(Recipe(path, index, name, document, config))
    return recipes


def _short(error: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        parts = []
        for item in error.errors()[:3]:
            location = ".".join(str(p) for p in item["loc"])
            parts.append(f"{location}: {item['msg']}")
        return "; ".join(parts)
    return str(error)


def _parameter_blocks(
    scope: Dict[str, Any], prefix: str = ""
) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Every ``parameters:`` mapping in a raw recipe, with a readable location.

    The recipe, each output slice and each module share one shape (``parameters``, input
    ``models`` or slice ``sources``, nested ``slices`` / ``modules``), so one walk covers all.
    """
    if isinstance(scope.get("parameters"), dict):
        yield f"{prefix}parameters" if prefix else "top-level parameters", scope["parameters"]
    for key in ("models", "sources"):
        for i, entry in enumerate(scope.get(key) or []):
            if isinstance(entry, dict) and isinstance(entry.get("parameters"), dict):
                yield f"{prefix}{key}[{i}] ({entry.get('model', '?')})", entry["parameters"]
    for j, out_slice in enumerate(scope.get("slices") or []):
        if isinstance(out_slice, dict):
            yield from _parameter_blocks(out_slice, f"{prefix}slices[{j}].")
    for name, module in (scope.get("modules") or {}).items():
        if isinstance(module, dict):
            yield from _parameter_blocks(module, f"{prefix}modules.{name}.")


def _scalars(setting: Any) -> Iterable[Tuple[Any, Optional[str]]]:
    """The plain values inside a setting (gradients and ``filter:`` lists), with filters."""
    if isinstance(setting, dict) and "value" in setting:
        for value, _ in _scalars(setting["value"]):
            yield value, setting.get("filter")
    elif isinstance(setting, list):
        for item in setting:
            yield from _scalars(item)
    else:
        yield setting, None


def check_parameters(recipe: Recipe) -> None:
    """Reject unknown parameter keys ("did you mean") and out-of-range values."""
    from mergekit.merge_methods import registry

    method_name = recipe.config.merge_method
    try:
        method = registry.get(method_name)
    except RuntimeError:
        known = sorted(m.spec.name for m in registry.registered_methods())
        hint = difflib.get_close_matches(method_name, known, n=1)
        suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
        raise RecipeError(
            f"{recipe.where}: unknown merge_method {method_name!r}.{suggestion} "
            f"Available: {', '.join(known)}"
        ) from None
    specs = {spec.name: spec for spec in method.spec.parameters}
    for location, block in _parameter_blocks(recipe.source):
        for key, setting in block.items():
            if key not in specs:
                hint = difflib.get_close_matches(key, list(specs), n=1)
                suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
                raise RecipeError(
                    f"{recipe.where}: {location}: unknown parameter {key!r} for merge method "
                    f"{method_name!r}.{suggestion} Valid parameters: {', '.join(specs) or 'none'}"
                    " (mergekit would silently ignore it and use the default)"
                )
            for value, filter_ in _scalars(setting):
                try:
                    specs[key].validate(value)
                except Exception as error:  # pydantic's ValidationError and friends
                    scope = f" (filter {filter_!r})" if filter_ else ""
                    raise RecipeError(
                        f"{recipe.where}: {location}: {key} = {value!r}{scope} is invalid: "
                        f"{_short(error)}"
                    ) from None


def _model_paths(recipe: Recipe) -> List[str]:
    return sorted({ref.model.path for ref in recipe.config.referenced_models()})


def check_models_exist(recipe: Recipe, stage_names: Iterable[str] = ()) -> None:
    """Every referenced model is a local folder (or a mergekit-multi stage name)."""
    stages = set(stage_names)
    for path in _model_paths(recipe):
        if path in stages:
            continue
        if not os.path.isdir(path):
            raise RecipeError(
                f"{recipe.where}: model {path!r} not found (looked in {os.path.abspath(path)}). "
                "Give the path of a local model folder; relative paths are taken from the "
                "directory you run the command in. fapm-merge never downloads models."
            )


def safetensors_shapes(folder: str) -> Optional[Dict[str, Tuple[Tuple[int, ...], str]]]:
    """Tensor name -> (shape, file) from the safetensors headers of a model folder.

    Reads only the JSON headers. Returns ``None`` for folders without safetensors weights
    (e.g. ``pytorch_model.bin``), which cannot be checked without loading them.
    """
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        return None
    shapes = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise RecipeError(f"{index_path}: lists shard {name}, which does not exist")
        with open(path, "rb") as handle:
            try:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            except (struct.error, ValueError):
                raise RecipeError(f"{path}: not a readable safetensors file") from None
        for tensor, info in header.items():
            if tensor != "__metadata__":
                shapes[tensor] = (tuple(info["shape"]), path)
    return shapes


def check_tensors_match(recipe: Recipe) -> None:
    """Base and every fine-tune hold the same tensor names with the same shapes."""
    base = recipe.config.base_model
    if base is None or not os.path.isdir(base.model.path):
        return
    base_shapes = safetensors_shapes(base.model.path)
    if base_shapes is None:
        return
    vocab_aligned = recipe.config.tokenizer is not None or recipe.config.tokenizer_source
    for path in _model_paths(recipe):
        if path == base.model.path or not os.path.isdir(path):
            continue
        shapes = safetensors_shapes(path)
        if shapes is None:
            continue
        missing = sorted(set(base_shapes) - set(shapes))
        extra = sorted(set(shapes) - set(base_shapes))
        if missing or extra:
            name, holder, lacking = (
                (missing[0], base.model.path, path) if missing else (extra[0], path, base.model.path)
            )
            count = len(missing) + len(extra)
            raise RecipeError(
                f"{recipe.where}: tensor {name!r} is in {holder} but missing from {lacking}"
                f" ({count} tensor name(s) differ). Merge only checkpoints of the same "
                "architecture, fine-tuned from this base."
            )
        for name, (shape, file) in base_shapes.items():
            other_shape, other_file = shapes[name]
            if shape == other_shape:
                continue
            if vocab_aligned and ("embed" in name or "lm_head" in name):
                continue  # mergekit's tokenizer section realigns vocabulary rows
            hint = (
                " The vocabularies differ: add `tokenizer: {source: base}` to the recipe."
                if ("embed" in name or "lm_head" in name)
                else " The fine-tune must come from this base model."
            )
            raise RecipeError(
                f"{recipe.where}: tensor {name!r} has shape {list(shape)} in {file} but "
                f"{list(other_shape)} in {other_file}.{hint}"
            )


def check_recipe_file(path: str, check_models: bool = True) -> List[Recipe]:
    """All checks for a ``mergekit-yaml`` or ``mergekit-multi`` recipe file.

    Raises :class:`RecipeError` on the first problem; returns the parsed documents.
    """
    import fapm_merge

    fapm_merge.register()
    recipes = load_recipes(path)
    stage_names = [r.name for r in recipes if r.name]
    for recipe in recipes:
        check_parameters(recipe)
        if check_models:
            check_models_exist(recipe, stage_names)
            check_tensors_match(recipe)
    return recipes
