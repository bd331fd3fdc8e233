"""mergekit's recipe schema and merge-method parameters as data, so recipes can be checked
without importing mergekit.

``mergekit.config`` imports torch, peft and transformers, which ``fapm-merge validate
--no-model-check`` should not pay for (7.1 s through them on a 2-core machine, 0.15 s with this
module). This module holds the schema as
JSON: the JSON schema pydantic derives from ``MergeConfiguration`` and, for every merge method,
the JSON schema of each parameter's value type. The snapshot ``mergekit_schema.json`` beside it
is made from the installed mergekit by ``python -m fapm_merge.mergekit_schema --write``;
``tests/test_mergekit_schema.py`` keeps it equal to a fresh one and checks that the light
checks agree with mergekit's own on a corpus of good and bad recipes. The snapshot is only used
when the installed mergekit is the version it was made from.

:func:`check_value` is a small JSON-schema checker with pydantic's lax coercions (``"0.5"`` is a
number, ``1`` a boolean), enough for the types mergekit's schema uses; mergekit's model
validators (which pydantic cannot express in JSON schema) are :func:`check_model_rules`.
"""

from __future__ import annotations

import json
import math
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

SNAPSHOT = Path(__file__).with_name("mergekit_schema.json")

# pydantic's lax string forms of booleans
_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def installed_mergekit_version() -> Optional[str]:
    """The installed mergekit's version, from its metadata (does not import it)."""
    from importlib import metadata

    try:
        return metadata.version("mergekit")
    except metadata.PackageNotFoundError:
        return None


def generate() -> Dict[str, Any]:
    """The snapshot made from the installed mergekit (imports it, and torch)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry
    from pydantic import TypeAdapter

    import fapm_merge

    fapm_merge.register()
    methods = {}
    for method in sorted(registry.registered_methods(), key=lambda m: m.spec.name):
        methods[method.spec.name] = {
            spec.name: {"schema": TypeAdapter(spec.value_type).json_schema(),
                        "required": spec.required}
            for spec in method.spec.parameters
        }
    return {"mergekit": installed_mergekit_version(),
            "config": MergeConfiguration.model_json_schema(), "methods": methods}


@lru_cache(maxsize=1)
def live() -> Dict[str, Any]:
    """:func:`generate`, once per process (the full checks' tables)."""
    return generate()


@lru_cache(maxsize=1)
def snapshot() -> Optional[Dict[str, Any]]:
    """The committed snapshot, or None when the installed mergekit is another version."""
    data = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    return data if data["mergekit"] == installed_mergekit_version() else None


def resolve(node: Dict[str, Any], defs: Dict[str, Any]) -> Dict[str, Any]:
    """Follow a ``{"$ref": "#/$defs/Name"}`` node to its definition."""
    while "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[1]]
    return node


def branches(node: Dict[str, Any], defs: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The alternatives of a node (``anyOf`` flattened, references followed)."""
    node = resolve(node, defs)
    if "anyOf" in node:
        return [b for sub in node["anyOf"] for b in branches(sub, defs)]
    return [node]


# mergekit's ModelReference and ModelPath accept a string ("repo@rev+lora") before validation;
# JSON schema shows only their object form.
def _model_path_string(value: str) -> Optional[str]:
    if value.count("@") > 1:
        return f"invalid model path {value!r}: more than one '@'"
    return None


def _model_reference_string(value: str) -> Optional[str]:
    parts = value.split("+")
    if len(parts) > 2:
        return f"cannot parse model reference {value!r}: more than one '+'"
    for part in parts:
        problem = _model_path_string(part)
        if problem:
            return problem
    return None


STRING_FORMS = {"ModelPath": _model_path_string, "ModelReference": _model_reference_string}


def _number(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _type_problem(value: Any, kind: str) -> Optional[str]:
    """None if ``value`` passes pydantic's lax check for JSON type ``kind``."""
    if kind == "null":
        ok = value is None
    elif kind == "string":
        ok = isinstance(value, (str, bytes))
    elif kind == "number":
        ok = _number(value) is not None
    elif kind == "integer":
        number = _number(value)
        ok = number is not None and math.isfinite(number) and number == int(number)
    elif kind == "boolean":
        ok = (isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1))
              or (isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE))
    elif kind == "array":
        ok = isinstance(value, (list, tuple))
    elif kind == "object":
        ok = isinstance(value, dict)
    else:
        ok = True  # a type this checker does not know: leave it to mergekit
    return None if ok else f"expected {kind}, got {value!r}"


