"""The user's recipe, what the sweep supports, and one mergekit recipe per variant.

Every variant of a sweep is an ordinary mergekit recipe (a dict), so each number the sweep
reports can be rebuilt by hand with ``mergekit-yaml recipe.yml OUT``:

- a *sweep point* ``(score, sparsity)``: the user's recipe with the **default** ``sparsity``
  (and, when ``--score`` is given, the default ``score``) replaced; ``filter:`` overrides,
  per-layer gradients on other parameters and everything else stay as written;
- DARE: the same with ``score: random``, ``rescale: density`` and a ``seed``;
- WiSE-FT: mergekit's ``linear`` between the base (weight ``1 - alpha``) and the fine-tune
  (weight ``alpha``);
- LiNeS-style: mergekit's ``task_arithmetic`` with a layer gradient on the fine-tune's
  ``weight``, from ``first_layer`` at the first layer to 1 at the last (tensors outside the
  layers, embeddings and final norm, take the gradient's first value);
- the two references, ``pretrained`` and ``finetuned``: the models themselves (no recipe).

"Default" means the value mergekit falls back to for a tensor that no ``filter:`` entry
matches, found in mergekit's order of precedence: the fine-tune's own ``parameters``, then
the top-level ``parameters`` (then the method default, 0.9). In a scope whose setting is a
list of ``filter:`` entries, the catch-all entry (no filter, or ``"*"``) is the default; a
list without one falls through to the next scope, as in mergekit.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import yaml

from fapm_merge.choices import SCORES

# parameter name -> is it per model (NON_BASE scope) in fapm's spec (see fapm_merge.methods)
_PER_MODEL = {"sparsity": True, "weight": True, "score": False, "rescale": False,
              "seed": False, "normalize": False, "lambda": False}
SWEEPABLE_SCORES = SCORES


class SweepInputError(ValueError):
    """Input the sweep cannot run with; the message names the thing and the fix."""


@dataclass(frozen=True)
class Variant:
    """One model the sweep scores.

    ``kind``: ``reference`` (``pretrained`` / ``finetuned``), ``sweep`` (a ``(score,
    sparsity)`` point of the user's recipe), ``dare``, ``wise``, ``lines``, ``spectral`` or
    ``lowrank`` (baselines).
    ``sparsity`` is the swept default (tensors with a ``filter:`` override keep theirs);
    ``alpha`` WiSE-FT's weight of the fine-tune; ``seed`` DARE's drop seed;
    ``first_layer`` the LiNeS-style weight of the first layer's change (the last layer's is 1);
    ``rank`` the ``lowrank`` baseline's rank (``spectral`` chooses its own per tensor).
    """

    kind: str
    score: Optional[str] = None
    sparsity: Optional[float] = None
    alpha: Optional[float] = None
    seed: Optional[int] = None
    reference: Optional[str] = None
    first_layer: Optional[float] = None
    rank: Optional[int] = None

    @property
    def name(self) -> str:
        if self.kind == "reference":
            return str(self.reference)
        if self.kind == "sweep":
            return f"{self.score}-{self.sparsity:g}"
        if self.kind == "dare":
            return f"dare-{self.sparsity:g}-seed{self.seed}"
        if self.kind == "lines":
            return f"lines-{self.first_layer:g}"
        if self.kind == "spectral":
            return "spectral"
        if self.kind == "lowrank":
            return f"lowrank-{self.rank}"
        return f"wise-{self.alpha:g}"

    @property
    def method(self) -> str:
        """The family a plot groups it in: a score name, ``dare``, ``wise`` or the reference."""
        return {"sweep": str(self.score), "reference": str(self.reference)}.get(
            self.kind, self.kind)

    def as_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if value is not None}


@dataclass
class SweepRecipe:
    """The user's recipe, checked for what the sweep supports.

    ``source``: the raw YAML mapping; ``base`` / ``finetuned``: the model paths as written
    (mergekit resolves relative paths from the working directory, so does the sweep).
    """

    path: str
    text: str
    source: Dict[str, Any]
    base: str
    finetuned: str

    @property
    def digest(self) -> str:
        """sha256 of the recipe's content (YAML re-serialized, so comments do not count)."""
        return _digest(self.source)

    def score(self) -> str:
        """The recipe's own default score (what a sweep without ``--score`` uses)."""
        value = _default_of(self.source, self.finetuned, "score")
        return value if isinstance(value, str) else "fapm"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def load_sweep_recipe(path: str, check_models: bool = True) -> SweepRecipe:
    """Parse and check a recipe for the sweep; :class:`SweepInputError` says what is wrong.

    Supported: one YAML document, ``merge_method: fapm``, a ``base_model`` and exactly one
    fine-tune under ``models:`` (the base may be listed there too), no ``slices:`` /
    ``modules:`` and no ``manifest`` (it would write one record per variant).
    """
    from fapm_merge.recipe import RecipeError, check_recipe_file

    try:
        recipes = check_recipe_file(path, check_models=check_models)
    except RecipeError as error:
        raise SweepInputError(str(error)) from None
    if len(recipes) != 1:
        raise SweepInputError(
            f"{path} holds {len(recipes)} recipes; the sweep takes one `fapm` recipe "
            "(a base model and one fine-tune): split the file")
    recipe = recipes[0]
    config, source = recipe.config, recipe.source
    method = config.merge_method
    if method != "fapm":
        raise SweepInputError(
            f"{path}: merge_method is {method!r}; the sweep supports `merge_method: fapm` with "
            "a base model and one fine-tune (WiSE-FT and DARE are built in as baselines: "
            "--wise, --dare-seeds)")
    if config.slices or config.modules:
        raise SweepInputError(
            f"{path}: the sweep supports recipes written with `models:` only, not "
            "`slices:` / `modules:`; write the recipe with `base_model` and `models`")
    if config.base_model is None:
        raise SweepInputError(f"{path}: fapm needs a `base_model`; add `base_model: PATH`")
    base = config.base_model.model.path
    others = [m for m in (source.get("models") or [])
              if isinstance(m, dict) and str(m.get("model")) != base]
    if len(others) != 1:
        raise SweepInputError(
            f"{path}: the recipe merges {len(others)} fine-tunes into the base; the sweep "
            "supports exactly one (sparsity is chosen per fine-tune): keep one under `models:`")
    if _mentions(source, "manifest"):
        raise SweepInputError(
            f"{path}: `manifest` would record every variant of the sweep; remove it from the "
            "recipe (run `fapm-merge run --manifest` on the recommended recipe instead)")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    return SweepRecipe(path=path, text=text, source=source, base=base,
                       finetuned=str(others[0]["model"]))


