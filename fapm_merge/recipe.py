"""Recipe checks that mergekit does not make, run before any tensor is read.

mergekit silently ignores unknown parameter keys (``sparsty: 0.5`` runs with the default), only
finds a missing model or tensor mid-merge, and leaves a partial output behind. These checks
read the YAML and the safetensors *headers* only, so they take milliseconds, and every message
names the file or tensor and the fix.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import yaml

from fapm_merge import mergekit_schema


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


def load_recipes(path: str, tables: Dict[str, Any], light: bool = False) -> List[Recipe]:
    """Parse and check every document of ``path``.

    ``tables`` is :mod:`fapm_merge.mergekit_schema`'s (config schema and method parameters).
    The documents are validated by mergekit's own ``MergeConfiguration``, or, when ``light``,
    by the JSON schema alone, without importing mergekit (``Recipe.config`` is then None).
    """
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
        where = f"{path}: document {index + 1}" if len(documents) > 1 else path
        check_schema(document, where, tables["config"])
        config, problem = None, None
        if light:
            problem = mergekit_schema.check_value(document, tables["config"])
        else:
            from mergekit.config import MergeConfiguration
            from pydantic import ValidationError

            try:
                config = MergeConfiguration.model_validate(document)
            except (ValidationError, RuntimeError, ValueError) as error:
                problem = _short(error)
        if problem:
            raise RecipeError(f"{path}: document {index + 1}: {problem}")
        recipes.append(Recipe(path, index, name, document, config))
    return recipes


def _short(error: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        parts = []
        for item in error.errors()[:3]:
            location = ".".join(str(p) for p in item["loc"])
            parts.append(f"{location}: {item['msg']}" if location else item["msg"])
        return "; ".join(parts)
    return str(error)


# The dtype names mergekit's `dtype_from_name` accepts for `dtype:` / `out_dtype:` (it
# raises mid-merge on anything else).
DTYPES = ("bfloat16", "float16", "float32", "float64", "int64")


def _hint(key: Any, valid: List[str]) -> str:
    """`` Did you mean 'x'?`` for the closest valid name, or nothing."""
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _walk_keys(value: Any, node: Dict[str, Any], defs: Dict[str, Any], location: str,
               where: str) -> None:
    """Check the keys of ``value`` against the JSON-schema ``node``, recursively.

    A mapping is checked against the one object its node admits (a model's properties, or a
    name -> schema mapping); where several objects fit (a tokenizer ``source``) mergekit picks,
    and the walk stops. A list's items are checked against the union of its array branches.
    """
    options = mergekit_schema.branches(node, defs)
    if isinstance(value, list):
        items = [option["items"] for option in options if option.get("type") == "array"
                 and "items" in option]
        for i, entry in enumerate(value):
            _walk_keys(entry, {"anyOf": items}, defs, f"{location}[{i}]", where)
        return
    objects = [option for option in options if option.get("type") == "object"]
    if not (isinstance(value, dict) and len(objects) == 1):
        return
    properties = objects[0].get("properties")
    extra = objects[0].get("additionalProperties")
    for key, entry in value.items():
        path = f"{location}.{key}" if location else str(key)
        if properties is None:
            if isinstance(extra, dict):
                _walk_keys(entry, extra, defs, path, where)
            continue
        if key not in properties:
            raise RecipeError(
                f"{where}: unknown key {path!r}.{_hint(key, list(properties))} Valid keys "
                f"here: {', '.join(properties)} (mergekit would silently ignore it)"
            )
        _walk_keys(entry, properties[key], defs, path, where)


def check_schema(document: Dict[str, Any], where: str, config_schema: Dict[str, Any]) -> None:
    """Reject keys that mergekit's configuration schema does not have, at any depth.

    mergekit's pydantic models ignore unknown keys, so ``paramters:`` under a model,
    ``fitler:`` in a parameter's filter list or ``dtpye:`` at the root would merge with the
    defaults. The walk follows the JSON schema of ``MergeConfiguration`` (models, slices,
    modules, tokenizer, ...), so it stays in step with the installed mergekit.
    """
    _walk_keys(document, config_schema, config_schema.get("$defs", {}), "", where)
    for key in ("dtype", "out_dtype"):
        value = document.get(key)
        if value is not None and str(value).removeprefix("torch.") not in DTYPES:
            raise RecipeError(
                f"{where}: {key}: {value!r} is not a dtype mergekit knows."
                f"{_hint(value, list(DTYPES))} Valid: {', '.join(DTYPES)}"
            )


def parameter_blocks(
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
            yield from parameter_blocks(out_slice, f"{prefix}slices[{j}].")
    for name, module in (scope.get("modules") or {}).items():
        if isinstance(module, dict):
            yield from parameter_blocks(module, f"{prefix}modules.{name}.")


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


def check_parameters(recipe: Recipe, tables: Dict[str, Any], light: bool = False) -> None:
    """Reject an unknown merge method, unknown parameter keys ("did you mean") and values
    mergekit would refuse mid-merge (by mergekit's own parameter types, or, when ``light``,
    by their JSON schema)."""
    method_name = recipe.source.get("merge_method")
    methods = tables["methods"]
    if method_name not in methods:
        raise RecipeError(
            f"{recipe.where}: unknown merge_method {method_name!r}."
            f"{_hint(method_name, list(methods))} Available: {', '.join(sorted(methods))}"
        )
    specs = methods[method_name]
    if not light:
        from mergekit.merge_methods import registry

        live = {spec.name: spec for spec in registry.get(method_name).spec.parameters}
    for location, block in parameter_blocks(recipe.source):
        for key, setting in block.items():
            if key not in specs:
                raise RecipeError(
                    f"{recipe.where}: {location}: unknown parameter {key!r} for merge method "
                    f"{method_name!r}.{_hint(key, list(specs))} Valid parameters: "
                    f"{', '.join(specs) or 'none'} (mergekit would silently ignore it and use "
                    "the default)"
                )
            schema = specs[key]["schema"]
            defs = schema.get("$defs", {})
            admits_bool = any(option.get("type") == "boolean"
                              for option in mergekit_schema.branches(schema, defs))
            for value, filter_ in _scalars(setting):
                scope = f" (filter {filter_!r})" if filter_ else ""
                if isinstance(value, bool) and not admits_bool:
                    raise RecipeError(
                        f"{recipe.where}: {location}: {key} = {value!r}{scope} is a YAML "
                        "boolean (yes/no/true/false), not a number; write the number"
                    )
                if light:
                    problem = mergekit_schema.check_value(value, schema, defs)
                else:
                    try:
                        live[key].validate(value)
                        problem = None
                    except Exception as error:  # pydantic's ValidationError and friends
                        problem = _short(error)
                if problem:
                    raise RecipeError(
                        f"{recipe.where}: {location}: {key} = {value!r}{scope} is invalid: "
                        f"{problem}"
                    )


NO_MODEL_CHECK_HINT = (
    " (if this check is wrong for your models, skip the model checks with --no-model-check)"
)


class ModelCheckError(RecipeError):
    """A model folder or tensor header does not fit the recipe (skippable with
    ``--no-model-check``, which the message says)."""

    def __init__(self, message: str):
        super().__init__(message + NO_MODEL_CHECK_HINT)


def model_folders(
    recipe: Recipe, stage_names: Iterable[str] = (), allow_uncached: bool = False
) -> Dict[str, Tuple[str, Optional[str]]]:
    """Reference -> (local model folder, local LoRA folder or None) of every model the recipe
    reads, resolved as mergekit resolves them (hub ids from the cache, never downloaded);
    mergekit-multi stage names are left out. ``allow_uncached``: a hub id that is not cached
    is left out too (mergekit will download it), instead of an error."""
    from fapm_merge.references import ReferenceError, looks_like_hub_id, resolve

    stages = set(stage_names)
    folders = {}
    for reference in recipe.config.referenced_models():
        if reference.model.path in stages:
            continue
        try:
            folders[str(reference)] = resolve(reference)
        except ReferenceError as error:
            hub = looks_like_hub_id(reference.model.path) and not os.path.exists(reference.model.path)
            if not (allow_uncached and hub):
                raise ModelCheckError(f"{recipe.where}: {error}") from None
    return folders


def check_models_exist(
    recipe: Recipe, stage_names: Iterable[str] = (), allow_uncached: bool = False
) -> None:
    """Every referenced model is a local folder or cached hub model (or a mergekit-multi
    stage name); every LoRA adapter is a LoRA adapter for its model."""
    from fapm_merge.references import ReferenceError, check_lora

    folders = model_folders(recipe, stage_names, allow_uncached)
    for reference in recipe.config.referenced_models():
        if str(reference) not in folders and reference.model.path not in set(stage_names):
            print(f"warning: {recipe.where}: {reference} is not in the Hugging Face cache; "
                  "mergekit will download it, and its tensors are not checked beforehand",
                  file=sys.stderr)
    for label, (model, lora) in folders.items():
        if lora is None:
            continue
        shapes = safetensors_shapes(model, label) or {}
        try:
            warnings = check_lora(lora, model, list(shapes), f"{recipe.where}: {label}")
        except ReferenceError as error:
            raise ModelCheckError(str(error)) from None
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)


# safetensors' own limit on the JSON header; a larger length field means a damaged file.
_MAX_HEADER = 100_000_000
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


def _read_header(path: str, model: str) -> Dict[str, Any]:
    """The JSON header of one safetensors file, checked against the file's size.

    A header length beyond the file (garbage bytes) or data offsets past its end (a
    truncated download) are reported here, naming the file and the model, instead of a
    MemoryError now or a failure mid-merge.
    """
    def damaged(why: str) -> ModelCheckError:
        return ModelCheckError(
            f"{path} (model {model}): not a readable safetensors file: {why}. "
            "Re-download or re-save the checkpoint."
        )

    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise damaged(f"only {size} bytes")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, _MAX_HEADER):
            raise damaged(f"its header claims {length} bytes but the file has {size}")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            raise damaged("the header is not JSON") from None
    if not isinstance(header, dict):
        raise damaged("the header is not a JSON object")
    data_size = size - 8 - length
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(x) for x in info["shape"])
            width = _DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise damaged(f"tensor {tensor!r} has no valid dtype/shape/data_offsets") from None
        if end > data_size:
            raise damaged(
                f"tensor {tensor!r} ends at byte {end} of the data but the file holds "
                f"{data_size} bytes of data (truncated?)"
            )
        if width is not None and end - begin != math.prod(shape) * width:
            raise damaged(f"tensor {tensor!r}: its byte range does not match shape {list(shape)}")
    return header


def safetensors_shapes(
    folder: str, model: Optional[str] = None
) -> Optional[Dict[str, Tuple[Tuple[int, ...], str]]]:
    """Tensor name -> (shape, file) from the safetensors headers of a model folder.

    Reads only the JSON headers (bounded by each file's size). Returns ``None`` for folders
    without safetensors weights (e.g. ``pytorch_model.bin``), which cannot be checked without
    loading them. ``model`` names the model in messages (default: the folder).
    """
    model = model or folder
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as handle:
                files = sorted(set(json.load(handle)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelCheckError(
                f"{index_path} (model {model}): not a valid safetensors index (no weight_map)"
            ) from None
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        return None
    shapes = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ModelCheckError(
                f"{index_path} (model {model}): lists shard {name}, which does not exist"
            )
        for tensor, info in _read_header(path, model).items():
            if tensor != "__metadata__":
                shapes[tensor] = (tuple(info["shape"]), path)
    return shapes


@dataclass(frozen=True)
class WeightRoles:
    """What mergekit's architecture definition says about tensor names of one model.

    ``vocabulary_axis``: name -> the axis indexed by token ids (embeddings, lm_head);
    ``optional``: names a model may lack (e.g. ``lm_head.weight`` with tied embeddings);
    ``known``: every name mergekit merges (others are dropped silently), or None when the
    architecture is not one mergekit defines (then every tensor is checked, and names with
    ``embed`` / ``lm_head`` / ``wte`` are taken to have the vocabulary on axis 0).
    """

    vocabulary_axis: Dict[str, int]
    optional: frozenset
    known: Optional[frozenset]

    def axis_of(self, name: str) -> Optional[int]:
        if self.known is None:
            return 0 if any(part in name for part in ("embed", "lm_head", "wte")) else None
        return self.vocabulary_axis.get(name)


def weight_roles(folder: str) -> WeightRoles:
    """:class:`WeightRoles` from the model's ``config.json`` and mergekit's architectures."""
    try:
        from mergekit.architecture import arch_info_for_config
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        architecture = arch_info_for_config(config)
        weights = architecture.all_weights(config) if architecture is not None else None
    except Exception:  # no or unusual config.json: fall back to names
        weights = None
    if weights is None:
        return WeightRoles({}, frozenset(), None)
    axis, optional, known = {}, set(), set()
    for weight in weights:
        names = (weight.name, *(weight.aliases or ()))
        known.update(names)
        if weight.vocabulary_axis is not None:
            axis.update({name: weight.vocabulary_axis for name in names})
        if weight.optional or weight.tied_names:
            optional.update(names)
    return WeightRoles(axis, frozenset(optional), frozenset(known))


def vocabulary_only(shape: Tuple[int, ...], other: Tuple[int, ...], axis: Optional[int]) -> bool:
    """Two shapes differ only along the vocabulary ``axis`` (a resized vocabulary)."""
    if axis is None or len(shape) != len(other) or axis >= len(shape):
        return False
    return all(a == b for i, (a, b) in enumerate(zip(shape, other)) if i != axis)


def check_tensors_match(
    recipe: Recipe, stage_names: Iterable[str] = (), allow_uncached: bool = False
) -> None:
    """Base and every fine-tune hold the same tensors with the same shapes.

    Follows mergekit's architecture definition: tensors it does not merge are ignored,
    optional ones (tied ``lm_head``) may be missing, and shapes may differ along the
    vocabulary axis when the recipe has a ``tokenizer`` section, which realigns the rows.
    """
    base = recipe.config.base_model
    folders = model_folders(recipe, stage_names, allow_uncached)
    if base is None or str(base) not in folders:
        return
    base_folder = folders[str(base)][0]
    base_shapes = safetensors_shapes(base_folder, str(base))
    if base_shapes is None:
        return
    roles = weight_roles(base_folder)
    vocab_aligned = recipe.config.tokenizer is not None or recipe.config.tokenizer_source
    # a LoRA merge keeps its model's shapes: check the model folder
    for path in sorted({model for model, _ in folders.values()}):
        if path == base_folder:
            continue
        shapes = safetensors_shapes(path)
        if shapes is None:
            continue
        merged = (lambda n: True) if roles.known is None else (lambda n: n in roles.known)
        missing = sorted(n for n in set(base_shapes) - set(shapes)
                         if merged(n) and n not in roles.optional)
        extra = sorted(n for n in set(shapes) - set(base_shapes)
                       if merged(n) and n not in roles.optional)
        if missing or extra:
            name, holder, lacking = (
                (missing[0], base.model.path, path) if missing else (extra[0], path, base.model.path)
            )
            count = len(missing) + len(extra)
            raise ModelCheckError(
                f"{recipe.where}: tensor {name!r} is in {holder} but missing from {lacking}"
                f" ({count} tensor name(s) differ). Merge only checkpoints of the same "
                "architecture, fine-tuned from this base."
            )
        differing = [
            (name, shape, shapes[name])
            for name, shape in base_shapes.items()
            if name in shapes and shape[0] != shapes[name][0] and merged(name)
        ]
        resized = [d for d in differing if vocabulary_only(d[1][0], d[2][0], roles.axis_of(d[0]))]
        other = [d for d in differing if d not in resized]
        if other:  # a real mismatch, reported before any vocabulary difference
            name, (shape, file), (other_shape, other_file) = other[0]
            raise ModelCheckError(
                f"{recipe.where}: tensor {name!r} has shape {list(shape)} in {file} but "
                f"{list(other_shape)} in {other_file}. The fine-tune must come from this base "
                f"model ({len(other)} tensor(s) differ in shape)."
            )
        if resized and not vocab_aligned:
            name, (shape, file), (other_shape, other_file) = resized[0]
            raise ModelCheckError(
                f"{recipe.where}: tensor {name!r} has shape {list(shape)} in {file} but "
                f"{list(other_shape)} in {other_file}: the vocabularies differ. Add "
                "`tokenizer: {source: base}` (or `source: union`) to the recipe."
            )


def check_recipe_file(
    path: str, check_models: bool = True, allow_uncached: bool = False, light: bool = False
) -> List[Recipe]:
    """All checks for a ``mergekit-yaml`` or ``mergekit-multi`` recipe file.

    ``light`` (only without ``check_models``): check the YAML, keys and values against the
    schema snapshot of :mod:`fapm_merge.mergekit_schema`, without importing mergekit or torch;
    ``Recipe.config`` is then None. It falls back to the full checks when the installed
    mergekit is not the snapshot's version or a method is not in it (another plugin's, or a
    typo, which the full checks name). Raises :class:`RecipeError` on the first problem;
    returns the parsed documents.
    """
    if light and check_models:
        raise ValueError("the light checks cannot check models")
    tables = mergekit_schema.snapshot() if light else None
    if tables is None:
        import fapm_merge

        fapm_merge.register()
        tables, light = mergekit_schema.live(), False
    recipes = load_recipes(path, tables, light)
    if light and any(r.source.get("merge_method") not in tables["methods"] for r in recipes):
        return check_recipe_file(path, check_models, allow_uncached, light=False)
    stage_names = [r.name for r in recipes if r.name]
    for recipe in recipes:
        check_parameters(recipe, tables, light)
        if check_models:
            check_models_exist(recipe, stage_names, allow_uncached)
            check_tensors_match(recipe, stage_names, allow_uncached)
    return recipes
