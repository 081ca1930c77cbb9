"""Plots of a finished run: the training curve and, when recorded, the gradient alignment.

`plot_run(run_dir)` reads `run_dir/result.json` and writes PNGs beside it (matplotlib's
object API, rendered by Agg: no pyplot, no display, no global backend switch):
  - `loss.png` from "history": [{"epoch": e, "loss": x}, ...]
  - `alignment.png` when the run recorded alignment, in any of these forms:
      "alignment": [a_0, ..., a_{L-1}]                  one value per layer (bars)
      "alignment": [[a_0, ...], ...]                     one list per epoch (a line per layer)
      "history": [{"epoch": e, "alignment": [...]}, ...] the same, inside the history
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from edge.errors import EdgeError


def _alignment(result: dict) -> tuple[list[int], list[list[float]]] | None:
    """(epochs, per-epoch lists) from any recorded form; one list means the final values."""
    history = result.get("history") or []
    per_epoch = [h for h in history if h.get("alignment") is not None]
    if per_epoch:
        return [h["epoch"] for h in per_epoch], [h["alignment"] for h in per_epoch]
    a = result.get("alignment")
    if not a:
        return None
    if all(isinstance(v, int | float) for v in a):
        return [], [list(a)]
    return list(range(1, len(a) + 1)), [list(v) for v in a]


def plot_run(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    path = run_dir / "result.json"
    if not path.exists():
        raise EdgeError(f"no result.json in {run_dir}; plot a directory `edge train --out` wrote")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EdgeError(f"{path} is not valid JSON ({e}); rerun the training") from None
    title = f"{result.get('rule', '?')} on {result.get('data', '?')}"
    written = []

    history = result.get("history") or []
    if history:
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o")
        ax.set(xlabel="epoch", ylabel="training loss (sum over layers)", title=title)
        ax.grid(alpha=0.3)
        written.append(_save(fig, run_dir / "loss.png"))

    found = _alignment(result)
    if found:
        epochs, rows = found
        fig = Figure(figsize=(5, 3.5))
        ax = fig.subplots()
        if not epochs:
            ax.bar(range(1, len(rows[0]) + 1), rows[0])
            ax.set(xlabel="layer")
        else:
            for layer in range(len(rows[0])):
                ax.plot(epochs, [r[layer] for r in rows], marker="o", label=f"layer {layer + 1}")
            ax.set(xlabel="epoch")
            ax.legend(fontsize="small")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(ylabel="cosine to BP-SSL gradient", ylim=(-1.05, 1.05), title=title)
        written.append(_save(fig, run_dir / "alignment.png"))

    if not written:
        raise EdgeError(f"{path} holds no history or alignment to plot")
    return written


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
