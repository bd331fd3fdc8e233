"""``fapm-merge inspect``: where a fine-tune's forgetting risk sits, before and after pruning.

Streams the tensors of a base model (``W_pre``) and a fine-tune (``W_ft``) one pair at a time
from their safetensors files, and measures per tensor, per module type and per layer what the
task vector ``dW = W_ft - W_pre`` looks like and what FAPM and plain magnitude pruning keep of
it. Definitions and the ``stats.json`` schema: ``docs/inspect.md``.

Memory: one base tensor, one fine-tuned tensor, two boolean masks and the kernel's float32
temporaries at a time; the statistics themselves run over flat chunks of ``CHUNK`` elements.
Everything is computed in float32 (ratios and sums in float64), whatever the stored dtype.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors import safe_open

from fapm_merge import __version__, kernel

SCHEMA_VERSION = 1
CHUNK = 1 << 20  # elements per statistics chunk (4 MiB of float32, ~70 MiB of temporaries)
MASKS = ("fapm", "magnitude")

# |dW| / |W_pre| histogram, shared by every tally so that quantiles aggregate exactly.
# counts[0]: ratio == 0; counts[1]: 0 < ratio < 10**LOG10_MIN; counts[2 + i]: regular bin i,
# [10**(LOG10_MIN + i/B), 10**(LOG10_MIN + (i+1)/B)); counts[-1]: ratio >= 10**LOG10_MAX.
LOG10_MIN, LOG10_MAX, BINS_PER_DECADE = -12, 12, 100
N_BINS = (LOG10_MAX - LOG10_MIN) * BINS_PER_DECADE
QUANTILES = (0.5, 0.9, 0.99)

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class InspectError(ValueError):
    """A problem with the inputs (folders, files, tensors), worded with the fix."""


# --------------------------------------------------------------------------------------------
# Reading models
# --------------------------------------------------------------------------------------------


def _load_tensor(path: Path, name: str) -> torch.Tensor:
    """Read one tensor from one safetensors file (the file is opened and closed each time)."""
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)


@dataclass
class ModelFiles:
    """Where each tensor of a model lives, read from the safetensors headers only.

    ``where[name]`` is the shard file, ``dtype[name]`` the safetensors dtype string
    (``"BF16"``, ``"F32"``, ...), ``shape[name]`` a tuple of ints.
    """

    folder: Path
    role: str
    where: Dict[str, Path] = field(default_factory=dict)
    dtype: Dict[str, str] = field(default_factory=dict)
    shape: Dict[str, Tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: os.PathLike, role: str) -> "ModelFiles":
        folder = Path(folder)
        model = cls(folder=folder, role=role)
        for shard, expected in model._shards():
            if not shard.is_file():
                raise InspectError(
                    f"{role} model: {shard.name} is listed in {folder / 'model.safetensors.index.json'} "
                    f"but missing from {folder}; copy the complete checkpoint (all shards)"
                )
            try:
                with safe_open(str(shard), framework="pt") as handle:
                    for name in handle.keys():
                        piece = handle.get_slice(name)
                        model.where[name] = shard
                        model.dtype[name] = piece.get_dtype()
                        model.shape[name] = tuple(int(d) for d in piece.get_shape())
            except InspectError:
                raise
            except Exception as error:  # a truncated or foreign file
                raise InspectError(f"{role} model: cannot read {shard}: {error}") from None
            missing = [name for name in expected if model.where.get(name) != shard]
            if missing:
                raise InspectError(
                    f"{role} model: the index says {missing[0]} is in {shard.name}, but it is not "
                    f"there ({len(missing)} such tensors); the index and shards do not match"
                )
        return model

    def _shards(self) -> List[Tuple[Path, List[str]]]:
        """(shard file, names the index promises in it) in a stable order."""
        folder, role = self.folder, self.role
        if folder.is_file() and folder.suffix == ".safetensors":
            self.folder = folder.parent
            return [(folder, [])]
        if not folder.exists():
            raise InspectError(f"{role} model folder {folder} does not exist")
        if not folder.is_dir():
            raise InspectError(f"{role} model {folder} is neither a folder nor a .safetensors file")
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as error:
                raise InspectError(f"{role} model: {index} is not a safetensors index ({error})")
            by_file: Dict[str, List[str]] = {}
            for name, file in weight_map.items():
                by_file.setdefault(file, []).append(name)
            return [(folder / file, names) for file, names in sorted(by_file.items())]
        single = folder / "model.safetensors"
        if single.is_file():
            return [(single, [])]
        others = sorted(folder.glob("*.safetensors"))
        if others:
            return [(path, []) for path in others]
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = (
            f" (found {', '.join(found[:3])}: convert it with "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`)"
            if found
            else ""
        )
        raise InspectError(
            f"{role} model: no model.safetensors, model.safetensors.index.json or *.safetensors "
            f"in {folder}{hint}"
        )

    def load(self, name: str) -> torch.Tensor:
        return _load_tensor(self.where[name], name)


def module_type(name: str) -> str:
    """The module a tensor belongs to: ``model.layers.3.self_attn.q_proj.weight`` ->
    ``q_proj``; ``...q_proj.bias`` -> ``q_proj.bias``; ``model.norm.weight`` -> ``norm``."""
    parts = name.split(".")
    suffix = ""
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        suffix = "" if parts[-1] == "weight" else ".bias"
        parts = parts[:-1]
    leaf = parts[-1]
    if leaf.isdigit() and len(parts) > 1:
        leaf = f"{parts[-2]}.{leaf}"
    return leaf + suffix


def layer_index(name: str) -> Optional[int]:
    """``N`` for a name containing ``layers.N.``, else ``None`` (embeddings, final norm...)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def plan_tensors(
    base: ModelFiles,
    finetuned: ModelFiles,
    modules: Optional[str] = None,
    exclude: Optional[str] = None,
) -> Tuple[List[str], List[Dict[str, str]]]:
    """The tensor names to inspect (natural order) and the ones skipped, with the reason.

    ``modules`` / ``exclude`` are regular expressions searched in the tensor name. Raises
    :class:`InspectError` for a tensor present in only one model or shaped differently.
    """
    include_re = re.compile(modules) if modules else None
    exclude_re = re.compile(exclude) if exclude else None

    def wanted(name: str) -> bool:
        if include_re is not None and not include_re.search(name):
            return False
        return not (exclude_re is not None and exclude_re.search(name))

    names = sorted({n for n in list(base.where) + list(finetuned.where) if wanted(n)}, key=_natural_key)
    if not names:
        raise InspectError(
            f"no tensor name matches --modules {modules!r}"
            + (f" / --exclude {exclude!r}" if exclude else "")
            + f"; example names: {', '.join(sorted(base.where, key=_natural_key)[:3])}"
        )
    for have, lack in ((base, finetuned), (finetuned, base)):
        missing = [n for n in names if n in have.where and n not in lack.where]
        if missing:
            raise InspectError(
                f"tensor {missing[0]} is in the {have.role} model ({have.where[missing[0]]}) but "
                f"not in the {lack.role} model ({lack.folder}); {len(missing)} tensor(s) differ. "
                "Both must be the same architecture; skip such tensors with "
                f"--exclude '{re.escape(missing[0])}' (e.g. lm_head with tied embeddings)"
            )
    plan, skipped = [], []
    roles = None
    for name in names:
        if base.shape[name] != finetuned.shape[name]:
            from fapm_merge.recipe import vocabulary_only, weight_roles

            roles = roles or weight_roles(str(base.folder))
            resized = vocabulary_only(base.shape[name], finetuned.shape[name], roles.axis_of(name))
            hint = (
                "the vocabularies differ (resized embeddings); skip it with"
                if resized else "the fine-tune must come from this base; to look at the rest, add"
            )
            raise InspectError(
                f"tensor {name}: shape {list(base.shape[name])} in the base model "
                f"({base.where[name]}) but {list(finetuned.shape[name])} in the fine-tune "
                f"({finetuned.where[name]}); {hint} --exclude '{re.escape(name)}'"
            )
        if base.dtype[name] not in _FLOAT_DTYPES or finetuned.dtype[name] not in _FLOAT_DTYPES:
            skipped.append(
                {"name": name, "reason": f"not floating ({base.dtype[name]}/{finetuned.dtype[name]})"}
            )
            continue
        plan.append(name)
    return plan, skipped


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclass
class MaskTally:
    """What one pruning mask keeps, as additive sums."""

    kept: int = 0  # kept elements
    energy: float = 0.0  # sum of dW^2 over kept elements
    ratio_sum: float = 0.0  # sum of |dW|/|W_pre| over kept elements with W_pre != 0
    ratio_count: int = 0  # kept elements with W_pre != 0
    base_zero: int = 0  # kept elements with W_pre == 0 (excluded from the ratio)

    def add(self, other: "MaskTally") -> None:
        self.kept += other.kept
        self.energy += other.energy
        self.ratio_sum += other.ratio_sum
        self.ratio_count += other.ratio_count
        self.base_zero += other.base_zero


