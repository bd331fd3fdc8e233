"""FAPM kernels: pure tensor functions, no I/O and no mergekit.

Vocabulary (as in the paper and mergekit):

- ``base`` is ``W_pre``, ``finetuned`` is ``W_ft``, the task vector is ``dW = W_ft - W_pre``.
- ``sparsity`` is the fraction of the task vector that is pruned (mergekit's ``density`` is
  ``1 - sparsity``); ``kept_count`` elements survive.
- A *score* ranks the elements of one tensor; the highest ``kept_count`` are kept.

Every function works on any device and creates its tensors on the input's device. Scores are
float32 whatever the input dtype; means are accumulated in float64.
"""

from __future__ import annotations

import math
import zlib
from fractions import Fraction
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

SCORES = ("fapm", "magnitude", "relative", "random")
RESCALES = ("none", "density", "l1", "l2")
CONSENSUS = ("sum", "count")

# A score no real change can fall below: elements that cannot change anything (dW == 0) sit
# under it at -inf, so they never take the budget of a real change.
_LOWEST_REAL = torch.finfo(torch.float32).min

# Below this size an exact kthvalue over the whole tensor is cheap; above it we bracket the
# threshold with a sample first (kthvalue copies and partially sorts its input).
_DIRECT_SELECTION = 1 << 22
_SAMPLE = 1 << 20
_TIE_CHUNK = 1 << 22


class NonFiniteWeightsError(ValueError):
    """A weight is NaN or infinite, so no ranking of the task vector is meaningful."""


def kept_count(numel: int, sparsity: float) -> int:
    """``floor((1 - sparsity) * numel)``, the number of task-vector elements FAPM keeps.

    ``sparsity`` is read as the decimal it was written as: mergekit hands parameters over as
    float32 (0.9 arrives as 0.8999999761...), and ``(1 - 0.9) * n`` in binary floating point
    can land just below an integer. Snapping to 7 significant digits (float32's precision) and
    using exact rational arithmetic gives ``int(0.1 * n)`` for 0.9, as the authors' code.
    """
    value = Fraction(f"{float(sparsity):.7g}")
    if not 0 <= value <= 1:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return math.floor((1 - value) * numel)


