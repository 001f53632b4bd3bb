"""A PNG of the study's metric per trial over training steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray_app.extras import require


def plot_trials(trials: list[dict[str, Any]], metric: str, best_id: str | None,
                path: Path) -> Path:
    """One line per trial from its `history` of [step, value]; the best trial drawn bold,
    trials stopped early dashed. Raises MissingPackage without matplotlib (the `plot` extra)."""
    matplotlib = require("matplotlib", "trials.png of ray-app tune")
    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for trial in trials:
        if not trial["history"]:
            continue
        steps, values = zip(*trial["history"])
        best = trial["trial_id"] == best_id
        ax.plot(steps, values, marker="o", markersize=3,
                linewidth=2.5 if best else 1.2,
                linestyle="--" if trial["status"] == "stopped early" else "-",
                label=f"{trial['trial_id']}{' (best)' if best else ''} {trial['label']}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (dashed: stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