@dataclass
class Tally:
    """Additive sums over a set of elements (one tensor, or many); see :meth:`summary`.

    Adding two tallies and then summarising gives element-weighted statistics of the union
    (never a mean of means); quantiles come from the shared log-spaced ratio histogram.
    """

    tensors: int = 0
    numel: int = 0
    budget: int = 0  # sum of kernel.kept_count(numel, sparsity) per tensor
    dw_abs_sum: float = 0.0
    dw_sq_sum: float = 0.0
    unchanged: int = 0  # dW == 0 (in float32)
    base_zero: int = 0  # W_pre == 0
    base_zero_changed: int = 0  # W_pre == 0 and dW != 0
    negative_score: int = 0  # FAPM score S < 0
    ratio_count: int = 0  # elements with W_pre != 0
    ratio_sum: float = 0.0
    ratio_max: float = 0.0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS + 3, dtype=np.int64))
    masks: Dict[str, MaskTally] = field(default_factory=dict)
    overlap: int = 0  # |fapm & magnitude|
    union: int = 0  # |fapm | magnitude|

    def add(self, other: "Tally") -> None:
        for name in (
            "tensors", "numel", "budget", "dw_abs_sum", "dw_sq_sum", "unchanged", "base_zero",
            "base_zero_changed", "negative_score", "ratio_count", "ratio_sum", "overlap", "union",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.ratio_max = max(self.ratio_max, other.ratio_max)
        self.hist += other.hist
        for name, mask in other.masks.items():
            self.masks.setdefault(name, MaskTally()).add(mask)

    def quantile(self, q: float) -> Optional[float]:
        """Nearest-rank q-quantile of |dW|/|W_pre| (the ``ceil(q * N)``-th smallest ratio), read
        from the histogram: the value returned lies in the same bin as the exact one, so the
        relative error is below ``10**(1/BINS_PER_DECADE) - 1`` (2.3%). Exact for zeros; a
        ratio below ``10**LOG10_MIN`` reads as that bound, one above ``10**LOG10_MAX`` as the
        maximum."""
        total = int(self.hist.sum())
        if total == 0:
            return None
        rank = min(total, max(1, math.ceil(q * total - 1e-9)))
        cumulative = np.cumsum(self.hist)
        j = int(np.searchsorted(cumulative, rank, side="left"))
        if j == 0:
            return 0.0
        if j == 1:
            return 10.0**LOG10_MIN
        if j == len(cumulative) - 1:
            return self.ratio_max
        # geometric position of the rank inside its bin (midpoint convention)
        inside = (rank - cumulative[j - 1] - 0.5) / self.hist[j]
        value = 10.0 ** (LOG10_MIN + (j - 2 + float(inside)) / BINS_PER_DECADE)
        return min(value, self.ratio_max)

    def summary(self) -> Dict[str, object]:
        """Derived statistics (documented in docs/inspect.md); ``None`` where undefined."""

        def share(part: float, whole: float) -> Optional[float]:
            return part / whole if whole else None

        out: Dict[str, object] = {
            "tensors": self.tensors,
            "numel": self.numel,
            "dw_abs_mean": share(self.dw_abs_sum, self.numel),
            "dw_energy": self.dw_sq_sum,
            "unchanged_share": share(self.unchanged, self.numel),
            "negative_score_share": share(self.negative_score, self.numel),
            "base_zero": self.base_zero,
            "base_zero_changed": self.base_zero_changed,
            "ratio_count": self.ratio_count,
            "ratio_mean": share(self.ratio_sum, self.ratio_count),
        }
        for q in QUANTILES:
            out[f"ratio_p{round(q * 100)}"] = self.quantile(q)
        out["ratio_max"] = self.ratio_max if self.ratio_count else None
        out["kept_budget"] = self.budget
        for name in sorted(self.masks):
            mask = self.masks[name]
            out[f"kept_{name}"] = mask.kept
            out[f"energy_kept_{name}"] = share(mask.energy, self.dw_sq_sum)
            out[f"kept_ratio_mean_{name}"] = share(mask.ratio_sum, mask.ratio_count)
            out[f"kept_base_zero_{name}"] = mask.base_zero
        if all(name in self.masks for name in MASKS):
            out["jaccard"] = share(self.overlap, self.union)
        return out


def _histogram(ratio: torch.Tensor, ignored: int = 0) -> np.ndarray:
    """Counts of a 1-D tensor of ratios (>= 0, finite) in the shared layout; ``ignored``
    zeros (placeholders for undefined ratios) are taken off the zero bin."""
    index = torch.log10(ratio).sub_(LOG10_MIN).mul_(BINS_PER_DECADE).floor_()
    index = index.clamp_(-1, N_BINS).to(torch.int64).add_(2)  # log10(0) = -inf lands in bin 1
    counts = torch.bincount(index, minlength=N_BINS + 3).cpu().numpy().astype(np.int64)
    zeros = int((ratio == 0).count_nonzero())
    counts[1] -= zeros
    counts[0] = zeros - ignored
    return counts


def _no_overflow(value: torch.Tensor, exact) -> torch.Tensor:
    """``value`` (float32) unless it overflowed, then ``exact()`` (float64)."""
    return value if bool(torch.isfinite(value).all()) else exact()


def tensor_tally(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    masks: Mapping[str, torch.Tensor],
    sparsity: Optional[float] = None,
) -> Tally:
    """Statistics of one tensor pair.

    Args:
        base, finetuned: ``W_pre`` and ``W_ft``, same shape, any floating dtype.
        masks: name -> boolean mask of ``base``'s shape (kept task-vector elements), e.g.
            ``{"fapm": ..., "magnitude": ...}`` from :func:`kernel.prune_mask`; the overlap
            is measured when both ``"fapm"`` and ``"magnitude"`` are given.
        sparsity: sets ``budget`` to ``kernel.kept_count(numel, sparsity)`` when given.

    dW, |W_pre| and the FAPM score follow the kernel: float32, with the penalty mean
    ``mean(|W_pre|)`` over the whole tensor. ``S < 0`` exactly when ``dW != 0`` and
    ``|W_pre| < mean(|W_pre|)`` (``W_pre == 0`` included: its limit is ``-inf``); an all-zero
    base tensor has no penalty, so no negative score.
    """
    if base.shape != finetuned.shape:
        raise InspectError(f"shape mismatch: {tuple(base.shape)} vs {tuple(finetuned.shape)}")
    n = base.numel()
    tally = Tally(tensors=1, numel=n)
    if sparsity is not None:
        tally.budget = kernel.kept_count(n, sparsity)
    flat_base, flat_ft = base.reshape(-1), finetuned.reshape(-1)
    flat_masks = {name: mask.reshape(-1) for name, mask in masks.items()}
    for name in flat_masks:
        tally.masks[name] = MaskTally()

    mean_abs = kernel.mean_abs(flat_base)

    pair = all(name in flat_masks for name in MASKS)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        w = flat_base[start:stop].to(torch.float32)
        size = (flat_ft[start:stop].to(torch.float32) - w).abs_()  # |dW|, float32 like the kernel
        if not bool(torch.isfinite(size).all()):
            raise kernel.NonFiniteWeightsError("the task vector has NaN or infinite values")
        magnitude = w.abs()
        invalid = magnitude == 0
        changed = size > 0
        # float32 is enough (sums are float64); float64 only where a subnormal |W_pre| overflows
        ratio = _no_overflow(
            torch.div(size, magnitude).masked_fill_(invalid, 0.0),
            lambda: torch.div(size.double(), magnitude.double()).masked_fill_(invalid, 0.0),
        )
        squared = _no_overflow(size.square(), lambda: size.double().square())
        n_invalid = int(invalid.count_nonzero())

        tally.dw_abs_sum += size.sum(dtype=torch.float64).item()
        tally.dw_sq_sum += squared.sum(dtype=torch.float64).item()
        tally.unchanged += (stop - start) - int(changed.count_nonzero())
        tally.base_zero += n_invalid
        tally.base_zero_changed += int((changed & invalid).count_nonzero())
        if mean_abs > 0:
            tally.negative_score += int((changed & (magnitude < mean_abs)).count_nonzero())
        tally.ratio_count += (stop - start) - n_invalid
        tally.ratio_sum += ratio.sum(dtype=torch.float64).item()
        tally.ratio_max = max(tally.ratio_max, float(ratio.max()))
        tally.hist += _histogram(ratio, ignored=n_invalid)
        kept_here = {}
        for name, flat_mask in flat_masks.items():
            keep = flat_mask[start:stop]
            entry = tally.masks[name]
            kept_here[name] = int(keep.count_nonzero())
            kept_zero = int((keep & invalid).count_nonzero())
            entry.kept += kept_here[name]
            entry.energy += (squared * keep).sum(dtype=torch.float64).item()
            entry.ratio_sum += (ratio * keep).sum(dtype=torch.float64).item()
            entry.ratio_count += kept_here[name] - kept_zero
            entry.base_zero += kept_zero
        if pair:
            a, b = flat_masks["fapm"][start:stop], flat_masks["magnitude"][start:stop]
            both = int((a & b).count_nonzero())
            tally.overlap += both
            tally.union += kept_here["fapm"] + kept_here["magnitude"] - both
    return tally


def heatmap_data(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    masks: Mapping[str, torch.Tensor],
    max_side: int = 256,
) -> Dict[str, object]:
    """Figure-3-style panels of one 2-D matrix, block-mean pooled to at most
    ``max_side x max_side``.

    Returns ``{"panels": {title: float64 array [rows_out, cols_out]}, "block": (br, bc),
    "shape": (rows, cols)}``. Each output pixel is the mean over a ``br x bc`` block (the
    last row/column of blocks may be smaller); undefined values (``|dW|/|W_pre|`` and ``S``
    where ``W_pre == 0``) are left out of the mean (NaN-aware), a mask pools to the share of
    the block it keeps. Computed in float32.
    """
    if base.dim() != 2:
        raise InspectError(f"heatmaps need a 2-D matrix, got shape {tuple(base.shape)}")
    rows, cols = base.shape
    br, bc = math.ceil(rows / max_side), math.ceil(cols / max_side)
    n_r, n_c = math.ceil(rows / br), math.ceil(cols / bc)
    mean_abs = kernel.mean_abs(base)
    titles = ["|W_pre|", "|dW|", "|dW| / |W_pre|", "FAPM score S"] + [f"{m} mask" for m in masks]
    panels = {title: np.full((n_r, n_c), np.nan) for title in titles}

    # Bands of whole block rows, about CHUNK elements each, so memory stays a few bands.
    band_blocks = max(1, CHUNK // (br * cols))

    def pool(band: torch.Tensor) -> np.ndarray:  # [h, cols] -> [ceil(h / br), n_c]
        blocks = math.ceil(band.shape[0] / br)
        padded = torch.full((blocks * br, n_c * bc), math.nan, dtype=torch.float32)
        padded[: band.shape[0], :cols] = band
        return torch.nanmean(padded.view(blocks, br, n_c, bc), dim=(1, 3)).double().cpu().numpy()

    for first in range(0, n_r, band_blocks):
        last = min(n_r, first + band_blocks)
        sl = slice(first * br, min(rows, last * br))
        w = base[sl].to(torch.float32)
        size = (finetuned[sl].to(torch.float32) - w).abs_()
        magnitude = w.abs()
        ratio = torch.div(size, magnitude).masked_fill_(magnitude == 0, math.nan)
        # the kernel's score with the whole matrix's mean; undefined where W_pre == 0 (the
        # kernel ranks those last), 0 where nothing changed (the kernel's -inf)
        score = kernel.forgetting_score(base[sl], finetuned[sl], mean=mean_abs)
        score.masked_fill_(size == 0, 0.0).masked_fill_(magnitude == 0, math.nan)
        values = [magnitude, size, ratio, score] + [m[sl].to(torch.float32) for m in masks.values()]
        for title, value in zip(titles, values):
            panels[title][first:last] = pool(value)
    return {"panels": panels, "block": (br, bc), "shape": (rows, cols)}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def default_heatmaps(names: Sequence[str], shapes: Mapping[str, Tuple[int, ...]]) -> List[str]:
    """q_proj and down_proj of the first and last layer; else the first and last matrix."""
    matrices = [n for n in names if len(shapes[n]) == 2]
    layers = sorted({layer_index(n) for n in matrices if layer_index(n) is not None})
    chosen: List[str] = []
    for layer in dict.fromkeys(layers[:1] + layers[-1:]):
        for kind in ("q_proj", "down_proj"):
            chosen += [n for n in matrices if layer_index(n) == layer and module_type(n) == kind]
    if not chosen and matrices:
        chosen = list(dict.fromkeys([matrices[0], matrices[-1]]))
    return chosen


def _aggregate(records: Iterable[Tuple[str, Tally]]) -> Dict[str, Tally]:
    totals: Dict[str, Tally] = {}
    for key, tally in records:
        totals.setdefault(key, Tally()).add(tally)
    return totals


def inspect_models(
    base: os.PathLike,
    finetuned: os.PathLike,
    *,
    sparsity: float = 0.9,
    out: Optional[os.PathLike] = None,
    modules: Optional[str] = None,
    exclude: Optional[str] = None,
    heatmaps: Optional[Sequence[str]] = None,
    heatmap_size: int = 256,
    top: int = 15,
    plots: bool = True,
    progress: bool = True,
) -> Dict[str, object]:
    """Inspect ``finetuned`` against ``base``; write the report files to ``out`` if given.

    Returns the ``stats.json`` document (a dict; schema in docs/inspect.md). ``heatmaps``
    names the 2-D tensors to draw (default :func:`default_heatmaps`; ``[]`` for none).
    """
    from tqdm import tqdm

    if not 0 <= sparsity <= 1:
        raise InspectError(f"--sparsity must be in [0, 1], got {sparsity}")
    base_files = ModelFiles.open(base, "base")
    ft_files = ModelFiles.open(finetuned, "fine-tuned")
    try:
        plan, skipped = plan_tensors(base_files, ft_files, modules, exclude)
    except re.error as error:
        raise InspectError(f"--modules/--exclude is not a valid regular expression: {error}")
    if heatmaps is None:
        heatmaps = default_heatmaps(plan, base_files.shape) if plots else []
    for name in heatmaps:
        if name not in plan:
            raise InspectError(f"--heatmap {name}: no such (inspected, floating) tensor")
        if len(base_files.shape[name]) != 2:
            raise InspectError(f"--heatmap {name}: shape {list(base_files.shape[name])} is not 2-D")

    tensors: List[Dict[str, object]] = []
    tallies: List[Tuple[str, Tally]] = []
    pooled: Dict[str, Dict[str, object]] = {}
    bar = tqdm(plan, desc="inspect", unit="tensor", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name, refresh=False)
        w_pre, w_ft = base_files.load(name), ft_files.load(name)
        try:
            masks = {score: kernel.prune_mask(w_pre, w_ft, sparsity, score=score) for score in MASKS}
            tally = tensor_tally(w_pre, w_ft, masks, sparsity)
        except kernel.NonFiniteWeightsError as error:
            raise InspectError(
                f"tensor {name} ({base_files.where[name].name} / {ft_files.where[name].name}): {error}"
            ) from None
        if name in heatmaps:
            pooled[name] = heatmap_data(w_pre, w_ft, masks, heatmap_size)
        del w_pre, w_ft, masks
        tallies.append((name, tally))
        record: Dict[str, object] = {
            "name": name,
            "module_type": module_type(name),
            "layer": layer_index(name),
            "shape": list(base_files.shape[name]),
            "dtype_base": base_files.dtype[name],
            "dtype_finetuned": ft_files.dtype[name],
        }
        summary = tally.summary()
        del summary["tensors"]
        record.update(summary)
        tensors.append(record)
    bar.close()
    pooled = {name: pooled[name] for name in heatmaps}  # in the order asked for

    total = Tally()
    for _, tally in tallies:
        total.add(tally)
    by_type = _aggregate((module_type(n), t) for n, t in tallies)
    by_layer = _aggregate((str(layer_index(n)), t) for n, t in tallies)
    outside = by_layer.pop("None", None)
    stats: Dict[str, object] = {
        "schema_version": SCHEMA_VERSION,
        "tool": "fapm-merge inspect",
        "fapm_merge_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": str(Path(base).resolve()),
        "finetuned": str(Path(finetuned).resolve()),
        "sparsity": sparsity,
        "filters": {"modules": modules, "exclude": exclude},
        "ratio_histogram": {
            "log10_min": LOG10_MIN,
            "log10_max": LOG10_MAX,
            "bins_per_decade": BINS_PER_DECADE,
        },
        "summary": total.summary(),
        "module_types": {key: by_type[key].summary() for key in sorted(by_type)},
        "layers": [
            dict(layer=int(key), **by_layer[key].summary()) for key in sorted(by_layer, key=int)
        ],
        "outside_layers": outside.summary() if outside else None,
        "tensors": tensors,
        "skipped": skipped,
        "heatmaps": [],
        "plots": [],
    }
    if out is not None:
        write_outputs(stats, Path(out), pooled, top=top, plots=plots)
    return stats


def _file_name(tensor: str) -> str:
    return "heatmap_" + re.sub(r"[^A-Za-z0-9_.-]", "_", tensor).replace(".", "_") + ".png"


def write_outputs(
    stats: Dict[str, object],
    out: Path,
    pooled: Mapping[str, Dict[str, object]],
    top: int = 15,
    plots: bool = True,
) -> None:
    """Write the PNGs, ``stats.json`` and ``report.md`` into ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        from fapm_merge.inspect import plots as drawing

        if stats["layers"]:
            drawing.plot_layers(stats, out / "layers.png")
            stats["plots"].append("layers.png")
        drawing.plot_tradeoff(stats, out / "tradeoff.png")
        stats["plots"].append("tradeoff.png")
        for name, data in pooled.items():
            file = _file_name(name)
            drawing.plot_heatmap(name, data, stats["sparsity"], out / file)
            stats["heatmaps"].append(
                {
                    "tensor": name,
                    "file": file,
                    "shape": list(data["shape"]),
                    "block": list(data["block"]),
                    "pooling": "block mean, NaN-aware",
                }
            )
    with open(out / "stats.json", "w", encoding="utf-8") as handle:
        json.dump(stats, handle, indent=1, allow_nan=False)
        handle.write("\n")
    from fapm_merge.inspect.report import render_report

    (out / "report.md").write_text(render_report(stats, top=top), encoding="utf-8")