def _task_vector_magnitude(
    base: torch.Tensor, finetuned: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """|dW| in float32 and the mask of elements that did not change (dW == 0)."""
    change = finetuned.to(torch.float32, copy=True)
    change.sub_(base)
    if not torch.isfinite(change.sum(dtype=torch.float64)):
        raise NonFiniteWeightsError(
            "the task vector has NaN or infinite values (check both checkpoints)"
        )
    change.abs_()
    return change, change == 0


def _mean_abs(base: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """|W_pre| in float32 and its mean accumulated in float64."""
    magnitude = base.to(torch.float32, copy=True).abs_()
    mean = magnitude.sum(dtype=torch.float64).item() / max(1, magnitude.numel())
    if not math.isfinite(mean):
        raise NonFiniteWeightsError("the base weight has NaN or infinite values")
    return magnitude, mean


def _finish(score: torch.Tensor, unchanged: torch.Tensor) -> torch.Tensor:
    # Overflow and W_pre == 0 go to the lowest real score (their limit is -inf); NaN can only
    # come from 0 * inf at unchanged elements, which are then set to -inf below everything.
    score.clamp_(min=_LOWEST_REAL)
    score.masked_fill_(unchanged, -math.inf)
    return score


def forgetting_score(base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """FAPM score ``S = |dW| - mean(|W_pre|) * |dW| / |W_pre|`` (paper, Algorithm 1).

    Args:
        base, finetuned: same shape, any floating dtype and device.

    Returns:
        float32 tensor of ``base``'s shape. Edge cases, all deterministic and NaN-free:

        - ``dW == 0``: ``-inf``, below every real change (keeping it would be a no-op);
        - ``W_pre == 0`` with ``dW != 0``: the formula's limit is ``-inf``; it is clamped to the
          lowest finite float32, so such changes rank after every other real change;
        - ``mean(|W_pre|) == 0`` (an all-zero base tensor): no relative change is defined, the
          penalty is dropped and ``S = |dW|``.
    """
    magnitude, unchanged = _task_vector_magnitude(base, finetuned)
    penalty, mean = _mean_abs(base)
    if mean == 0:
        del penalty
        return _finish(magnitude, unchanged)
    # S = |dW| * (1 - m / |W_pre|), computed in place in the |W_pre| buffer.
    torch.reciprocal(penalty, out=penalty)
    penalty.mul_(-mean).add_(1.0).mul_(magnitude)
    del magnitude
    return _finish(penalty, unchanged)


def magnitude_score(base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """``|dW|``: plain magnitude pruning of the task vector (the paper's first baseline)."""
    magnitude, unchanged = _task_vector_magnitude(base, finetuned)
    return _finish(magnitude, unchanged)


def relative_score(base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """``-|dW| / |W_pre|``: the relative criterion alone, smallest relative change kept."""
    magnitude, unchanged = _task_vector_magnitude(base, finetuned)
    penalty, _ = _mean_abs(base)
    torch.div(magnitude, penalty, out=penalty).neg_()
    del magnitude
    return _finish(penalty, unchanged)


def random_score(
    base: torch.Tensor, finetuned: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Uniform random scores: keeping the top k is a random drop with an exact count (DARE)."""
    _, unchanged = _task_vector_magnitude(base, finetuned)
    score = torch.rand(
        base.shape, generator=generator, dtype=torch.float32, device=base.device
    )
    return _finish(score, unchanged)


def score_task_vector(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    score: str = "fapm",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Dispatch to one of :data:`SCORES`; unchanged elements always score ``-inf``."""
    if score == "random":
        return random_score(base, finetuned, generator)
    functions: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "fapm": forgetting_score,
        "magnitude": magnitude_score,
        "relative": relative_score,
    }
    if score not in functions:
        raise ValueError(f"unknown score {score!r}; valid: {', '.join(SCORES)}")
    return functions[score](base, finetuned)


def _kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a 1-D float tensor (1 <= k <= n), exactly, as a 0-d tensor.

    Large inputs: a fixed-seed sample brackets the threshold, then an exact kthvalue runs on
    the few elements inside the bracket. A bracket that misses (it cannot for a sample this
    size except by extreme bad luck) falls back to the open side.
    """
    n = flat.numel()
    if n <= _DIRECT_SELECTION:
        return torch.kthvalue(flat, n - k + 1).values
    generator = torch.Generator(device=flat.device).manual_seed(n)
    picks = torch.randint(n, (_SAMPLE,), generator=generator, device=flat.device)
    sample = torch.sort(flat[picks]).values
    position = (n - k) / n * (_SAMPLE - 1)  # where the threshold sits in the sorted sample
    q = k / n
    margin = 6.0 * math.sqrt(_SAMPLE * q * (1 - q)) + 32.0
    lo_pos, hi_pos = int(position - margin), int(math.ceil(position + margin))
    lo = sample[lo_pos].item() if lo_pos > 0 else -math.inf
    hi = sample[hi_pos].item() if hi_pos < _SAMPLE - 1 else math.inf
    del sample, picks
    above = int(torch.count_nonzero(flat > hi)) if hi < math.inf else 0
    if above >= k:  # missed low: the threshold is above the bracket
        inside, above = flat > hi, 0
    else:
        inside = flat >= lo
        at_least_lo = int(torch.count_nonzero(inside))
        if at_least_lo < k:  # missed high: the threshold is below the bracket
            inside.logical_not_()
            above = at_least_lo
        elif hi < math.inf:
            inside.logical_and_(flat <= hi)
    candidates = flat[inside]
    del inside
    need = k - above
    return torch.kthvalue(candidates, candidates.numel() - need + 1).values


def _admit_ties(flat: torch.Tensor, threshold: torch.Tensor, keep: torch.Tensor, count: int):
    """Mark the first ``count`` elements equal to ``threshold`` (lowest flat index first)."""
    for start in range(0, flat.numel(), _TIE_CHUNK):
        tied = flat[start : start + _TIE_CHUNK] == threshold
        found = int(torch.count_nonzero(tied))
        if found == 0:
            continue
        window = keep[start : start + _TIE_CHUNK]
        if found <= count:
            window.logical_or_(tied)
            count -= found
        else:
            window[tied.nonzero().squeeze(1)[:count]] = True
            count = 0
        if count == 0:
            return


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``scores``, exactly ``k`` of them.

    Args:
        scores: any shape, float, no NaN (``-inf`` allowed).
        k: clipped to ``[0, scores.numel()]``.

    Ties at the threshold go to the lowest flat (row-major) indices: the same set as a stable
    descending sort. No full sort and no ``torch.quantile``: extra memory is a few boolean
    masks plus a small candidate set, so tensors of any size go through.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = _kth_largest(flat, k)
    keep = flat > threshold
    missing = k - int(torch.count_nonzero(keep))
    if missing > 0:
        _admit_ties(flat, threshold, keep, missing)
    return keep.view(scores.shape)


def keep_top_fraction(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """:func:`keep_top_k` with ``k = kept_count(scores.numel(), sparsity)``."""
    return keep_top_k(scores, kept_count(scores.numel(), sparsity))


def prune_mask(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    sparsity: float,
    score: str = "fapm",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Boolean mask (``base``'s shape) of the task-vector elements that are kept.

    Exactly ``min(kept_count(n, sparsity), number of elements with dW != 0)`` are ``True``:
    elements that did not change never use up the budget.
    """
    n = base.numel()
    k = kept_count(n, sparsity)
    if k == 0:
        return torch.zeros_like(base, dtype=torch.bool)
    if k == n:  # sparsity 0 keeps every change; no scoring needed
        return torch.ones_like(base, dtype=torch.bool)
    scores = score_task_vector(base, finetuned, score, generator)
    changed = n - int(torch.count_nonzero(scores == -math.inf))
    return keep_top_k(scores, min(k, changed))


def fapm_prune(
    base: torch.Tensor, finetuned: torch.Tensor, sparsity: float = 0.9, score: str = "fapm"
) -> torch.Tensor:
    """``W_pre + dW_kept`` for one fine-tune: kept elements are bit-equal to ``finetuned``,
    pruned ones bit-equal to ``base``; dtype and device of ``base``."""
    mask = prune_mask(base, finetuned, sparsity, score)
    return torch.where(mask, finetuned.to(base.dtype), base)


def rescale_factor(
    change: torch.Tensor, mask: torch.Tensor, rescale: str, sparsity: float
) -> float:
    """Factor applied to the kept part of one task vector (1.0 when nothing is kept).

    ``density``: ``1 / (1 - sparsity)``, DARE's unbiased rescaling for a *random* drop.
    ``l1`` / ``l2``: match the norm of the full task vector; the choice for score-based pruning,
    whose kept set is biased towards large changes (1/density would overshoot there).
    """
    if rescale == "none":
        return 1.0
    if rescale == "density":
        keep = 1.0 - float(Fraction(f"{float(sparsity):.7g}"))
        return 1.0 / keep if keep > 0 else 1.0
    order = 1 if rescale == "l1" else 2
    if rescale not in ("l1", "l2"):
        raise ValueError(f"unknown rescale {rescale!r}; valid: {', '.join(RESCALES)}")
    full = torch.linalg.vector_norm(change, ord=order, dtype=torch.float64).item()
    kept = torch.linalg.vector_norm(change * mask, ord=order, dtype=torch.float64).item()
    return full / kept if kept > 0 else 1.0


def elect_signs(deltas: torch.Tensor, consensus: str = "sum") -> torch.Tensor:
    """TIES sign election over stacked weighted task vectors ``[models, *shape]``.

    Returns a boolean mask, same shape, of the entries whose sign agrees with the elected one:
    the sign of the summed deltas (``sum``) or of the summed signs (``count``); a tie elects
    ``+``. Zero entries never agree (they carry nothing to merge).
    """
    signs = deltas.sign()
    if consensus == "sum":
        total = deltas.sum(dim=0)
    elif consensus == "count":
        total = signs.sum(dim=0)
    else:
        raise ValueError(f"unknown consensus {consensus!r}; valid: {', '.join(CONSENSUS)}")
    elected = torch.where(total >= 0, 1.0, -1.0).to(signs.dtype)
    return signs == elected


def tensor_generator(seed: int, name: str, index: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, tensor name, model index): reruns agree."""
    key = zlib.crc32(f"{seed}:{name}:{index}".encode())
    return torch.Generator(device=device).manual_seed(key)


def merge_task_vectors(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    *,
    sparsity: Sequence[float],
    weight: Sequence[float],
    score: str = "fapm",
    rescale: str = "none",
    normalize: bool = False,
    scale: float = 1.0,
    consensus: Optional[str] = None,
    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
) -> torch.Tensor:
    """Prune each task vector with its own mask, weight, (optionally) elect signs, sum.

    ``W_pre + scale * sum_i w_i r_i (m_i * dW_i) / divisor`` where ``m_i`` is the mask from
    :func:`prune_mask`, ``r_i`` the :func:`rescale_factor`, and ``divisor`` the summed weights
    (of agreeing models, per element, under TIES) when ``normalize`` else 1. This is mergekit's
    generalized task arithmetic with the sparsifier replaced by a base-aware mask.

    One fine-tune with an identity scaling takes an exact path (``torch.where``) so kept
    elements are bit-equal to ``W_ft``. Returns ``base``'s dtype and device.
    """
    if not finetuned:
        return base
    generators = generators or [None] * len(finetuned)
    single_identity = (
        len(finetuned) == 1
        and rescale == "none"
        and scale == 1.0
        and (normalize or weight[0] == 1.0)
    )
    if single_identity:
        mask = prune_mask(base, finetuned[0], sparsity[0], score, generators[0])
        return torch.where(mask, finetuned[0].to(base.dtype), base)

    deltas = []
    for model, s, w, g in zip(finetuned, sparsity, weight, generators):
        mask = prune_mask(base, model, s, score, g)
        change = model.to(torch.float32) - base.to(torch.float32)
        factor = rescale_factor(change, mask, rescale, s) * w
        change.mul_(mask).mul_(factor)
        deltas.append(change)
        del mask
    weights = torch.tensor(weight, dtype=torch.float32, device=base.device)
    if consensus is None:
        merged = deltas[0]
        for extra in deltas[1:]:
            merged.add_(extra)
        divisor = weights.sum()
        if normalize and divisor.abs() > 1e-8:
            merged.div_(divisor)
    else:
        stacked = torch.stack(deltas)
        del deltas
        agree = elect_signs(stacked, consensus)
        merged = (stacked * agree).sum(dim=0)
        if normalize:
            shape = (-1,) + (1,) * base.dim()
            divisor = (weights.view(shape) * agree).sum(dim=0)
            divisor[divisor == 0] = 1
            merged.div_(divisor)
        del stacked, agree
    if scale != 1.0:
        merged.mul_(scale)
    return merged.add_(base).to(base.dtype)