def _mentions(source: dict, key: str) -> bool:
    blocks = [source.get("parameters") or {}]
    blocks += [(m.get("parameters") or {}) for m in source.get("models") or []
               if isinstance(m, dict)]
    return any(isinstance(b, dict) and key in b for b in blocks)


def _is_catch_all(item: Any) -> bool:
    return isinstance(item, dict) and "value" in item and item.get("filter") in (None, "*")


def _is_filter_list(setting: Any) -> bool:
    return isinstance(setting, list) and bool(setting) and all(
        isinstance(item, dict) and "value" in item for item in setting)


def _scopes(source: dict, finetuned: str, key: str) -> List[dict]:
    """The ``parameters`` mappings that can hold ``key``'s default, highest precedence first."""
    scopes = []
    if _PER_MODEL.get(key, False):
        for entry in source.get("models") or []:
            if isinstance(entry, dict) and str(entry.get("model")) == finetuned:
                scopes.append(entry.get("parameters") or {})
    scopes.append(source.get("parameters") or {})
    return scopes


def _default_of(source: dict, finetuned: str, key: str) -> Any:
    """The value the recipe falls back to for ``key`` (None: the method default)."""
    for scope in _scopes(source, finetuned, key):
        if key not in scope:
            continue
        setting = scope[key]
        if isinstance(setting, dict) and "value" in setting:
            setting = [setting]
        if _is_filter_list(setting):
            for item in setting:
                if _is_catch_all(item):
                    return item["value"]
            continue
        return setting
    return None


def set_default(source: dict, finetuned: str, key: str, value: Any) -> dict:
    """A copy of ``source`` whose default ``key`` is ``value``; filtered entries stay."""
    result = copy.deepcopy(source)
    for scope in _scopes(result, finetuned, key):
        if key not in scope:
            continue
        setting = scope[key]
        if isinstance(setting, dict) and "value" in setting:
            setting = scope[key] = [setting]
        if _is_filter_list(setting):
            for item in setting:
                if _is_catch_all(item):
                    item["value"] = value
                    return result
            continue  # no catch-all here: mergekit falls through to the next scope
        scope[key] = value  # a plain value or a layer gradient: the swept value replaces it
        return result
    result.setdefault("parameters", {})
    if result["parameters"] is None:
        result["parameters"] = {}
    result["parameters"][key] = value
    return result


