"""Planner, lifetimes and in-place bindings on small schedules worked out by hand.

Every expected offset below follows the greedy rule by hand: sort by size (largest first, ties
by first use, then name); place at the lowest offset not overlapping, in address, a placed
buffer whose lifetime overlaps. Alignment is 16 and all sizes are multiples of 16.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.sim.inplace import base_op_type, inplace_bindings
from edge.sim.planner import (
    ArenaPlan,
    Buffer,
    Placement,
    check_no_overlap,
    greedy_plan,
    lower_bound,
    no_reuse,
    plan_schedule,
    refined_plan,
)
from edge.sim.schedule import Lifetime, Op, Schedule, TensorInfo
from edge.sim.simulate import SimOptions, simulate
from targets import MemoryTier, Target


def T(name: str, nbytes: int, category: str = "activation") -> TensorInfo:
    return TensorInfo(name, nbytes, category)


def chain() -> Schedule:
    """A(in, 32) -op0-> B(64) -op1-> C(16) -op2-> D(out, 48)."""
    tensors = [T("A", 32, "input"), T("B", 64), T("C", 16), T("D", 48, "output")]
    ops = [
        Op("op0", "Relu", ("A",), ("B",)),
        Op("op1", "Relu", ("B",), ("C",)),
        Op("op2", "Relu", ("C",), ("D",)),
    ]
    return Schedule(ops, tensors)


def test_chain_lifetimes_offsets_and_peak() -> None:
    s = chain()
    assert s.lifetimes == {
        "A": Lifetime(0, 0),
        "B": Lifetime(0, 1),
        "C": Lifetime(1, 2),
        "D": Lifetime(2, 2),
    }
    plan, lb, nr = plan_schedule(s)
    # B@0; D@0 (no time overlap with B); A overlaps B -> 64; C overlaps B and D -> 64.
    assert plan.offsets() == {"B": 0, "D": 0, "A": 64, "C": 64}
    assert plan.arena_bytes == 96  # step 0: A + B = 96; step 1: B + C = 80; step 2: C + D = 64
    assert lb == 96 and nr == 160
    check_no_overlap(plan)


def diamond() -> Schedule:
    """X(in,32) -> A(64); A -> B(16); A -> C(48); B, C -> D(out, 32)."""
    tensors = [T("X", 32, "input"), T("A", 64), T("B", 16), T("C", 48), T("D", 32, "output")]
    ops = [
        Op("op0", "Conv", ("X",), ("A",)),
        Op("op1", "Relu", ("A",), ("B",)),
        Op("op2", "Relu", ("A",), ("C",)),
        Op("op3", "Concat", ("B", "C"), ("D",)),
    ]
    return Schedule(ops, tensors)


def test_diamond_offsets_and_peak() -> None:
    plan, lb, nr = plan_schedule(diamond())
    # lifetimes X[0,0] A[0,2] B[1,3] C[2,3] D[3,3]; order A, C, X, D, B.
    # A@0; C overlaps A -> 64; X overlaps A only -> 64; D overlaps C(64..112), gap [0,64) -> 0;
    # B overlaps A(0..64), D(0..32), C(64..112) -> 112.
    assert plan.offsets() == {"A": 0, "C": 64, "X": 64, "D": 0, "B": 112}
    assert plan.arena_bytes == 128
    assert lb == 128  # step 2: A + B + C
    assert nr == 192
    check_no_overlap(plan)


def test_greedy_can_exceed_the_lower_bound() -> None:
    # C(64)[0,1]@0; A(48)[0,3] overlaps C -> 64; B(48)[3,3] fits under A -> 0;
    # D(32)[3,3]: B 0..48, A 64..112 -> gap 48..64 too small -> 112. Arena 144.
    # Step 3 holds A + B + D = 128, and 128 is achievable (A@0, C@48, B@48, D@96).
    bufs = [
        Buffer("A", 48, 0, 3),
        Buffer("B", 48, 3, 3),
        Buffer("C", 64, 0, 1),
        Buffer("D", 32, 3, 3),
    ]
    plan = greedy_plan(bufs)
    assert plan.offsets() == {"C": 0, "A": 64, "B": 0, "D": 112}
    assert plan.arena_bytes == 144 and lower_bound(bufs) == 128 and no_reuse(bufs) == 192


def test_refinement_reaches_the_lower_bound_by_hand() -> None:
    # The case above: greedy puts D on top (112). Round 1 places D first: D@0, C@0, A@64,
    # B: gap 32..64 too small -> 112, on top. Round 2 places B, D first: B@0, D@48, C@0,
    # A above B, C and D -> 80. Arena 128 = the lower bound; greedy's 144 is kept.
    bufs = [
        Buffer("A", 48, 0, 3),
        Buffer("B", 48, 3, 3),
        Buffer("C", 64, 0, 1),
        Buffer("D", 32, 3, 3),
    ]
    plan = refined_plan(bufs)
    assert plan.offsets() == {"B": 0, "D": 48, "C": 0, "A": 80}
    assert plan.arena_bytes == 128 == lower_bound(bufs) and plan.greedy_bytes == 144
    check_no_overlap(plan)
    assert refined_plan(bufs[:1]).greedy_bytes is None  # nothing to improve: plain greedy


def test_alignment_rounds_sizes_and_offsets() -> None:
    bufs = [Buffer("a", 10, 0, 1), Buffer("b", 20, 0, 1), Buffer("c", 1, 1, 1)]
    plan = greedy_plan(bufs, alignment=16)
    assert plan.offsets() == {"b": 0, "a": 32, "c": 48}
    assert plan.arena_bytes == 64 and lower_bound(bufs, 16) == 64
    assert greedy_plan(bufs, alignment=1).arena_bytes == 31


def sgd_step(last_op: str = "Sub", late_reader: bool = False) -> Schedule:
    """y = x @ W; dW = f(y, x); W2 = W - dW (bound to W). W, dW, W2: 128 B; x, y: 16 B."""
    tensors = [
        T("W", 128, "parameter"),
        T("x", 16, "input"),
        T("y", 16),
        T("dW", 128),
        T("W2", 128, "update_buffer"),
    ]
    ops = [
        Op("mm", "MatMul", ("x", "W"), ("y",)),
        Op("grad", "Outer", ("y", "x"), ("dW",)),
        Op("upd", last_op, ("W", "dW"), ("W2",)),
    ]
    if late_reader:
        tensors.append(T("n", 16, "output"))
        ops.append(Op("norm", "ReduceL2", ("W",), ("n",)))
    return Schedule(ops, tensors, bindings={"W2": "W"})


def test_inplace_binding_saves_the_update_buffer() -> None:
    s = sgd_step()
    assert inplace_bindings(s) == {"W2": "W"}
    # Without in-place: dW(128)[1,2]@0, W2(128)[2,2]@128, x(16)[0,1]@128, y(16)[0,1]@144.
    plan, lb, _ = plan_schedule(s, inplace=False)
    assert plan.offsets() == {"dW": 0, "W2": 128, "x": 128, "y": 144}
    assert plan.arena_bytes == 256 and lb == 256  # step 2: dW + W2
    # In place: W2 is written into W's storage; step 1 (x + y + dW = 160) is the peak.
    plan, lb, _ = plan_schedule(s, inplace=True)
    assert plan.offsets() == {"dW": 0, "x": 128, "y": 144}
    assert plan.arena_bytes == 160 and lb == 160 and dict(plan.aliases) == {"W2": "W"}


def test_inplace_needs_a_dead_parameter_and_an_elementwise_writer() -> None:
    assert inplace_bindings(sgd_step(last_op="Gemm")) == {}
    assert inplace_bindings(sgd_step(late_reader=True)) == {}
    assert inplace_bindings(sgd_step(last_op="aten.sub.Tensor")) == {"W2": "W"}
    assert base_op_type("aten.sub.Tensor") == "sub" and base_op_type("aten::add_") == "add"


def test_simulate_hand_case_peak_and_fit() -> None:
    target = Target(
        "tiny",
        "test device",
        (MemoryTier("sram", "sram", 300), MemoryTier("flash", "flash", 4096)),
        ("fp32",),
    )
    r = simulate(sgd_step(), target, SimOptions(persistent="sram"))
    assert (r.peak_bytes, r.arena_bytes, r.fits) == (288, 160, True)  # 128 (W) + 160
    assert r.peak_op["name"] == "grad" and r.peak_op["step"] == 1
    assert [row.live["activation"] for row in r.timeline] == [16, 144, 128]
    w2 = next(p for p in r.plan if p.name == "W2")
    w = next(p for p in r.plan if p.name == "W")
    assert (w2.alias_of, w2.tier, w2.offset) == ("W", "sram", w.offset) and w.offset == 160
    r = simulate(sgd_step(), target, SimOptions(persistent="sram", inplace=False))
    assert (r.peak_bytes, r.fits, r.tier("sram").headroom) == (384, False, -84)
    # flash cannot hold a parameter the step writes: it stays in SRAM and the report says so
    r = simulate(sgd_step(), target, SimOptions(persistent="flash"))
    assert r.tier("flash").used == 0 and r.trained and "read-only" in r.notes[0]


def test_schedule_validation() -> None:
    with pytest.raises(ValueError, match="before any op writes it"):
        Schedule([Op("a", "Relu", ("B",), ("C",))], [T("B", 4), T("C", 4)])
    with pytest.raises(ValueError, match="category"):
        T("x", 4, "weights")
    with pytest.raises(ValueError, match="not a parameter"):
        Schedule(
            [Op("a", "Relu", ("x",), ("y",))],
            [T("x", 4, "input"), T("y", 4, "output")],
            bindings={"y": "x"},
        )


def test_check_no_overlap_catches_a_bad_plan() -> None:
    bad = ArenaPlan((Placement("a", 0, 32, 0, 1), Placement("b", 16, 32, 1, 2)), 48)
    with pytest.raises(AssertionError, match="overlaps"):
        check_no_overlap(bad)
    check_no_overlap(ArenaPlan((Placement("a", 0, 32, 0, 1), Placement("b", 16, 32, 2, 3)), 48))


@st.composite
def random_schedules(draw: st.DrawFn) -> Schedule:
    n_inputs = draw(st.integers(1, 3))
    tensors = [T(f"in{i}", draw(st.integers(0, 300)), "input") for i in range(n_inputs)]
    tensors.append(T("p0", draw(st.integers(1, 300)), "parameter"))
    names = [t.name for t in tensors]
    ops = []
    for k in range(draw(st.integers(1, 14))):
        ins = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
        outs = [f"t{k}_{j}" for j in range(draw(st.integers(1, 2)))]
        for o in outs:
            tensors.append(T(o, draw(st.integers(0, 500))))
        names += outs
        ops.append(Op(f"op{k}", "Add", tuple(ins), tuple(outs)))
    last = ops[-1].outputs[0]
    tensors = [t if t.name != last else T(last, t.nbytes, "output") for t in tensors]
    return Schedule(ops, tensors)


@settings(max_examples=150, deadline=None)
@given(random_schedules(), st.sampled_from([1, 8, 16, 64]))
def test_random_schedules_never_overlap(s: Schedule, alignment: int) -> None:
    plan, lb, nr = plan_schedule(s, alignment=alignment)
    check_no_overlap(plan)
    assert lb <= plan.arena_bytes <= nr


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1000), st.integers(0, 20), st.integers(0, 5)),
        min_size=1,
        max_size=25,
    )
)
def test_random_buffers_never_overlap(raw: list[tuple[int, int, int]]) -> None:
    bufs = [
        Buffer(f"b{i}", size, first, first + length) for i, (size, first, length) in enumerate(raw)
    ]
    plan = greedy_plan(bufs)
    check_no_overlap(plan)
    assert lower_bound(bufs) <= plan.arena_bytes <= no_reuse(bufs)
