"""FAPM kernels: pure tensor functions, no I/O and no mergekit.

Vocabulary (as in the paper and mergekit):

- ``base`` is ``W_pre``, ``finetuned`` is ``W_ft``, the task vector is ``dW = W_ft - W_pre``.
- ``sparsity`` is the fraction of the task vector that is pruned (mergekit's ``density`` is
  ``1 - sparsity``); ``kept_count`` elements survive.
- A *score* ranks the elements of one tensor; the highest ``kept_count`` are kept.

Every function works on any device and creates its tensors on the input's device. Scores are
float32 whatever the input dtype (the task vector of float64 inputs is taken in float64 first,
so unchanged elements stay unchanged); means are accumulated in float64.
"""

from __future__ import annotations

import math
import zlib
from fractions import Fraction
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from fapm_merge import native
from fapm_merge.choices import CONSENSUS, RESCALES, SCORES  # re-exported: kernel.SCORES etc.

# A score no real change can fall below: elements that cannot change anything (dW == 0) sit
# under it at -inf, so they never take the budget of a real change.
_LOWEST_REAL = torch.finfo(torch.float32).min

# Below this size the selection's bracket is open (an exact kthvalue over the whole tensor is
# cheap); above it the threshold is bracketed with a sample first (kthvalue copies and
# partially sorts its input), and the fused FAPM pass applies.
_DIRECT_SELECTION = 1 << 16
_SAMPLE = 1 << 20  # at most; n // 256 elements, at least _MIN_SAMPLE
_MIN_SAMPLE = 1 << 14
_PIECE = 1 << 22  # elements per piece of the whole-tensor float64 / mixed-dtype passes
# Slice length of the chunked passes: a few float32 buffers of this size stay in cache on a
# CPU; accelerators want fewer, larger launches.
_CHUNK = 1 << 18
# Elements per slice of the several-fine-tunes merge (its float32 buffer holds one slice per
# model: 4 MB each).
_MERGE_SLICE = 1 << 20
_ACCELERATOR_CHUNK = 1 << 24
_EXACT_IN_FLOAT32 = (torch.bfloat16, torch.float16, torch.float32)
# Integer views used to blend kept and pruned elements bit-exactly.
_INT_VIEW = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


# mergekit's generalized task arithmetic leaves summed weights below this undivided.
_TINY_DIVISOR = 1e-8


class NonFiniteWeightsError(ValueError):
    """A weight is NaN or infinite, so no ranking of the task vector is meaningful."""


def kept_count(numel: int, sparsity: float) -> int:
    """``floor((1 - sparsity) * numel)``, the number of task-vector elements FAPM keeps.

    ``sparsity`` is read as the decimal it was written as: ``(1 - 0.9) * n`` in binary floating
    point can land just below an integer. mergekit 0.1.5 passes a plain recipe value as a
    Python float, but a layer gradient's interpolated values and any float32 round trip
    (0.9 as 0.8999999761...) arrive off by an ulp; snapping to 7 significant digits (float32's
    precision) and exact rational arithmetic give ``int(0.1 * n)`` for 0.9 in every case, as the
    authors' code does.
    """
    value = Fraction(f"{float(sparsity):.7g}")
    if not 0 <= value <= 1:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return math.floor((1 - value) * numel)


_NON_FINITE_CHANGE = "the task vector has NaN or infinite values (check both checkpoints)"


def _exact_in_float32(*tensors: torch.Tensor) -> bool:
    """Whether float32 holds every value of these tensors (not for float64)."""
    return all(t.dtype in _EXACT_IN_FLOAT32 for t in tensors)


def _chunks(tensor: torch.Tensor):
    """Flat pieces of a tensor: mixed-dtype and float64 ops on whole tensors allocate a
    converted copy of their input (1-2x the tensor); per piece that copy stays small."""
    return tensor.reshape(-1).split(_PIECE)


