"""Does a graph fit a device? Place every tensor, plan the arena, check each memory tier.

Placement policy:

* Transient tensors (inputs, activations, update buffers, outputs) share one arena planned by
  `planner` (greedy by size), placed at offset 0 of the SRAM tier with the most usable bytes.
* Persistent tensors (parameters, optimizer state) go where `SimOptions.persistent` says:
  `sram`, `flash`, `dram`, or `auto` = SRAM if everything fits next to the arena, else the
  largest non-SRAM tier. Tensors a training step *writes* (binding targets, optimizer state)
  need writable memory: flash only ever holds the read-only ones, and the report says so.
  Several tiers of one kind are separate memories: each tensor goes whole into the one with
  the most room left (worst fit), after the arena.
* An in-place bound output (see `inplace`) lives in its parameter's storage: zero extra bytes.
* Reserved memory (`MemoryTier.reserved_bytes`: stack, heap, RTOS) is not available: every
  tier offers `usable_bytes` = capacity - reserved, offsets count from the start of that usable
  part, and a tier fits when its used bytes are at most its usable bytes. The arena goes in the
  SRAM tier with the most usable bytes. `TierUsage` reports capacity, reserved and usable.

`peak_bytes` = arena + persistent bytes in the arena's kind of memory (SRAM): the on-chip
working set. The timeline counts live bytes per category at each op; `peak_op` is where the
on-chip live bytes are highest. `simulate_sequence` runs several graphs back to back (one per
layer, as in layer-local learning): arenas are reused between graphs, so the arena is the max
over graphs, while the persistent tensors of all graphs stay resident throughout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from onnx import ModelProto

from edge.errors import EdgeError
from edge.sim.onnx_graph import GraphOptions, load_model, schedule_from_onnx
from edge.sim.planner import (
    DEFAULT_ALIGNMENT,
    ArenaPlan,
    align_up,
    check_no_overlap,
    plan_schedule,
)
from edge.sim.schedule import CATEGORIES, PERSISTENT, Schedule, TensorInfo
from targets import MemoryTier, Target

POLICIES = ("auto", "sram", "flash", "dram")
GraphLike = Schedule | ModelProto | str | Path | bytes


@dataclass(frozen=True)
class SimOptions:
    """How to simulate: persistent placement, in-place updates, alignment, graph reading."""

    persistent: str = "auto"
    inplace: bool = True
    alignment: int = DEFAULT_ALIGNMENT
    graph: GraphOptions = field(default_factory=GraphOptions)

    def __post_init__(self) -> None:
        if self.persistent not in POLICIES:
            raise EdgeError(f"persistent placement {self.persistent!r} is not one of {POLICIES}")
        if self.alignment < 1:
            raise EdgeError(f"alignment must be >= 1, got {self.alignment}")


@dataclass(frozen=True)
class TierUsage:
    """One tier after placement: `fits` is `used <= usable`, `headroom` = usable - used."""

    name: str
    kind: str
    capacity: int  # the tier's bytes
    reserved: int  # kept by the runtime (stack, heap, RTOS), per the target file
    usable: int  # capacity - reserved: what tensors may use
    used: int
    fits: bool
    headroom: int  # usable - used; negative when over


@dataclass(frozen=True)
class TensorPlan:
    """Where one tensor lives: tier, byte offset in it, size, and the steps it is live."""

    name: str
    category: str
    tier: str
    offset: int
    size: int
    first: int
    last: int
    alias_of: str | None = None


@dataclass(frozen=True)
class TimelineRow:
    step: int
    op: str
    op_type: str
    live: Mapping[str, int]  # category -> bytes live at this step, wherever they live
    onchip_bytes: int  # live bytes resident in the arena's kind of memory


@dataclass(frozen=True)
class MemoryReport:
    """The simulator's answer; plain data, `to_dict()` is JSON-able."""

    graph: str
    target: str
    fits: bool
    peak_bytes: int
    arena_bytes: int
    lower_bound_bytes: int
    no_reuse_bytes: int
    persistent_onchip_bytes: int
    peak_op: Mapping[str, Any]
    per_category: Mapping[str, int]
    tiers: tuple[TierUsage, ...]
    timeline: tuple[TimelineRow, ...]
    plan: tuple[TensorPlan, ...]
    arena_tier: str
    persistent: str  # the policy asked for
    trained: bool  # the graph has bindings (it writes parameters)
    inplace_saved_bytes: int = 0
    alignment: int = DEFAULT_ALIGNMENT
    notes: tuple[str, ...] = ()

    def tier(self, name: str) -> TierUsage:
        return next(t for t in self.tiers if t.name == name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak_op"] = dict(self.peak_op)
        d["per_category"] = dict(self.per_category)
        d["timeline"] = [{**asdict(r), "live": dict(r.live)} for r in self.timeline]
        d["notes"] = list(self.notes)
        d["tiers"] = [asdict(t) for t in self.tiers]
        d["plan"] = [asdict(p) for p in self.plan]
        return d


def load_target(target: Target | str | Path) -> Target:
    if isinstance(target, Target):
        return target
    import targets

    loader = getattr(targets, "load", None)
    if loader is None:
        raise EdgeError("this install has no target catalog loader (targets.load)")
    return loader(target)


def to_schedule(graph: GraphLike, options: SimOptions | None = None) -> Schedule:
    if isinstance(graph, Schedule):
        return graph
    return schedule_from_onnx(graph, (options or SimOptions()).graph)


@dataclass
class _Part:
    schedule: Schedule
    plan: ArenaPlan
    lower: int
    no_reuse: int
    prefix: str


def _plan_part(schedule: Schedule, options: SimOptions, prefix: str = "") -> _Part:
    plan, lower, nr = plan_schedule(schedule, alignment=options.alignment, inplace=options.inplace)
    check_no_overlap(plan)
    return _Part(schedule, plan, lower, nr, prefix)


def _fill(
    tensors: Sequence[TensorInfo],
    tiers: Sequence[MemoryTier],
    free: dict[str, int],
    align: int,
    where: dict[str, str],
) -> None:
    """Worst fit: each tensor (largest first) into the tier with the most room left."""
    for t in sorted(tensors, key=lambda t: (-t.nbytes, t.name)):
        tier = max(tiers, key=lambda x: (free[x.name], -tiers.index(x)))
        where[t.name] = tier.name
        free[tier.name] -= align_up(t.nbytes, align)


def _place_persistent(
    pers: Sequence[TensorInfo],
    writable: set[str],
    arena: int,
    target: Target,
    options: SimOptions,
    arena_tier: MemoryTier,
) -> tuple[dict[str, str], list[str]]:
    """Tensor -> tier name for persistent tensors, by policy; plus notes."""
    a = options.alignment
    sram, flash, dram = (list(target.tier(k)) for k in ("sram", "flash", "dram"))

    def fresh() -> dict[str, int]:
        return {
            t.name: t.usable_bytes - (arena if t.name == arena_tier.name else 0)
            for t in target.tiers
        }

    free, where, notes = fresh(), {}, []
    ro = [t for t in pers if t.name not in writable]
    rw = [t for t in pers if t.name in writable]
    rw_bytes = sum(t.nbytes for t in rw)
    policy = options.persistent
    if policy == "auto":
        _fill(pers, sram, free, a, where)
        if all(free[t.name] >= 0 for t in sram) or not (flash or dram):
            return where, notes
        free, where = fresh(), {}
        off = max(flash + dram, key=lambda t: t.usable_bytes)
        notes.append("auto: persistent tensors do not fit in SRAM beside the arena")
        if ro:
            _fill(ro, [off], free, a, where)
            notes.append(
                f"{len(ro)} read-only persistent tensors placed in {off.name} ({off.kind})"
            )
        if rw:
            wtier = [max(dram, key=lambda t: t.usable_bytes)] if dram else sram
            _fill(rw, wtier, free, a, where)
            notes.append(
                f"{len(rw)} tensors the step updates ({rw_bytes} B) need writable "
                f"memory: placed in {wtier[0].name} ({wtier[0].kind})"
            )
        return where, notes
    if policy == "sram":
        _fill(pers, sram, free, a, where)
    elif policy == "dram":
        if not dram:
            raise EdgeError(f"target {target.name!r} has no dram tier; use --persistent sram/auto")
        _fill(pers, dram, free, a, where)
    else:
        if not flash:
            raise EdgeError(
                f"target {target.name!r} has no flash tier; use --persistent sram/dram/auto"
            )
        _fill(ro, flash, free, a, where)
        if rw:
            _fill(rw, sram, free, a, where)
            notes.append(
                f"flash is read-only at run time: the {len(rw)} tensors this training "
                f"step updates ({rw_bytes} B) were placed in SRAM instead; flash can "
                "hold parameters only for inference graphs (no bindings)"
            )
    return where, notes


def _shared_persistent(parts: Sequence[_Part]) -> set[str]:
    """Persistent tensor names that more than one graph holds, at one size: the same storage
    (the step counter every per-layer graph reads, say), counted once."""
    if len(parts) < 2:
        return set()
    seen: dict[str, set[int]] = {}
    count: dict[str, int] = {}
    for p in parts:
        for t in p.schedule.tensors.values():
            if t.persistent:
                seen.setdefault(t.name, set()).add(t.nbytes)
                count[t.name] = count.get(t.name, 0) + 1
    return {n for n, sizes in seen.items() if count[n] > 1 and len(sizes) == 1}


def _assemble(
    parts: Sequence[_Part], target: Target, options: SimOptions, name: str
) -> MemoryReport:
    a = options.alignment
    onchip_kind = "sram"
    arena_tier = max(
        target.tier(onchip_kind) or target.tiers, key=lambda t: (t.usable_bytes, t.bytes)
    )
    arena = max((p.plan.arena_bytes for p in parts), default=0)
    pers: list[TensorInfo] = []
    writable: set[str] = set()
    shared = _shared_persistent(parts)

    def key(p: _Part, name: str) -> str:  # one storage for a tensor several graphs share
        return name if name in shared else p.prefix + name

    for p in parts:
        for t in p.schedule.tensors.values():
            if t.persistent and key(p, t.name) not in {x.name for x in pers}:
                pers.append(replace(t, name=key(p, t.name)))
            if t.persistent and (
                t.category == "optimizer_state" or t.name in p.schedule.bindings.values()
            ):
                writable.add(key(p, t.name))
    where, notes = _place_persistent(pers, writable, arena, target, options, arena_tier)
    tier_kind = {t.name: t.kind for t in target.tiers}

    used = {t.name: 0 for t in target.tiers}
    used[arena_tier.name] = arena
    plan: list[TensorPlan] = []
    pers_offset: dict[str, int] = {}
    for t in sorted(pers, key=lambda t: (where[t.name], -t.nbytes, t.name)):
        pers_offset[t.name] = used[where[t.name]]
        used[where[t.name]] += align_up(t.nbytes, a)
    persistent_onchip = sum(
        align_up(t.nbytes, a) for t in pers if tier_kind[where[t.name]] == onchip_kind
    )

    timeline: list[TimelineRow] = []
    per_category = dict.fromkeys(CATEGORIES, 0)
    pers_live = dict.fromkeys(CATEGORIES, 0)
    pers_onchip_raw = 0
    for t in pers:
        pers_live[t.category] += t.nbytes
        if tier_kind[where[t.name]] == onchip_kind:
            pers_onchip_raw += t.nbytes
    base, saved = 0, 0
    placed_pers: set[str] = set()
    end = max(sum(len(p.schedule.ops) for p in parts) - 1, 0)  # persistent: live throughout
    for p in parts:
        s, off = p.schedule, p.plan.offsets()
        n = len(s.ops)
        delta: list[dict[str, int]] = [dict.fromkeys(CATEGORIES, 0) for _ in range(n + 1)]
        for t in s.tensors.values():
            lt = s.lifetimes[t.name]
            alias = p.plan.aliases.get(t.name)
            full = key(p, t.name) if t.persistent else p.prefix + t.name
            if t.persistent:
                if full not in placed_pers:
                    placed_pers.add(full)
                    per_category[t.category] += t.nbytes
                    plan.append(
                        TensorPlan(
                            full, t.category, where[full], pers_offset[full], t.nbytes, 0, end
                        )
                    )
                continue
            per_category[t.category] += t.nbytes
            if alias is not None:  # bindings target persistent tensors only
                saved += t.nbytes
                tgt = key(p, alias)
                plan.append(
                    TensorPlan(
                        full,
                        t.category,
                        where[tgt],
                        pers_offset[tgt],
                        t.nbytes,
                        base + lt.first,
                        base + lt.last,
                        tgt,
                    )
                )
                continue
            plan.append(
                TensorPlan(
                    full,
                    t.category,
                    arena_tier.name,
                    off[t.name],
                    t.nbytes,
                    base + lt.first,
                    base + lt.last,
                )
            )
            if n:
                delta[lt.first][t.category] += t.nbytes
                delta[lt.last + 1][t.category] -= t.nbytes
        live = dict.fromkeys(CATEGORIES, 0)
        for i, op in enumerate(s.ops):
            for c in CATEGORIES:
                live[c] += delta[i][c]
            row = {c: live[c] + pers_live[c] for c in CATEGORIES}
            transient = sum(v for c, v in live.items() if c not in PERSISTENT)
            timeline.append(
                TimelineRow(
                    base + i, p.prefix + op.name, op.op_type, row, transient + pers_onchip_raw
                )
            )
        base += n
    for p in parts:
        notes.extend(p.prefix + n for n in p.schedule.notes)
        if p.plan.greedy_bytes is not None:
            notes.append(
                f"{p.prefix}arena: greedy by size gave {p.plan.greedy_bytes} B; "
                f"re-planned with the top buffers first: {p.plan.arena_bytes} B"
            )

    tiers = tuple(
        TierUsage(
            t.name,
            t.kind,
            t.bytes,
            t.reserved_bytes,
            t.usable_bytes,
            used[t.name],
            used[t.name] <= t.usable_bytes,
            t.usable_bytes - used[t.name],
        )
        for t in target.tiers
    )
    reserved = [t for t in target.tiers if t.reserved_bytes]
    if reserved:
        notes.append(
            "reserved by the runtime, not available to tensors: "
            + ", ".join(f"{t.name} {t.reserved_bytes} B" for t in reserved)
        )
    if timeline:
        top = max(timeline, key=lambda r: (r.onchip_bytes, -r.step))
        peak_op = {
            "step": top.step,
            "name": top.op,
            "op_type": top.op_type,
            "live_bytes": top.onchip_bytes,
        }
    else:
        peak_op = {"step": None, "name": None, "op_type": None, "live_bytes": 0}
    trained = any(p.schedule.bindings for p in parts)
    return MemoryReport(
        graph=name,
        target=target.name,
        fits=all(t.fits for t in tiers),
        peak_bytes=arena + persistent_onchip,
        arena_bytes=arena,
        lower_bound_bytes=max((p.lower for p in parts), default=0),
        no_reuse_bytes=max((p.no_reuse for p in parts), default=0),
        persistent_onchip_bytes=persistent_onchip,
        peak_op=peak_op,
        per_category=per_category,
        tiers=tiers,
        timeline=tuple(timeline),
        plan=tuple(plan),
        arena_tier=arena_tier.name,
        persistent=options.persistent,
        trained=trained,
        inplace_saved_bytes=saved,
        alignment=a,
        notes=tuple(notes),
    )


def simulate(
    graph: GraphLike, target: Target | str | Path, options: SimOptions | None = None
) -> MemoryReport:
    """Simulate one graph (a Schedule, ModelProto, ONNX bytes or path) on a target."""
    options = options or SimOptions()
    tgt = load_target(target)
    schedule = to_schedule(graph, options)
    return _assemble([_plan_part(schedule, options)], tgt, options, schedule.name)


def simulate_sequence(
    graphs: Sequence[GraphLike], target: Target | str | Path, options: SimOptions | None = None
) -> MemoryReport:
    """Graphs run one after another (e.g. one local-learning step per layer).

    Peak = max arena over graphs + the persistent bytes of all graphs. Tensor names get a
    `g<i>/` prefix, except persistent tensors several graphs hold at one size (one storage,
    counted once); steps are numbered across the whole sequence.
    """
    if not graphs:
        raise EdgeError("simulate_sequence needs at least one graph")
    options = options or SimOptions()
    tgt = load_target(target)
    parts = [_plan_part(to_schedule(g, options), options, f"g{i}/") for i, g in enumerate(graphs)]
    name = " + ".join(p.schedule.name for p in parts)
    return _assemble(parts, tgt, options, f"sequence of {len(parts)}: {name}")


def max_batch_that_fits(
    model: ModelProto | str | Path | bytes,
    target: Target | str | Path,
    options: SimOptions | None = None,
    *,
    limit: int = 1 << 16,
) -> int | None:
    """Largest batch size (<= limit) for which the graph fits, or None if batch 1 does not.

    Doubling then bisection; assumes memory grows with the batch (it does for every tensor
    whose shape has the batch dim, and the rest is constant).
    """
    options = options or SimOptions()
    proto, tgt = load_model(model), load_target(target)

    def fits(batch: int) -> bool:
        opts = replace(options, graph=replace(options.graph, batch_size=batch))
        return simulate(proto, tgt, opts).fits

    if not fits(1):
        return None
    lo, hi = 1, 2  # invariant: lo fits; hi does not (or is past the limit)
    while True:
        if hi > limit:
            hi = limit + 1
            break
        if not fits(hi):
            break
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


COMPARED = (
    "fits",
    "peak_bytes",
    "arena_bytes",
    "lower_bound_bytes",
    "no_reuse_bytes",
    "persistent_onchip_bytes",
)


def compare(
    a: MemoryReport, b: MemoryReport, labels: tuple[str, str] = ("a", "b")
) -> dict[str, dict[str, Any]]:
    """Side-by-side key figures of two reports, with b - a and b / a for the byte counts."""
    out: dict[str, dict[str, Any]] = {}
    for key in COMPARED:
        va, vb = getattr(a, key), getattr(b, key)
        row: dict[str, Any] = {labels[0]: va, labels[1]: vb}
        if not isinstance(va, bool):
            row["delta"] = vb - va
            row["ratio"] = (vb / va) if va else None
        out[key] = row
    return out
