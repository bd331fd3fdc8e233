"""PNG plots for ``fapm-merge inspect`` (matplotlib, Agg backend; imported only when plotting).

- ``layers.png``: per-layer curves, one thin line per module type and a thick one for the
  element-weighted layer total;
- ``tradeoff.png``: per tensor, task-vector energy kept vs the mean relative change of the
  kept elements, FAPM and magnitude pruning joined by a segment (the paper's Figure 2 argument);
- ``heatmap_*.png``: Figure-3-style panels of one matrix (|W_pre|, |dW|, |dW|/|W_pre|, S and
  the two masks), block-mean pooled (see :func:`fapm_merge.inspect.stats.heatmap_data`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, TwoSlopeNorm  # noqa: E402

PANELS = (
    ("dw_abs_mean", "mean |dW|", True),
    ("ratio_mean", "mean |dW| / |W_pre|", True),
    ("ratio_p99", "p99 of |dW| / |W_pre|", True),
    ("negative_score_share", "share with FAPM score S < 0", False),
    ("unchanged_share", "share with dW == 0", False),
    ("jaccard", "Jaccard(FAPM mask, magnitude mask)", False),
)


def _values(rows: List[Dict[str, object]], key: str) -> np.ndarray:
    return np.array([np.nan if row.get(key) is None else row[key] for row in rows], dtype=float)


def _positive(values: np.ndarray) -> np.ndarray:
    return np.where(values > 0, values, np.nan)


def plot_layers(stats: Dict[str, object], path: Path) -> None:
    """Per-layer statistics (x: layer index), per module type and in total."""
    layers = stats["layers"]
    x = np.array([row["layer"] for row in layers])
    by_type: Dict[str, List[Dict[str, object]]] = {}
    for tensor in stats["tensors"]:
        if tensor["layer"] is not None:
            by_type.setdefault(tensor["module_type"], []).append(tensor)
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), constrained_layout=True)
    flat = axes.ravel()
    for ax, (key, title, log) in zip(flat, PANELS):
        for kind, rows in sorted(by_type.items()):
            rows = sorted(rows, key=lambda r: r["layer"])
            values = _values(rows, key)
            ax.plot([r["layer"] for r in rows], _positive(values) if log else values,
                    lw=1, alpha=0.7, marker=".", label=kind)
        values = _values(layers, key)
        ax.plot(x, _positive(values) if log else values, color="black", lw=2.5, label="layer total")
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
    for ax, (key, title, log) in zip(
        flat[6:],
        (("energy_kept", "share of sum dW^2 kept", False),
         ("kept_ratio_mean", "mean |dW|/|W_pre| of kept elements", True)),
    ):
        for score, style in (("fapm", "-"), ("magnitude", "--")):
            values = _values(layers, f"{key}_{score}")
            ax.plot(x, _positive(values) if log else values, style, lw=2.5, marker="o",
                    label=f"{'FAPM' if score == 'fapm' else 'magnitude'} (layer total)")
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    for ax in flat:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Per-layer statistics at sparsity {stats['sparsity']:g} "
                 "(layer totals element-weighted)")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_tradeoff(stats: Dict[str, object], path: Path) -> None:
    """Each tensor twice: what FAPM keeps and what magnitude pruning keeps."""
    fig, ax = plt.subplots(figsize=(7.5, 5.5), constrained_layout=True)
    points = {}
    for score in ("fapm", "magnitude"):
        xs = _values(stats["tensors"], f"kept_ratio_mean_{score}")
        ys = _values(stats["tensors"], f"energy_kept_{score}")
        points[score] = (xs, ys)
    (fx, fy), (mx, my) = points["fapm"], points["magnitude"]
    for a, b, c, d in zip(mx, fx, my, fy):
        if np.isfinite([a, b, c, d]).all():
            ax.plot([a, b], [c, d], color="0.8", lw=0.7, zorder=1)
    ax.scatter(mx, my, s=14, color="tab:red", label="magnitude |dW|", zorder=2)
    ax.scatter(fx, fy, s=14, color="tab:blue", label="FAPM", zorder=3)
    total = stats["summary"]
    for score, color in (("fapm", "tab:blue"), ("magnitude", "tab:red")):
        sx, sy = total.get(f"kept_ratio_mean_{score}"), total.get(f"energy_kept_{score}")
        if sx and sy is not None:
            ax.scatter([sx], [sy], s=160, marker="*", color=color, edgecolor="black", zorder=4)
    positive = np.concatenate([fx, mx])
    if np.any(positive > 0):
        ax.set_xscale("log")
    ax.set_xlabel("mean |dW| / |W_pre| of the kept elements (forgetting proxy; lower is safer)")
    ax.set_ylabel("share of task-vector energy sum dW^2 kept (higher keeps more task)")
    ax.set_title(f"What each criterion keeps, per tensor (sparsity {stats['sparsity']:g}; "
                 "stars: whole model)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _log_norm(values: np.ndarray) -> Optional[LogNorm]:
    finite = values[np.isfinite(values) & (values > 0)]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, [1, 99.5])
    return LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001))


def plot_heatmap(name: str, data: Dict[str, object], sparsity: float, path: Path) -> None:
    """One row of panels for one matrix; colour limits clip the extreme 1% / 0.5%."""
    panels = data["panels"]
    br, bc = data["block"]
    rows, cols = data["shape"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.9), constrained_layout=True)
    for ax, (title, values) in zip(np.atleast_1d(axes), panels.items()):
        values = np.asarray(values, dtype=float)
        if title.endswith("mask"):
            # pooled: scale to the densest block, so a 10% mask is not drawn near-black
            top = 1.0 if (br, bc) == (1, 1) else float(np.nanmax(values)) or 1.0
            image = ax.imshow(values, cmap="viridis", vmin=0, vmax=top, interpolation="nearest",
                              aspect="auto")
            title = f"{title} (kept share)"
        elif title.startswith("FAPM score"):
            # Each sign gets its own scale (1st / 99th percentile): negative scores are
            # typically far larger in size than positive ones.
            finite = values[np.isfinite(values)]
            low, high = np.percentile(finite, [1, 99]) if finite.size else (-1.0, 1.0)
            scale = max(abs(low), abs(high), 1e-30)
            low, high = min(low, -1e-6 * scale), max(high, 1e-6 * scale)
            image = ax.imshow(values, cmap="coolwarm", interpolation="nearest", aspect="auto",
                              norm=TwoSlopeNorm(vcenter=0.0, vmin=low, vmax=high))
            title = f"{title} (blue < 0 < red)"
        else:
            image = ax.imshow(values, cmap="magma", norm=_log_norm(values), interpolation="nearest",
                              aspect="auto")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, shrink=0.8)
    pooling = "no pooling" if (br, bc) == (1, 1) else f"block mean over {br}x{bc} blocks"
    fig.suptitle(f"{name}  [{rows}x{cols}, {pooling}; masks at sparsity {sparsity:g}]", fontsize=11)
    fig.savefig(path, dpi=90)
    plt.close(fig)