def _sum64(tensor: torch.Tensor) -> float:
    """Sum of a float32 tensor, accumulated in float64 over float32 partial sums of 1024.

    A float64 sum of the whole tensor converts every element (slow on CPU, and a float64 copy
    when done in one call); 1024-element float32 partials lose nothing that matters for a
    mean, and NaN / inf propagate, so this doubles as the finiteness check.
    """
    flat = tensor.reshape(-1)
    whole = flat.numel() // 1024 * 1024
    partials = flat[:whole].view(-1, 1024).sum(dim=1)
    return partials.sum(dtype=torch.float64).item() + flat[whole:].sum(dtype=torch.float64).item()


def _task_vector_magnitude(
    base: torch.Tensor, finetuned: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """|dW| in float32 and the mask of elements that did not change (dW == 0)."""
    exact = _exact_in_float32(base, finetuned)
    change = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    for piece, base_piece, ft_piece in zip(_chunks(change), _chunks(base), _chunks(finetuned)):
        if exact:
            piece.copy_(ft_piece)
            piece.sub_(base_piece)
        else:  # as in _FapmScorer.of: dW in float64, then rounded
            piece.copy_(torch.sub(ft_piece, base_piece))
    if not math.isfinite(_sum64(change)):
        raise NonFiniteWeightsError(_NON_FINITE_CHANGE)
    change.abs_()
    return change, change == 0


def _finish(score: torch.Tensor, unchanged: torch.Tensor) -> torch.Tensor:
    # Overflow and W_pre == 0 go to the lowest real score (their limit is -inf); NaN can only
    # come from 0 * inf at unchanged elements, which are then set to -inf below everything.
    score.clamp_(min=_LOWEST_REAL)
    score.masked_fill_(unchanged, -math.inf)
    return score


# --------------------------------------------------------------------------- chunked passes
#
# Whole-tensor float32 temporaries are what made a straightforward kernel slow on CPU: every
# pass went to memory and about half the CPU time was page faults from allocating and freeing
# them. So the FAPM score and the selection run slice by slice in small reused buffers that
# stay in cache (on one torch thread: see _for_slices).
# Each slice goes through exactly the float32 operations of the whole-tensor formula
# ``|dW| * (1 - m / |W_pre|)``, in the same order, so scores are bit-identical to it.


def _chunk_size(device: torch.device) -> int:
    return _CHUNK if device.type == "cpu" else _ACCELERATOR_CHUNK


def _buffer(scratch: dict, key: str, size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A reusable buffer of ``size`` elements, kept in ``scratch`` under ``key``."""
    buffer = scratch.get(key)
    if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
        buffer = scratch[key] = torch.empty(size, dtype=dtype, device=device)
    return buffer[:size]


def _for_slices(n: int, step: int, device: torch.device, work: Callable[[int, int, dict], Any]):
    """``[work(start, stop, scratch) for every slice of range(n)]``, one ``scratch`` for all.

    Runs at torch's current thread count, which is the user's (mergekit's ``--num-threads``)
    or torch's default: the kernel never changes it (process-global state, and mergekit may
    run tasks from several threads). The passes are many small ops, each a barrier between
    intra-op threads, so on a busy machine ``--num-threads 1`` is much faster
    (docs/benchmarks.md, "Threads").
    """
    scratch: dict = {}
    return [work(start, min(n, start + step), scratch) for start in range(0, n, step)]


def mean_abs(base: torch.Tensor) -> float:
    """``mean(|W_pre|)`` over one whole tensor: the penalty's scale in the FAPM score.

    Args:
        base: any shape, floating dtype and device; the mean is of its float32 values
            (exact for float32, bfloat16 and float16), accumulated in float64 slice by slice
            (no tensor-sized temporary). An empty tensor has mean 0.

    Raises :class:`NonFiniteWeightsError` for NaN or infinite values (a non-finite base makes
    the task vector non-finite as well, hence the same message).
    """
    flat = base.reshape(-1)

    def work(start: int, stop: int, _) -> float:
        piece = flat[start:stop]
        if piece.dtype not in _EXACT_IN_FLOAT32:  # |W_pre| is taken of the float32 value
            piece = piece.to(torch.float32)
        return piece.abs().sum(dtype=torch.float64).item()

    total = sum(_for_slices(flat.numel(), _chunk_size(flat.device) * 4, flat.device, work), 0.0)
    if not math.isfinite(total):
        raise NonFiniteWeightsError(_NON_FINITE_CHANGE)
    return total / max(1, flat.numel())


class _FapmScorer:
    """FAPM scores of slices of a flattened (base, fine-tune) pair."""

    def __init__(self, base: torch.Tensor, finetuned: torch.Tensor, mean: Optional[float] = None):
        self.base, self.finetuned = base.reshape(-1), finetuned.reshape(-1)
        self.device = base.device
        self.step = _chunk_size(self.device)
        self.mean = mean_abs(self.base) if mean is None else float(mean)

    def of(
        self, base: torch.Tensor, finetuned: torch.Tensor, scratch: dict, exact: bool,
        out: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(scores, max |dW|) of 1-D ``base`` / ``finetuned``, in ``scratch`` (or ``out``).

        ``exact``: the final score, bit-equal to the whole-tensor formula. Otherwise a cheaper
        *raw* score that equals the final one wherever that is > 0 and is <= 0 (never NaN,
        for finite inputs) elsewhere: the edge-case fix-up of :func:`_finish` is skipped.
        """
        m = base.numel()
        penalty = _buffer(scratch, "penalty", m, torch.float32, self.device) if out is None else out
        change = _buffer(scratch, "change", m, torch.float32, self.device)
        penalty.copy_(base)
        if _exact_in_float32(base, finetuned):  # dW: one float32 op on exact float32 values
            change.copy_(finetuned)
            change.sub_(penalty)
        else:  # float64: dW in float64, then rounded (a zero stays zero: no-ops stay no-ops)
            change.copy_(torch.sub(finetuned, base))
        change.abs_()
        largest = change.amax() if m else change.new_zeros(())
        if self.mean == 0:  # all-zero base: no relative change is defined, S = |dW|
            penalty.copy_(change)
        else:  # 1 - m / |W_pre|, then times |dW|: the whole-tensor operations, in order
            penalty.abs_()
            torch.reciprocal(penalty, out=penalty)
            penalty.mul_(-self.mean).add_(1.0)
            if not exact:  # -inf (W_pre == 0) would give NaN at dW == 0; scores <= 0 anyway
                penalty.clamp_(min=_LOWEST_REAL)
            penalty.mul_(change)
        if exact:
            _finish(penalty, change == 0)
        return penalty, largest

    def raw(self, start: int, stop: int, scratch: dict) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.of(self.base[start:stop], self.finetuned[start:stop], scratch, False)

    def sample(self, picks: torch.Tensor) -> torch.Tensor:
        """Final scores at the flat positions ``picks``."""
        return self.of(self.base[picks], self.finetuned[picks], {}, True)[0]


def _check_finite(largest_changes: Sequence[torch.Tensor]) -> None:
    if largest_changes and not bool(torch.stack(list(largest_changes)).isfinite().all()):
        raise NonFiniteWeightsError(_NON_FINITE_CHANGE)


def forgetting_score(
    base: torch.Tensor, finetuned: torch.Tensor, mean: Optional[float] = None
) -> torch.Tensor:
    """FAPM score ``S = |dW| - mean(|W_pre|) * |dW| / |W_pre|`` (paper, Algorithm 1).

    Args:
        base, finetuned: same shape, any floating dtype and device.
        mean: ``mean(|W_pre|)`` of the whole matrix when ``base`` is a piece of it (e.g. a
            band of rows, as the inspect heatmaps score); default :func:`mean_abs` of ``base``.

    Returns:
        float32 tensor of ``base``'s shape. Edge cases, all deterministic and NaN-free:

        - ``dW == 0``: ``-inf``, below every real change (keeping it would be a no-op);
        - ``W_pre == 0`` with ``dW != 0``: the formula's limit is ``-inf``; it is clamped to the
          lowest finite float32, so such changes rank after every other real change;
        - ``mean(|W_pre|) == 0`` (an all-zero base tensor): no relative change is defined, the
          penalty is dropped and ``S = |dW|``.

    Computed as ``|dW| * (1 - m / |W_pre|)`` in float32 (``m`` accumulated in float64), slice
    by slice: the only tensor-sized allocation is the result.
    """
    scorer = _FapmScorer(base, finetuned, mean)
    n = scorer.base.numel()
    scores = torch.empty(n, dtype=torch.float32, device=base.device)

    def work(start: int, stop: int, scratch: dict) -> torch.Tensor:
        base_slice, ft_slice = scorer.base[start:stop], scorer.finetuned[start:stop]
        return scorer.of(base_slice, ft_slice, scratch, True, scores[start:stop])[1]

    _check_finite(_for_slices(n, scorer.step, scorer.device, work))
    return scores.view(base.shape)


def magnitude_score(base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """``|dW|``: plain magnitude pruning of the task vector (the paper's first baseline)."""
    magnitude, unchanged = _task_vector_magnitude(base, finetuned)
    return _finish(magnitude, unchanged)


def relative_score(base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """``-|dW| / |W_pre|``: the relative criterion alone, smallest relative change kept."""
    magnitude, unchanged = _task_vector_magnitude(base, finetuned)
    penalty = base.to(torch.float32, copy=True).abs_()  # finite: dW was checked
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
    """Scores of one tensor pair: float32, ``base``'s shape; higher is kept first.

    Dispatches to :func:`forgetting_score`, :func:`magnitude_score`, :func:`relative_score`
    or :func:`random_score` (``generator`` only for ``random``); unchanged elements always
    score ``-inf``. An unknown name raises ``ValueError`` listing :data:`SCORES`."""
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


# --------------------------------------------------------------------------- exact selection
#
# Top k without a sort: a fixed-seed random sample of the scores brackets the threshold,
# [lo, hi]; one pass over the scores, slice by slice, marks everything above ``hi`` as kept
# and collects the few elements inside the bracket with their flat indices; an exact
# kthvalue on those gives the threshold, and ties at it are admitted lowest index first
# (the collected indices are ascending). Small tensors skip the sample: their bracket is open
# (every element a candidate). A bracket that misses (only by extreme bad luck with a sample
# this size) is detected by the counts, and the same scan runs again with the bracket opened
# on the side where the threshold lies. One engine, one tie rule, for every score.


def _sample_size(n: int) -> int:
    """n / 256 picks, within [_MIN_SAMPLE, _SAMPLE]: gathering random elements is costly."""
    return max(1, min(_SAMPLE, max(_MIN_SAMPLE, n // 256)))


def _sample_picks(n: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(n)
    return torch.randint(n, (_sample_size(n),), generator=generator, device=device)


def _bracket(sample: torch.Tensor, n: int, k: int) -> Tuple[float, float]:
    """[lo, hi] around the k-th largest of n values, from a sample of them (infinite if open)."""
    size = sample.numel()
    position = (n - k) / n * (size - 1)  # where the threshold sits in the sorted sample
    q = k / n
    margin = 6.0 * math.sqrt(size * q * (1 - q)) + 32.0
    lo_pos, hi_pos = int(position - margin), int(math.ceil(position + margin))
    # Two order statistics of the sample (kthvalue is 1-based); no sort needed.
    lo = torch.kthvalue(sample, lo_pos + 1).values.item() if lo_pos > 0 else -math.inf
    hi = torch.kthvalue(sample, hi_pos + 1).values.item() if hi_pos < size - 1 else math.inf
    return lo, hi


def _next_up(value: float) -> float:
    """The smallest float32 above ``value`` (a float32 number)."""
    x = torch.tensor(value, dtype=torch.float32)
    return torch.nextafter(x, torch.tensor(math.inf)).item()


def _classify(
    scores: torch.Tensor, lo: float, hi: float, hi_up: float, scratch: dict
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(``below``, ``inside``) for one slice of scores (no NaN); ``hi_up`` is
    ``_next_up(hi)``, computed once per pass by the caller.

    ``below``: int32, -1 where ``score <= hi`` and 0 where ``score > hi`` (kept for sure);
    ``inside``: ascending local positions of ``lo <= score <= hi``.

    For float32 and a finite bracket this avoids float comparisons (slow to produce bool on
    CPU): the sign bit of the float32 difference ``score - bound`` is exactly the order, as
    rounding never flips a sign and ``x - y == +0`` only when ``x == y``; ``score > hi`` is
    ``score >= next float32 above hi``. An arithmetic right shift by 31 of the difference's
    bits turns the sign into -1 / 0.
    """
    m = scores.numel()
    device = scores.device
    if scores.dtype == torch.float32 and math.isfinite(lo) and math.isfinite(hi):
        below = _buffer(scratch, "below", m, torch.float32, device)
        torch.sub(scores, hi_up, out=below)
        below = below.view(torch.int32).bitwise_right_shift_(31)
        under = _buffer(scratch, "under", m, torch.float32, device)
        torch.sub(scores, lo, out=under)
        inside = under.view(torch.int32).bitwise_right_shift_(31).bitwise_xor_(below)
        return below, inside.nonzero().squeeze(1)
    above = scores > hi
    below = _buffer(scratch, "below_int", m, torch.int32, device)
    below.copy_(above).sub_(1)
    inside = (scores >= lo).logical_xor_(above)
    return below, inside.nonzero().squeeze(1)


def _scan(
    n: int,
    step: int,
    device: torch.device,
    lo: float,
    hi: float,
    scores_of: Callable[[int, int, dict], torch.Tensor],
    emit: Callable[[int, int, torch.Tensor, dict], None],
) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """One pass over the scores, slice by slice (see :func:`_for_slices`).

    For each slice, ``scores_of(start, stop, scratch)`` gives its scores and
    ``emit(start, stop, below, scratch)`` gets the int32 ``below`` of :func:`_classify` (-1:
    not above ``hi``, 0: above) to record what is kept for sure; elements with
    ``lo <= score <= hi`` are collected. Returns (count above ``hi``, candidate values, their
    flat indices in ascending order).
    """

    hi_up = _next_up(hi) if math.isfinite(hi) else math.inf

    def work(start: int, stop: int, scratch: dict):
        scores = scores_of(start, stop, scratch)
        below, inside = _classify(scores, lo, hi, hi_up, scratch)
        count = (stop - start) + int(below.sum(dtype=torch.int32))
        emit(start, stop, below, scratch)
        return count, scores[inside], inside.add_(start)

    parts = _for_slices(n, step, device, work)
    above = sum(part[0] for part in parts)
    values = torch.cat([part[1] for part in parts])
    indices = torch.cat([part[2] for part in parts])
    return above, values, indices


def _mark_kept(keep: torch.Tensor):
    """An ``emit`` for :func:`_scan` that writes ``score > hi`` into the bool mask ``keep``."""

    def emit(start: int, stop: int, below: torch.Tensor, scratch: dict) -> None:
        keep[start:stop].copy_(below.add_(1))  # -1 -> 0 (False), 0 -> 1 (True)

    return emit


def _resolve(
    k: int, above: int, values: torch.Tensor, indices: torch.Tensor
) -> Optional[torch.Tensor]:
    """Flat indices to keep besides those above the bracket; None if the bracket missed."""
    need = k - above
    if need <= 0 or need > values.numel():
        return None
    threshold = torch.kthvalue(values, values.numel() - need + 1).values
    over = values > threshold
    ties = need - int(torch.count_nonzero(over))
    tied = indices[values == threshold][:ties]
    return torch.cat([indices[over], tied])


def keep_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``scores``, exactly ``k`` of them.

    Args:
        scores: any shape, float, no NaN (``-inf`` allowed).
        k: clipped to ``[0, scores.numel()]``.

    Ties at the threshold go to the lowest flat (row-major) indices: the same set as a stable
    descending sort. No full sort and no ``torch.quantile``: one pass over the scores after a
    small sample; extra memory is the mask, a slice-sized buffer and the bracket's candidates.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    keep = torch.empty(n, dtype=torch.bool, device=flat.device)

    def select(lo: float, hi: float) -> Tuple[int, Optional[torch.Tensor]]:
        above, values, indices = _scan(n, _chunk_size(flat.device), flat.device, lo, hi,
                                       lambda a, b, _: flat[a:b], _mark_kept(keep))
        return above, _resolve(k, above, values, indices)

    if n <= _DIRECT_SELECTION:
        lo, hi = -math.inf, math.inf
    else:
        lo, hi = _bracket(flat[_sample_picks(n, flat.device)], n, k)
    above, admitted = select(lo, hi)
    if admitted is None:  # the sample's bracket missed: open it towards the threshold
        above, admitted = select(*((hi, math.inf) if above >= k else (-math.inf, hi)))
    keep[admitted] = True
    return keep.view(scores.shape)


def _fapm_top_k(
    base: torch.Tensor, finetuned: torch.Tensor, k: int, out: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """FAPM's kept set in one fused pass over the pair, or None where it does not apply.

    The scores are never stored: each slice is scored, compared with the bracket and dropped.
    With ``out`` (same dtype as both inputs) the pruned result ``where(kept, W_ft, W_pre)`` is
    written there directly and ``out`` is returned; otherwise the boolean mask is returned.

    It applies when the bracket's lower end is > 0, the common case (sparsity above about
    0.5): then every element that can be kept has a positive score, which the raw slice score
    gives exactly, and the edge-case fix-up (-inf, clamping) can be skipped since it only
    touches scores <= 0. Elsewhere (and for a bracket that misses) None is returned, and the
    caller takes the general path. On CPU, for bfloat16 and float32 pairs, the pass is one C
    loop (:mod:`fapm_merge.native`), bit for bit the torch pass :func:`_fapm_scan`.
    """
    n = base.numel()
    if n <= _DIRECT_SELECTION or not 0 < k < n:
        return None
    scorer = _FapmScorer(base, finetuned)
    if scorer.mean == 0:
        return None
    lo, hi = _bracket(scorer.sample(_sample_picks(n, base.device)), n, k)
    if not lo > 0:
        return None
    flat_out = None if out is None else out.view(-1)
    keep = None if flat_out is not None else torch.empty(n, dtype=torch.bool, device=base.device)
    if native.applies(scorer.base, scorer.finetuned):  # the same pass as one C loop
        above, values, indices, finite = native.fapm_scan(
            scorer.base, scorer.finetuned, scorer.mean, lo, hi, out=flat_out, keep=keep)
        if not finite:
            raise NonFiniteWeightsError(_NON_FINITE_CHANGE)
    else:
        above, values, indices = _fapm_scan(scorer, lo, hi, flat_out, keep)
    admitted = _resolve(k, above, values, indices)
    if admitted is None:
        return None
    if flat_out is None:
        keep[admitted] = True
        return keep.view(base.shape)
    flat_out[admitted] = scorer.finetuned[admitted]
    return out


def _fapm_scan(
    scorer: "_FapmScorer", lo: float, hi: float, flat_out: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """The fused pass of :func:`_fapm_top_k` in torch operations, slice by slice: writes
    ``score > hi`` into ``keep`` or the blend into ``flat_out``; returns :func:`_scan`'s."""
    base = scorer.base
    largest: list = []

    def scores_of(start: int, stop: int, scratch: dict) -> torch.Tensor:
        score, peak = scorer.raw(start, stop, scratch)
        largest.append(peak)  # list.append is atomic; only the set matters, not the order
        return score

    if flat_out is None:
        emit = _mark_kept(keep)
    else:
        bits = _INT_VIEW[base.dtype]
        base_bits, ft_bits, out_bits = (t.view(bits) for t in (base, scorer.finetuned, flat_out))

        def emit(start: int, stop: int, below: torch.Tensor, scratch: dict) -> None:
            # where(kept, W_ft, W_pre) on the bit patterns: W_ft ^ ((W_ft ^ W_pre) & below),
            # with below = -1 (all bits) where not kept; a branch-free blend, bit-exact.
            mask = _buffer(scratch, "blend", stop - start, bits, base.device)
            mask.copy_(below)
            target = out_bits[start:stop]
            torch.bitwise_xor(ft_bits[start:stop], base_bits[start:stop], out=target)
            target.bitwise_and_(mask).bitwise_xor_(ft_bits[start:stop])

    result = _scan(base.numel(), scorer.step, base.device, lo, hi, scores_of, emit)
    _check_finite(largest)
    return result


def prune_mask(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    sparsity: float,
    score: str = "fapm",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Boolean mask (``base``'s shape) of the task-vector elements that are kept.

    Args:
        base, finetuned: ``W_pre`` and ``W_ft``, same shape, any floating dtype and device.
        sparsity: in [0, 1], the fraction of the task vector pruned (:func:`kept_count`).
        score: one of :data:`SCORES`; ``fapm`` takes the fused pass where it applies.
        generator: the random source of ``score="random"`` (ignored otherwise).

    Exactly ``min(kept_count(n, sparsity), number of elements with dW != 0)`` are ``True``:
    elements that did not change never use up the budget; ties at the threshold go to the
    lowest flat indices (:func:`keep_top_k`). The one exception is sparsity 0, which keeps
    every element (no scoring at all), so the output is ``W_ft`` bit for bit (``-0.0``
    included). Raises :class:`NonFiniteWeightsError` for NaN / inf inputs.
    """
    n = base.numel()
    k = kept_count(n, sparsity)
    if k == 0:
        return torch.zeros_like(base, dtype=torch.bool)
    if k == n:  # sparsity 0 keeps every change; no scoring needed
        return torch.ones_like(base, dtype=torch.bool)
    if score == "fapm":
        mask = _fapm_top_k(base, finetuned, k)
        if mask is not None:
            return mask
    scores = score_task_vector(base, finetuned, score, generator)
    changed = n - int(torch.count_nonzero(scores == -math.inf))
    return keep_top_k(scores, min(k, changed))


def _pruned(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    sparsity: float,
    score: str,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """``where(prune_mask(...), finetuned, base)`` in base's dtype; fused for FAPM."""
    if score == "fapm" and finetuned.dtype == base.dtype and base.dtype in _INT_VIEW:
        k = kept_count(base.numel(), sparsity)
        out = torch.empty_like(base, memory_format=torch.contiguous_format)
        if _fapm_top_k(base, finetuned, k, out=out) is not None:
            return out
        del out
    mask = prune_mask(base, finetuned, sparsity, score, generator)
    return torch.where(mask, finetuned.to(base.dtype), base)


def fapm_prune(
    base: torch.Tensor, finetuned: torch.Tensor, sparsity: float = 0.9, score: str = "fapm"
) -> torch.Tensor:
    """``W_pre + dW_kept`` for one fine-tune: kept elements are bit-equal to ``finetuned``,
    pruned ones bit-equal to ``base``; dtype and device of ``base``. Arguments as in
    :func:`prune_mask`; sparsity 0 gives ``finetuned`` and sparsity 1 ``base`` back."""
    return _pruned(base, finetuned, sparsity, score, None)


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
    """TIES sign election over stacked weighted task vectors.

    Args:
        deltas: ``[models, *shape]``, floating (the kernel passes float32).
        consensus: ``sum`` or ``count`` (:data:`CONSENSUS`).

    Returns a boolean mask, same shape, of the entries whose sign agrees with the elected one:
    the sign of the summed deltas (``sum``) or of the summed signs (``count``); a tie elects
    ``+``. Zero entries never agree (they carry nothing to merge). Temporaries are one model's
    slice at a time (the inputs are the big tensor).
    """
    if consensus == "sum":
        total = deltas.sum(dim=0)
    elif consensus == "count":
        total = deltas[0].sign()
        for delta in deltas[1:]:
            total.add_(delta.sign())
    else:
        raise ValueError(f"unknown consensus {consensus!r}; valid: {', '.join(CONSENSUS)}")
    elected = torch.where(total >= 0, 1.0, -1.0).to(deltas.dtype)
    del total
    agree = torch.empty(deltas.shape, dtype=torch.bool, device=deltas.device)
    for index, delta in enumerate(deltas):
        torch.eq(delta.sign(), elected, out=agree[index])
    return agree


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

    Args:
        base: ``W_pre``, any floating dtype and device; the result has its dtype and device.
        finetuned: the fine-tunes' tensors, each of ``base``'s shape (an empty list returns
            ``base``).
        sparsity, weight: one value per fine-tune.
        score, rescale, consensus: one of :data:`SCORES`, :data:`RESCALES`, and None (task
            arithmetic) or one of :data:`CONSENSUS` (TIES).
        normalize: divide by the summed weights (of the agreeing models under TIES).
        scale: mergekit's ``lambda``, applied to the merged task vector.
        generators: per fine-tune, the random source of ``score="random"``.

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
    # w * dW / w is dW only where mergekit divides at all: it leaves a divisor alone below
    # 1e-8 (exactly 0 under TIES), so weight 0 gives the base, `normalize` on or off.
    undivided = 0.0 if consensus is not None else _TINY_DIVISOR
    single_identity = (
        len(finetuned) == 1
        and rescale == "none"
        and scale == 1.0
        and (weight[0] == 1.0 or (normalize and abs(weight[0]) > undivided))
    )
    if single_identity:
        return _pruned(base, finetuned[0], sparsity[0], score, generators[0])

    # The masks first (the selection's temporaries are the peak: 1 byte per element per model
    # stays), then the weighted sum slice by slice in one small float32 buffer: every
    # operation below is per element (sign election and divisor per element too), so slicing
    # changes no bit, and the memory no longer grows by 4 bytes per element per fine-tune.
    masks = [prune_mask(base, model, s, score, g).reshape(-1)
             for model, s, g in zip(finetuned, sparsity, generators)]
    factors = []
    for model, mask, s, w in zip(finetuned, masks, sparsity, weight):
        if rescale in ("l1", "l2"):  # norms of the whole task vector: one model at a time
            change = torch.empty(mask.shape, dtype=torch.float32, device=base.device)
            change.copy_(model.reshape(-1)).sub_(base.reshape(-1))
            factors.append(rescale_factor(change, mask, rescale, s) * w)
            del change
        else:
            factors.append(rescale_factor(base, mask, rescale, s) * w)
    weights = torch.tensor(weight, dtype=torch.float32, device=base.device)
    flat_base, flats = base.reshape(-1), [model.reshape(-1) for model in finetuned]
    n, count = flat_base.numel(), len(finetuned)
    step = max(1, min(n, _MERGE_SLICE))
    buffer = torch.empty(count * step, dtype=torch.float32, device=base.device)
    out = torch.empty(n, dtype=base.dtype, device=base.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        deltas = buffer[: count * (stop - start)].view(count, stop - start)
        for index, (flat, mask, factor) in enumerate(zip(flats, masks, factors)):
            change = deltas[index]
            change.copy_(flat[start:stop]).sub_(flat_base[start:stop])  # float32 arithmetic
            change.mul_(mask[start:stop]).mul_(factor)
        if consensus is None:
            merged = deltas[0]
            for extra in deltas[1:]:
                merged.add_(extra)
            divisor = weights.sum()
            if normalize and divisor.abs() > _TINY_DIVISOR:
                merged.div_(divisor)
        else:
            agree = elect_signs(deltas, consensus)
            for index in range(count):  # model by model: no float copy of `agree`
                deltas[index].mul_(agree[index])
            merged = deltas.sum(dim=0)
            if normalize:
                # sum_i w_i [agree_i], reduced as torch reduces it (bit-identical), in the buffer
                divisor = torch.mul(agree, weights.view(-1, 1), out=deltas).sum(dim=0)
                divisor[divisor == 0] = 1  # mergekit's TIES guard (exact zero only)
                merged.div_(divisor)
        if scale != 1.0:
            merged.mul_(scale)
        out[start:stop] = merged.add_(flat_base[start:stop])
    return out.view(base.shape)
