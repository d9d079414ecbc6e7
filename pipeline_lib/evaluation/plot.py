"""One PNG per evaluated model: accuracy per attack, and PGD accuracy against eps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..io import atomic_path
from .registry import eval_metrics


def plot_evaluation(path: str | Path, title: str, acc: Mapping[str, float], curve: Sequence[tuple[float, float]],
                    eps: float, flags: Sequence[str] = ()) -> None:
    """acc: metrics keys -> fractions; curve: (eps, PGD accuracy) points, eps 0 being clean accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(m.label, 100 * acc[m.eval_key]) for m in eval_metrics() if m.eval_key in acc]   # declared order
    fig, (ax_bar, ax_eps) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_bar.bar([b[0] for b in bars], [b[1] for b in bars], color="tab:blue")
    for i, (_, v) in enumerate(bars):
        ax_bar.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    ax_bar.set_ylim(0, 105)
    ax_bar.set_ylabel("accuracy (%)")
    ax_bar.set_title(f"eps = {eps:g} (L-inf)")
    ax_bar.tick_params(axis="x", labelrotation=30)

    pts = sorted(curve)
    ax_eps.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o")
    ax_eps.axvline(eps, color="grey", linestyle=":", linewidth=1)
    ax_eps.set_xlabel("eps")
    ax_eps.set_ylabel("PGD accuracy (%)")
    ax_eps.set_ylim(0, 105)
    ax_eps.set_title("robust accuracy vs eps")
    fig.suptitle(title + (f"  [flags: {', '.join(flags)}]" if flags else ""), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
