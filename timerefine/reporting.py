"""What evaluations look like to a person: table rows of every answer mode and step, and their plot.

Shared by ``timerefine evaluate``, the demo, the quality benchmark and the sweep report, so that a number
reads the same wherever it is printed. Plain matplotlib (a ``Figure``, never pyplot's global state).
"""

from __future__ import annotations

from typing import Any


def metric_rows(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """An evaluation's table rows (``metrics.score``'s result): each answer mode, then the refined segment
    after each step. The modes: ``text`` (the answer), ``head`` (the L1 head), ``fused`` (their mean),
    ``frames`` (the frame relevance head)."""
    rows = {f"answer: {mode}": block for mode, block in metrics.get("modes", {}).items()}
    rows |= {f"after step {step}": block for step, block in metrics.get("steps", {}).items()}
    return rows


def plot_step_scores(axes, runs: dict[str, dict[str, dict[str, float]]]) -> None:
    """R1@0.5 and mIoU after each refinement step, one pair of lines per run (``metrics.score``'s
    ``steps`` block of each), so that runs with different K share one axis."""
    from matplotlib.ticker import MaxNLocator

    markers = {"R1@0.5": "s", "mIoU": "o"}
    for index, (name, steps) in enumerate(runs.items()):
        numbers = sorted(steps, key=int)
        for key, marker in markers.items():
            axes.plot(
                [int(n) for n in numbers],
                [steps[n][key] for n in numbers],
                marker=marker,
                linestyle="-" if key == "mIoU" else "--",
                color=f"C{index}",
                label=f"{name}: {key}",
            )
    axes.set_xlabel("refinement step")
    axes.set_ylabel("score (%)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if runs:
        axes.legend(fontsize="small")
    else:
        axes.text(
            0.5, 0.5, "no answer with refinement steps", ha="center", va="center", transform=axes.transAxes
        )
    axes.grid(alpha=0.3)