def check_value(value: Any, node: Dict[str, Any],
                defs: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Why ``value`` does not fit the JSON-schema ``node`` (None if it fits), as
    ``location: problem`` (``models[0].model: ...``); ``defs``: the ``$defs`` its references
    point into (default: the node's own).

    Types, ``enum`` / ``const``, number and length bounds, tuples, required properties, and
    each property's and item's own schema; unknown object keys are
    :func:`fapm_merge.recipe.check_schema`'s to report.
    """
    problem = _problem(value, node, node.get("$defs", {}) if defs is None else defs)
    if problem is None:
        return None
    location, message = problem
    return f"{location}: {message}" if location else message


Problem = Optional[Tuple[str, str]]  # (location inside the value, what is wrong)


def _inside(step: str, problem: Problem) -> Problem:
    """``problem`` of a part of the value, located from the value (``step``: key or [i])."""
    if problem is None:
        return None
    location, message = problem
    joined = step + ("" if not location else location if location.startswith("[")
                     else "." + location)
    return joined, message


def _problem(value: Any, node: Dict[str, Any], defs: Dict[str, Any]) -> Problem:
    options = branches(node, defs)
    problems, near = [], []
    for option in options:
        problem = _check_one(value, option, defs)
        if problem is None:
            return None
        problems.append(problem)
        # the branches of the value's own type say what is wrong inside it
        if "type" not in option or _type_problem(value, option["type"]) is None:
            near.append(problem)
    if not near and len(problems) > 1:  # no branch of the value's type: name the types
        kinds = list(dict.fromkeys(option.get("type") for option in options))
        return "", f"expected {', '.join(kinds[:-1])} or {kinds[-1]}, got {value!r}"
    chosen = list(dict.fromkeys(near or problems))
    if len(chosen) == 1:
        return chosen[0]
    return "", "; or ".join(f"{where}: {what}" if where else what for where, what in chosen)


def _check_one(value: Any, node: Dict[str, Any], defs: Dict[str, Any]) -> Problem:
    if isinstance(value, str) and node.get("title") in STRING_FORMS:
        message = STRING_FORMS[node["title"]](value)
        return ("", message) if message else None
    message = _check_here(value, node)
    if message:
        return "", message
    kind = node.get("type")
    if kind == "array":
        prefix = node.get("prefixItems", [])  # tuples: one schema per position
        for i, item in enumerate(value):
            schema = prefix[i] if i < len(prefix) else node.get("items")
            problem = _problem(item, schema, defs) if schema is not None else None
            if problem:
                return _inside(f"[{i}]", problem)
    if kind == "object" or "properties" in node:
        properties = node.get("properties", {})
        extra = node.get("additionalProperties")
        for key, item in value.items():
            schema = properties.get(key, extra if isinstance(extra, dict) else None)
            problem = _problem(item, schema, defs) if schema is not None else None
            if problem:
                return _inside(str(key), problem)
        message = check_model_rules(node.get("title"), value)
        if message:
            return "", message
    return None


def _check_here(value: Any, node: Dict[str, Any]) -> Optional[str]:
    """What is wrong with ``value`` itself against ``node`` (not its items or properties)."""
    if "const" in node and value != node["const"]:
        return f"expected {node['const']!r}, got {value!r}"
    if "enum" in node and value not in node["enum"]:
        return f"expected one of {', '.join(map(repr, node['enum']))}, got {value!r}"
    kind = node.get("type")
    problem = _type_problem(value, kind) if kind else None
    if problem:
        return problem
    if kind in ("number", "integer"):
        number = _number(value)
        for key, holds in (("minimum", lambda b: number >= b), ("maximum", lambda b: number <= b),
                           ("exclusiveMinimum", lambda b: number > b),
                           ("exclusiveMaximum", lambda b: number < b)):
            if key in node and not holds(node[key]):
                return f"{value!r} is outside the range ({key} {node[key]})"
    if kind == "array":
        if len(value) < node.get("minItems", 0):
            return f"expected at least {node['minItems']} items, got {value!r}"
        if len(value) > node.get("maxItems", len(value)):
            return f"expected at most {node['maxItems']} items, got {value!r}"
    if (kind == "object" or "properties" in node) and not isinstance(value, dict):
        return f"expected a mapping, got {value!r}"
    missing = [key for key in node.get("required", []) if isinstance(value, dict)
               and key not in value]
    if missing:
        return f"missing {', '.join(missing)}"
    return None


def check_model_rules(title: Optional[str], value: Dict[str, Any]) -> Optional[str]:
    """mergekit's model validators, which JSON schema does not carry (mergekit 0.1.5:
    ``MergeConfiguration``, ``OutputModuleDefinition``, ``ModelTokenEmbedding``)."""
    present = [key for key in ("modules", "slices", "models") if value.get(key)]
    if title == "MergeConfiguration":
        if len(present) != 1:
            return "Exactly one of 'models', 'slices', or 'modules' must be present"
        if value.get("tokenizer_source") and value.get("tokenizer"):
            return "Cannot specify both tokenizer_source and tokenizer"
    if title == "OutputModuleDefinition" and len([k for k in present if k != "modules"]) != 1:
        return "Must specify either output slices or models to merge"
    if title == "ModelTokenEmbedding":
        given = [value.get(key) is not None for key in ("token_id", "token")]
        if not any(given):
            return "token_id or token must be specified"
        if all(given):
            return "only one of token_id or token may be specified"
    return None


def _reference_key(reference: Any) -> tuple:
    """A raw model reference (``"repo@rev+lora"`` or its mapping form) as one comparable
    value, so that the two spellings of one model count once, as in mergekit."""
    def path(value: Any) -> tuple:
        if isinstance(value, str):
            name, _, revision = value.partition("@")
            return name, revision or None
        if isinstance(value, dict):
            return value.get("path"), value.get("revision")
        return repr(value), None

    if isinstance(reference, str):
        model, _, lora = reference.partition("+")
        return path(model), path(lora) if lora else None, None
    if isinstance(reference, dict):
        lora = reference.get("lora")
        return (path(reference.get("model")), path(lora) if lora else None,
                reference.get("override_architecture"))
    return (repr(reference),)


def referenced_models(document: Dict[str, Any]) -> List[Any]:
    """The distinct model references of a raw recipe (base, models, slices, modules), as
    mergekit's ``MergeConfiguration.referenced_models`` counts them."""
    found: Dict[tuple, Any] = {}

    def scope(block: Dict[str, Any]) -> None:
        for entry in block.get("models") or []:
            found.setdefault(_reference_key(entry.get("model")), entry.get("model"))
        for out_slice in block.get("slices") or []:
            for source in out_slice.get("sources") or []:
                found.setdefault(_reference_key(source.get("model")), source.get("model"))

    if document.get("base_model"):
        found[_reference_key(document["base_model"])] = document["base_model"]
    scope(document)
    for module in (document.get("modules") or {}).values():
        scope(module)
    return list(found.values())


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = json.dumps(generate(), indent=1, sort_keys=True) + "\n"
    if args == ["--write"]:
        SNAPSHOT.write_text(text, encoding="utf-8")
        print(f"wrote {SNAPSHOT}")
        return 0
    if args == ["--check"]:
        same = SNAPSHOT.read_text(encoding="utf-8") == text
        print("snapshot is current" if same else
              f"{SNAPSHOT} differs from the installed mergekit: rerun with --write")
        return 0 if same else 1
    print("usage: python -m fapm_merge.mergekit_schema --write | --check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