def variant_recipe(recipe: SweepRecipe, variant: Variant) -> Optional[dict]:
    """The mergekit recipe of one variant (None for the two references)."""
    if variant.kind == "reference":
        return None
    if variant.kind in ("wise", "lines", "spectral", "lowrank"):
        if variant.kind == "wise":
            config: Dict[str, Any] = {"merge_method": "linear", "base_model": recipe.base,
                                      "models": [
                {"model": recipe.base, "parameters": {"weight": round(1.0 - variant.alpha, 6)}},
                {"model": recipe.finetuned, "parameters": {"weight": variant.alpha}}]}
        elif variant.kind in ("spectral", "lowrank"):
            config = {"merge_method": variant.kind, "base_model": recipe.base,
                      "models": [{"model": recipe.finetuned}]}
            if variant.kind == "lowrank":
                config["parameters"] = {"rank": variant.rank}
        else:
            config = {"merge_method": "task_arithmetic", "base_model": recipe.base,
                      "models": [{"model": recipe.finetuned,
                                  "parameters": {"weight": [variant.first_layer, 1.0]}}]}
        for key in ("dtype", "out_dtype", "tokenizer", "tokenizer_source"):
            if recipe.source.get(key) is not None:
                config[key] = copy.deepcopy(recipe.source[key])
        return config
    source = set_default(recipe.source, recipe.finetuned, "sparsity", variant.sparsity)
    if variant.kind == "sweep":
        return set_default(source, recipe.finetuned, "score", variant.score)
    # DARE: a random drop with the 1/(1-s) rescaling
    source = set_default(source, recipe.finetuned, "score", "random")
    source = set_default(source, recipe.finetuned, "rescale", "density")
    return set_default(source, recipe.finetuned, "seed", variant.seed)


def dump_recipe(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def parse_fractions(text: str, option: str, low: float = 0.0, high: float = 1.0) -> List[float]:
    """``"0.5,0.9"`` -> ``[0.5, 0.9]`` (order kept, duplicates dropped), each in [low, high]."""
    values: List[float] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise SweepInputError(f"{option}: {part!r} is not a number") from None
        if not low <= value <= high:
            raise SweepInputError(
                f"{option}: {part} is outside [{low:g}, {high:g}] (a fraction of the task "
                "vector that is pruned: 0 keeps the fine-tune, 1 keeps the base)"
                if option == "--sparsity" else f"{option}: {part} is outside [{low:g}, {high:g}]")
        if value not in values:
            values.append(value)
    return values


def build_variants(recipe: SweepRecipe, sparsities: List[float], scores: List[str],
                   wise: List[float], dare_seeds: List[int],
                   lines: Sequence[float] = (), spectral: bool = False,
                   lowrank: Sequence[int] = ()) -> List[Variant]:
    """Every variant of a sweep in the order it is run: the references first, then each
    score from the highest sparsity down (each step keeps a superset of the last), then the
    baselines."""
    variants = [Variant("reference", reference="pretrained"),
                Variant("reference", reference="finetuned")]
    order = sorted(sparsities, reverse=True)
    for score in scores:
        variants += [Variant("sweep", score=score, sparsity=s) for s in order]
    for seed in dare_seeds:
        variants += [Variant("dare", sparsity=s, seed=seed) for s in order]
    variants += [Variant("wise", alpha=a) for a in wise]
    variants += [Variant("lines", first_layer=w) for w in lines]
    variants += [Variant("spectral")] if spectral else []
    variants += [Variant("lowrank", rank=int(r)) for r in lowrank]
    return variants


def model_fingerprint(path: str) -> dict:
    """What identifies a local model folder for the resume key: its absolute path and the
    name, size and modification time of every weight and config file (no hashing of GBs)."""
    folder = os.path.abspath(path)
    files = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith((".safetensors", ".bin", ".json")):
                stat = os.stat(os.path.join(folder, name))
                files.append([name, stat.st_size, stat.st_mtime_ns])
    return {"path": folder, "files": files}


def variant_key(models: dict, recipe_config: Optional[dict], variant: Variant,
                evaluation: dict) -> str:
    """The resume key of one variant: a hash of (models, its recipe, the variant, the
    evaluation settings: tasks, limit, few-shot, lm-eval version, dtype...)."""
    return _digest({"models": models, "recipe": recipe_config, "variant": variant.as_dict(),
                    "evaluation": evaluation})[:16]
