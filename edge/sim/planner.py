"""Greedy-by-size arena planner (the TFLite Micro `GreedyMemoryPlanner` algorithm).

Transient tensors share one arena. Each has a size and an inclusive lifetime [first, last]
in op steps. The planner:

1. rounds every size up to `alignment` (offsets are then multiples of it too);
2. sorts buffers largest first (ties: earlier first use, then name, for determinism);
3. places each at the lowest offset where it does not overlap, in address, any already-placed
   buffer whose lifetime overlaps its own: walk the time-overlapping buffers in offset order
   and take the first gap that is big enough, else go past the highest one.

`refined_plan` (what `plan_schedule` uses) starts from that plan and, while the arena is more
than 1% above the lower bound, also tries first fit in other orders (`ORDERS`: first use,
longest-lived, largest size x lifetime, last use first), each re-planned a few times with the
buffers that end at the top of the arena moved to the front (small long-lived tensors placed
last by size tend to land on top of everything). The smallest arena wins, TFLite Micro's own
plan on ties; `ArenaPlan.greedy_bytes` keeps what plain greedy gave when it lost.

The arena size is the highest end address. Two reference numbers bracket it:

* `lower_bound` - max over steps of the bytes live at once (no plan can beat it; greedy
  usually meets it or comes within a few percent);
* `no_reuse` - the sum of all sizes (what you pay with no reuse at all).

Both use the same aligned sizes as the plan, so the ratios compare like with like.
`check_no_overlap` re-verifies any plan independently (used by tests and by `simulate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from edge.sim.inplace import inplace_bindings
from edge.sim.schedule import TRANSIENT, Schedule

DEFAULT_ALIGNMENT = 16


def align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


@dataclass(frozen=True)
class Buffer:
    """Something to place: `size` bytes live during steps [first, last] inclusive."""

    name: str
    size: int
    first: int
    last: int

    def __post_init__(self) -> None:
        if self.size < 0 or self.first < 0 or self.last < self.first:
            raise ValueError(f"bad buffer {self}")


@dataclass(frozen=True)
class Placement:
    """A placed buffer: bytes [offset, offset + size) during steps [first, last]."""

    name: str
    offset: int
    size: int
    first: int
    last: int

    def __post_init__(self) -> None:
        if self.offset < 0 or self.size < 0 or self.last < self.first:
            raise ValueError(f"bad placement {self}")


@dataclass(frozen=True)
class ArenaPlan:
    """Placements plus the arena size; `aliases`: tensor -> the tensor whose bytes it reuses."""

    placements: tuple[Placement, ...]
    arena_bytes: int
    alignment: int = DEFAULT_ALIGNMENT
    aliases: Mapping[str, str] = field(default_factory=dict)
    greedy_bytes: int | None = None  # plain greedy's arena when `refined_plan` improved on it

    def __post_init__(self) -> None:
        if self.alignment <= 0:
            raise ValueError("alignment must be positive")
        object.__setattr__(self, "placements", tuple(self.placements))
        object.__setattr__(self, "aliases", MappingProxyType(dict(self.aliases)))
        top = max((p.offset + p.size for p in self.placements), default=0)
        if top > self.arena_bytes:
            raise ValueError(f"placement ends at {top} beyond arena of {self.arena_bytes} bytes")

    def offsets(self) -> dict[str, int]:
        return {p.name: p.offset for p in self.placements}


def _place(items: list[Buffer]) -> list[Placement]:
    """First fit, in the given order, of already aligned buffers."""
    placed: list[Placement] = []
    steps = max((b.last for b in items), default=0) + 1
    at: list[list[int]] = [[] for _ in range(steps)]  # step -> placed buffers live then
    for buf in items:
        offset = 0
        if buf.size:
            if buf.last - buf.first < 64:  # short-lived: who is live during its steps
                near = {j for t in range(buf.first, buf.last + 1) for j in at[t]}
            else:  # long-lived: scanning every placed buffer is cheaper
                near = {
                    j
                    for j, p in enumerate(placed)
                    if p.size and p.first <= buf.last and buf.first <= p.last
                }
            for j in sorted(near, key=lambda j: placed[j].offset):  # first fit, bottom up
                p = placed[j]
                if offset + buf.size <= p.offset:
                    break
                offset = max(offset, p.offset + p.size)
            for t in range(buf.first, buf.last + 1):
                at[t].append(len(placed))
        placed.append(Placement(buf.name, offset, buf.size, buf.first, buf.last))
    return placed


def _aligned(buffers: Iterable[Buffer], alignment: int) -> list[Buffer]:
    if alignment <= 0:
        raise ValueError("alignment must be positive")
    items = [Buffer(b.name, align_up(b.size, alignment), b.first, b.last) for b in buffers]
    items.sort(key=lambda b: (-b.size, b.first, b.name))
    return items


def _top(placed: list[Placement]) -> int:
    return max((p.offset + p.size for p in placed), default=0)


def greedy_plan(buffers: Iterable[Buffer], alignment: int = DEFAULT_ALIGNMENT) -> ArenaPlan:
    """Place `buffers` greedily by size; see the module docstring for the rule."""
    placed = _place(_aligned(buffers, alignment))
    return ArenaPlan(tuple(placed), _top(placed), alignment)


# Placement orders `refined_plan` tries, TFLite Micro's (largest first) first.
ORDERS: dict[str, Callable[[Buffer], tuple]] = {
    "size": lambda b: (-b.size, b.first, b.name),
    "first use": lambda b: (b.first, -b.size, b.name),
    "lifetime": lambda b: (-(b.last - b.first), -b.size, b.first, b.name),
    "area": lambda b: (-b.size * (b.last - b.first + 1), b.first, b.name),
    "last use": lambda b: (-b.last, -b.size, b.name),
}


def _promoted(items: list[Buffer], rounds: int, good_enough: int) -> list[Placement]:
    """First fit of `items`, then re-fits with the buffers ending at the top moved first."""
    placed = best = _place(items)
    seen: set[frozenset[str]] = set()
    for _ in range(rounds):
        if _top(best) <= good_enough:
            break
        top = _top(placed)
        first = frozenset(p.name for p in placed if p.size and p.offset + p.size == top)
        if first in seen:
            break
        seen.add(first)
        items = [b for b in items if b.name in first] + [b for b in items if b.name not in first]
        placed = _place(items)
        if _top(placed) < _top(best):
            best = placed
    return best


def refined_plan(
    buffers: Iterable[Buffer],
    alignment: int = DEFAULT_ALIGNMENT,
    rounds: int = 32,
    tolerance: float = 1.01,
) -> ArenaPlan:
    """Greedy by size; while the arena is above `tolerance` x the lower bound, the other
    `ORDERS` too, each refined by up to `rounds` top-first re-plans (module docstring)."""
    items = _aligned(buffers, alignment)
    best = _place(items)
    plain, good_enough = _top(best), int(tolerance * lower_bound(items, alignment))
    for key in ORDERS.values():
        if _top(best) <= good_enough:
            break
        placed = _promoted(sorted(items, key=key), rounds, good_enough)
        if _top(placed) < _top(best):
            best = placed
    return ArenaPlan(
        tuple(best), _top(best), alignment, greedy_bytes=plain if plain != _top(best) else None
    )


def lower_bound(buffers: Iterable[Buffer], alignment: int = DEFAULT_ALIGNMENT) -> int:
    """Max over steps of aligned bytes live at once: no arena can be smaller."""
    delta: dict[int, int] = {}
    for b in buffers:
        size = align_up(b.size, alignment)
        delta[b.first] = delta.get(b.first, 0) + size
        delta[b.last + 1] = delta.get(b.last + 1, 0) - size
    live = best = 0
    for step in sorted(delta):
        live += delta[step]
        best = max(best, live)
    return best


def no_reuse(buffers: Iterable[Buffer], alignment: int = DEFAULT_ALIGNMENT) -> int:
    """Aligned bytes with every buffer at its own address (the no-reuse baseline)."""
    return sum(align_up(b.size, alignment) for b in buffers)


def check_no_overlap(plan: ArenaPlan) -> None:
    """Raise AssertionError if two time-overlapping placements share an address or misalign."""
    ps = sorted((p for p in plan.placements if p.size), key=lambda p: p.offset)
    for p in ps:
        if p.offset % plan.alignment:
            raise AssertionError(f"{p.name} at offset {p.offset} is not {plan.alignment}-aligned")
        if p.offset + p.size > plan.arena_bytes:
            raise AssertionError(f"{p.name} ends past the arena ({plan.arena_bytes} bytes)")
    for i, a in enumerate(ps):
        for b in ps[i + 1 :]:
            if b.offset >= a.offset + a.size:
                break
            if a.first <= b.last and b.first <= a.last:
                raise AssertionError(
                    f"{a.name} [{a.offset},{a.offset + a.size}) steps {a.first}-{a.last} overlaps "
                    f"{b.name} [{b.offset},{b.offset + b.size}) steps {b.first}-{b.last}"
                )


def schedule_buffers(
    schedule: Schedule,
    *,
    inplace: bool = True,
    categories: frozenset[str] | set[str] = TRANSIENT,
) -> tuple[list[Buffer], dict[str, str]]:
    """Buffers for the tensors of `categories`, with in-place bound outputs folded away.

    A bound output that may update its parameter in place (see `edge.sim.inplace`) costs no
    arena bytes when the parameter lives outside the arena; when the parameter is itself in the
    arena the two merge into one buffer spanning both lifetimes. Returns (buffers, aliases).
    """
    life = schedule.lifetimes
    aliases = inplace_bindings(schedule) if inplace else {}
    merged: dict[str, Buffer] = {}
    for name, info in schedule.tensors.items():
        if info.category in categories and name not in aliases:
            lt = life[name]
            merged[name] = Buffer(name, info.nbytes, lt.first, lt.last)
    for new, old in aliases.items():
        if old in merged:
            a, lt = merged[old], life[new]
            size = max(a.size, schedule.tensors[new].nbytes)
            merged[old] = Buffer(old, size, min(a.first, lt.first), max(a.last, lt.last))
    return list(merged.values()), dict(aliases)


def plan_schedule(
    schedule: Schedule,
    *,
    alignment: int = DEFAULT_ALIGNMENT,
    inplace: bool = True,
    categories: frozenset[str] | set[str] = TRANSIENT,
) -> tuple[ArenaPlan, int, int]:
    """Plan a schedule's arena. Returns (plan, lower_bound_bytes, no_reuse_bytes)."""
    buffers, aliases = schedule_buffers(schedule, inplace=inplace, categories=categories)
    plan = refined_plan(buffers, alignment)
    plan = ArenaPlan(plan.placements, plan.arena_bytes, alignment, aliases, plan.greedy_bytes)
    return plan, lower_bound(buffers, alignment), no_reuse(buffers, alignment)
