"""Show a `MemoryReport`: a rich table for the terminal and a PNG timeline.

The timeline is a stacked area of live bytes per category over op index (persistent
categories at the bottom, since they are live throughout), with the on-chip capacity as a
horizontal line (and, when the target reserves some of it, the usable bytes dotted), the
planned peak (arena + on-chip persistent) dashed, and the peak op annotated. Matplotlib runs
on the Agg backend: no display needed.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from edge.errors import EdgeError
from edge.sim.schedule import CATEGORIES, PERSISTENT
from edge.sim.simulate import MemoryReport

_COLORS = {
    "parameter": "#4c72b0", "optimizer_state": "#8172b3", "input": "#55a868",
    "activation": "#dd8452", "update_buffer": "#c44e52", "output": "#937860",
}  # fmt: skip


def fmt_bytes(n: int | None) -> str:
    """Human bytes, binary units: 1536 -> '1.5 KiB'."""
    if n is None:
        return "-"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{sign}{n / size:.1f} {unit}"
    return f"{sign}{n} B"


def render_table(report: MemoryReport, console: Console | None = None) -> None:
    """Print the verdict, the key figures, per-tier usage and per-category totals."""
    console = console or Console()
    verdict = "[green]fits[/green]" if report.fits else "[red]does not fit[/red]"
    console.print(f"[bold]{report.graph}[/bold] on [bold]{report.target}[/bold]: {verdict}")
    t = Table(title="memory", show_header=True)
    t.add_column("figure")
    t.add_column("bytes", justify="right")
    t.add_column("", justify="right")
    lb = report.lower_bound_bytes
    ratio = f"{report.arena_bytes / lb:.3f}x lower bound" if lb else ""
    t.add_row(
        "peak (arena + on-chip persistent)", f"{report.peak_bytes:,}", fmt_bytes(report.peak_bytes)
    )
    t.add_row("arena (greedy plan)", f"{report.arena_bytes:,}", ratio)
    t.add_row("arena lower bound", f"{lb:,}", fmt_bytes(lb))
    t.add_row("arena without reuse", f"{report.no_reuse_bytes:,}", fmt_bytes(report.no_reuse_bytes))
    t.add_row(
        "persistent on chip",
        f"{report.persistent_onchip_bytes:,}",
        fmt_bytes(report.persistent_onchip_bytes),
    )
    if report.inplace_saved_bytes:
        t.add_row(
            "saved by in-place updates",
            f"{report.inplace_saved_bytes:,}",
            fmt_bytes(report.inplace_saved_bytes),
        )
    op = report.peak_op
    if op.get("name") is not None:
        t.add_row("peak op", f"step {op['step']}", f"{op['name']} ({op['op_type']})")
    console.print(t)

    tiers = Table(title="tiers (fits: used <= usable = capacity - reserved)")
    for col in ("tier", "kind", "capacity", "reserved", "usable", "used", "headroom", "fits"):
        tiers.add_column(col, justify="left" if col in ("tier", "kind") else "right")
    for u in report.tiers:
        tiers.add_row(
            u.name,
            u.kind,
            fmt_bytes(u.capacity),
            fmt_bytes(u.reserved),
            fmt_bytes(u.usable),
            fmt_bytes(u.used),
            fmt_bytes(u.headroom),
            "yes" if u.fits else "[red]no[/red]",
        )
    console.print(tiers)

    cats = Table(title="tensors by category")
    cats.add_column("category")
    cats.add_column("total bytes", justify="right")
    cats.add_column("where", justify="left")
    homes: dict[str, set[str]] = {}
    for p in report.plan:
        homes.setdefault(p.category, set()).add(p.tier)
    for c in CATEGORIES:
        if report.per_category.get(c):
            cats.add_row(c, f"{report.per_category[c]:,}", ", ".join(sorted(homes.get(c, ()))))
    console.print(cats)
    for note in report.notes:
        console.print(f"note: {note}")


def plot_timeline(report: MemoryReport, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG: on-chip live bytes per category over op index, capacity, peak annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if not report.timeline:
        raise EdgeError("the graph has no ops: nothing to plot")
    steps = [r.step for r in report.timeline]
    kinds = {t.name: t.kind for t in report.tiers}
    onchip = kinds[report.arena_tier]
    off: dict[str, int] = {}  # persistent bytes resident off chip: not part of the stack
    for p in report.plan:
        if p.alias_of is None and p.category in PERSISTENT and kinds[p.tier] != onchip:
            off[p.category] = off.get(p.category, 0) + p.size
    rows = [{c: r.live.get(c, 0) - off.get(c, 0) for c in CATEGORIES} for r in report.timeline]
    cats = [c for c in CATEGORIES if any(r[c] for r in rows)]
    arena_tier = next(t for t in report.tiers if t.name == report.arena_tier)
    top = max([sum(r.values()) for r in rows] + [arena_tier.capacity, report.peak_bytes])
    unit, scale = ("MiB", 1 << 20) if top >= 8 << 20 else ("KiB", 1 << 10)
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    try:
        xs = steps + [steps[-1] + 1]  # each op holds its bytes for one unit of x
        if cats:
            ax.stackplot(
                xs,
                [[r[c] / scale for r in rows + rows[-1:]] for c in cats],
                labels=cats,
                colors=[_COLORS[c] for c in cats],
                alpha=0.85,
                step="post",
            )
        ax.axhline(
            arena_tier.capacity / scale,
            color="black",
            lw=1.2,
            label=f"{arena_tier.name} capacity ({fmt_bytes(arena_tier.capacity)})",
        )
        if arena_tier.reserved:
            ax.axhline(
                arena_tier.usable / scale,
                color="black",
                lw=1.2,
                ls=":",
                label=f"usable after {fmt_bytes(arena_tier.reserved)} reserved "
                f"({fmt_bytes(arena_tier.usable)})",
            )
        ax.axhline(
            report.peak_bytes / scale,
            color="black",
            lw=1,
            ls="--",
            label=f"planned peak ({fmt_bytes(report.peak_bytes)})",
        )
        op = report.peak_op
        if op.get("step") is not None:
            y = sum(rows[op["step"]].values()) / scale
            ax.annotate(
                f"peak at op {op['step']}: {op['name']} ({op['op_type']})",
                xy=(op["step"] + 0.5, y),
                xytext=(0.35, 0.93),
                textcoords="axes fraction",
                fontsize=8,
                arrowprops={"arrowstyle": "->", "lw": 0.8},
            )
        ax.set_xlabel("op index")
        ax.set_ylabel(f"live {unit}")
        ax.set_xlim(xs[0], xs[-1])
        ax.set_ylim(0, 1.25 * top / scale)
        extra = f"; off chip: {fmt_bytes(sum(off.values()))}" if off else ""
        ax.set_title(title or f"{report.graph} on {report.target}{extra}", fontsize=10)
        ax.legend(loc="upper right", fontsize=7, framealpha=0.9, ncol=2)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    except OSError as exc:
        raise EdgeError(f"cannot write plot {path}: {exc}") from None
    finally:
        plt.close(fig)
    return path


def render_code_size(iree: dict, console: Console | None = None) -> None:
    """The IREE-compiled step's code beside the target's flash (`export.iree` report)."""
    console = console or Console()
    check = iree.get("parity") or {}
    console.print(
        f"IREE host module {fmt_bytes(iree['host']['bytes'])}; parity with "
        f"onnxruntime over {check.get('steps')} steps: relative L2 "
        f"{check.get('max_rel_l2', 0):.1e}"
    )
    cross = iree.get("cross")
    if not cross:
        return
    t = Table(title=f"code for {cross['target']} ({cross['cpu']}, {cross['triple']})")
    t.add_column("part")
    t.add_column("bytes", justify="right")
    for key in ("code_bytes", "rodata_bytes", "data_bytes", "module_bytes"):
        t.add_row(key.removesuffix("_bytes"), fmt_bytes(cross[key]))
    flash = cross.get("flash")
    used = fmt_bytes(cross["flash_bytes"])
    if flash:
        verdict = "fits" if flash["fits"] else "[red]does not fit[/red]"
        t.add_row(
            f"flash ({flash['tier']})",
            f"{used} of {fmt_bytes(flash['capacity'])}",
            f"{100 * flash['fraction']:.1f} %, {verdict}",
        )
    else:
        t.add_row("flash", used, "target lists no flash tier")
    console.print(t)
    console.print(
        "note: the IREE runtime (VM + HAL) and soft-float helpers are linked once per "
        "firmware and not counted"
    )
