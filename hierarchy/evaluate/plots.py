"""PNG figures of the evaluation report, drawn off-screen.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas rather than through
``pyplot``: no display, no global figure registry to leak memory across a long job, and no
backend switch that would disturb a notebook importing this module.
"""

from __future__ import annotations

import io
from typing import Dict, Sequence

from hierarchy.contracts import storage

MAX_LABEL = 28  # level-1 names run long ("ELECTROMENAGER - ..."): keep the axes readable
METRICS = (("loss", "loss"), ("accuracy", "accuracy"))


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    """PNG bytes written atomically to ``path`` (any filesystem): a re-run never leaves a
    half-written figure behind."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    storage.write_bytes_atomic(path, buf.getvalue())
    return path


def _short(name: str) -> str:
    return name if len(name) <= MAX_LABEL else name[: MAX_LABEL - 1] + "…"


def plot_confusion(matrix: Sequence[Sequence[float]], names: Sequence[str], path: str,
                   title: str) -> str:
    """Row-normalized confusion heat map (rows true, columns predicted), readable at 49
    classes: the figure grows with the class count, tick labels shrink, values sit on a
    colorbar (cells are annotated only when there are few enough to read)."""
    import numpy as np

    m = np.asarray(matrix, dtype=float).reshape(len(names), len(names))
    n = len(names)
    side = max(5.0, 0.22 * n + 3.0)
    font = 9 if n <= 15 else 6 if n <= 60 else 4
    fig = _figure(side + 1.5, side)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    labels = [_short(str(x)) for x in names]
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=90, fontsize=font)
    ax.set_yticklabels(labels, fontsize=font)
    ax.set_xlabel("predicted level 1")
    ax.set_ylabel("true level 1")
    ax.set_title(title)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                if m[i, j] > 0:
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=font,
                            color="white" if m[i, j] > 0.5 else "black")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label("share of the true class", fontsize=font + 1)
    bar.ax.tick_params(labelsize=font)
    return _save(fig, path)


def plot_training_curves(histories: Dict[str, dict], path: str) -> str:
    """Loss and accuracy per epoch: one subplot per metric, one colour per model, train as a
    solid line and validation dashed. Models without a metric are skipped in that subplot;
    with no history at all the figure says so instead of failing the report."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(12, 4.5)
    axes = [fig.add_subplot(1, len(METRICS), i + 1) for i in range(len(METRICS))]
    keys = list(histories)
    colors = _colors(len(keys))
    drawn = False
    for ax, (metric, label) in zip(axes, METRICS):
        for key, color in zip(keys, colors):
            h = histories[key] or {}
            for name, style in ((metric, "-"), (f"val_{metric}", "--")):
                values = h.get(name) or []
                if values:
                    ax.plot(range(1, len(values) + 1), values, style, color=color,
                            label=f"{key} {'val' if name.startswith('val_') else 'train'}")
                    drawn = True
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    if not drawn:
        for ax in axes:
            ax.text(0.5, 0.5, "no training history", ha="center", va="center",
                    transform=ax.transAxes)
    else:
        handles, labels = axes[0].get_legend_handles_labels()
        if not handles:
            handles, labels = axes[-1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=7 if len(keys) <= 10 else 5, ncol=1 if len(keys) <= 20 else 2)
    fig.tight_layout()
    return _save(fig, path)


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_risk_coverage(decisions: Dict[str, dict], path: str, title: str) -> str:
    """Hierarchical risk-coverage on val, one colour per strategy: the share of products filed
    at some level against the share of those decisions that are wrong, as the threshold
    moves; the fitted threshold as a dot and the target's risk as a grey line."""
    fig = _figure(7, 5)
    ax = fig.add_subplot(1, 1, 1)
    names = list(decisions)
    target = None
    for name, color in zip(names, _colors(len(names))):
        d = decisions[name]
        curve = d["curve"]
        pts = sorted((c, r) for c, r in zip(curve["coverage"], curve["risk"]) if c > 0)
        if pts:
            ax.plot([c for c, _ in pts], [r for _, r in pts], "-", color=color,
                    label=f"{name} (AURC {d['aurc']:.3f})" if d.get("aurc") is not None
                    else name)
        if d.get("threshold") is not None:
            at = d["all"]
            ax.plot([at["coverage"]], [1.0 - (at["precision"] or 1.0)], "o", color=color)
        target = d.get("target", target)
    if target is not None:
        ax.axhline(1.0 - target, color="grey", linestyle="--", linewidth=1,
                   label=f"target risk {1.0 - target:.2g}")
    ax.set_xlabel("coverage (share of products filed at some level)")
    ax.set_ylabel("risk (share of filed products at a wrong node)")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(bottom=0.0)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    if names:
        ax.legend(fontsize=8)
    return _save(fig, path)
