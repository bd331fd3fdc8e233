"""Low-rank repair of a task vector: the data-free rivals FAPM is measured against.

- ``spectral``: per 2-D tensor, the SVD of ``dW = W_ft - W_pre`` and a hard threshold on its
  singular values at Gavish & Donoho's optimal value for an unknown noise level,
  ``tau = omega(beta) * median(sigma)`` with ``beta`` the aspect ratio (short side / long side)
  ("The Optimal Hard Threshold for Singular Values is 4/sqrt(3)", IEEE Trans. Inf. Theory
  60(8), 2014, eq. (5) and the cubic fit of omega in its section III). Spectral repair of
  fine-tuning deltas with this threshold is the method of "Spectral Unforgetting" (arXiv
  2605.20296).
- ``lowrank``: ``dW`` truncated to its ``rank`` largest singular directions (what
  ``mergekit-extract-lora`` at that rank, merged back, gives).

Pure tensor functions, no I/O. 1-D tensors (norms, biases) have no spectrum: their change is
kept whole (documented in docs/fapm.md).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def gavish_donoho_omega(beta: float) -> float:
    """omega(beta) of the optimal hard threshold with unknown noise, from the paper's cubic
    fit (accurate to about 0.02 on ``0 < beta <= 1``): ``0.56 b^3 - 0.95 b^2 + 1.82 b + 1.43``.
    """
    if not 0 < beta <= 1:
        raise ValueError(f"aspect ratio must be in (0, 1], got {beta}")
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def spectral_rank(singular_values: torch.Tensor, shape) -> int:
    """How many singular values (descending, of a ``shape`` matrix) pass the Gavish-Donoho
    threshold ``omega(beta) * median``; 0 for an all-zero matrix."""
    if singular_values.numel() == 0:
        return 0
    rows, cols = shape
    beta = min(rows, cols) / max(rows, cols)
    median = float(singular_values.median())
    if median == 0:
        return int(torch.count_nonzero(singular_values))
    tau = gavish_donoho_omega(beta) * median
    return int(torch.count_nonzero(singular_values > tau))


def truncate_task_vector(base: torch.Tensor, finetuned: torch.Tensor,
                         rank: Optional[int] = None) -> torch.Tensor:
    """The task vector ``dW`` of one tensor, reduced to a low rank, in ``base``'s shape:
    float32 (float64 for float64 inputs).

    Args:
        base, finetuned: ``W_pre`` and ``W_ft``, same shape, any floating dtype and device.
        rank: keep this many singular directions (clipped to the matrix's rank); None: the
            Gavish-Donoho threshold chooses (``spectral``).

    2-D tensors only are reduced (higher dimensions are flattened to ``[shape[0], -1]``); a
    1-D or scalar tensor's change is returned whole. NaN or infinite changes raise
    ``ValueError``.
    """
    work_dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    change = finetuned.to(work_dtype) - base.to(work_dtype)
    if not bool(torch.isfinite(change).all()):
        raise ValueError("the task vector has NaN or infinite values (check both checkpoints)")
    if change.dim() < 2:
        return change
    matrix = change.reshape(change.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = spectral_rank(s, matrix.shape) if rank is None else max(0, min(int(rank), s.numel()))
    reduced = (u[:, :keep] * s[:keep]) @ vh[:keep]
    return reduced.reshape(change.shape)


def merge_low_rank(base: torch.Tensor, finetuned: Sequence[torch.Tensor],
                   weight: Sequence[float], rank: Optional[int] = None) -> torch.Tensor:
    """``W_pre + sum_i weight_i * truncate_task_vector(W_pre, W_ft_i, rank)`` in ``base``'s
    dtype and device (``rank`` None: ``spectral``; an integer: ``lowrank``)."""
    total = None
    for model, w in zip(finetuned, weight):
        reduced = truncate_task_vector(base, model, rank).mul_(w)
        total = reduced if total is None else total.add_(reduced)
    if total is None:
        return base
    return total.add_(base.to(total.dtype)).to(base.dtype)
