"""Backprop vs layer-local memory from real traced graphs (make_fx through autograd)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from edge.errors import EdgeError
from edge.sim.backprop import joint_schedule
from edge.sim.planner import check_no_overlap, plan_schedule
from edge.sim.schedule import Op, Schedule
from edge.sim.simulate import SimOptions, compare, simulate, simulate_sequence
from targets import MemoryTier, Target

BIG = Target("big", "room for anything", (MemoryTier("sram", "sram", 1 << 30),), ("fp32",))
LR = 0.1


def mlp_backprop(depth: int, width: int = 64, batch: int = 32):
    """(fn, args, params, bindings) for one SGD step of a depth-layer MLP, end to end."""
    def step(x, y, *ws):
        h = x
        for w in ws[:-1]:
            h = F.relu(h @ w)
        loss = F.cross_entropy(h @ ws[-1], y)
        grads = torch.autograd.grad(loss, ws)
        return (loss, *[w - LR * g for w, g in zip(ws, grads, strict=True)])

    ws = [torch.randn(width, width) / 8 for _ in range(depth)] + [torch.randn(width, 10)]
    args = (torch.randn(batch, width), torch.randint(0, 10, (batch,)), *ws)
    n = len(ws)
    return step, args, range(2, 2 + n), {1 + i: 2 + i for i in range(n)}


def local_layer(h, w):
    """One layer-local update: a loss on the layer's own output, gradient for w only."""
    out = F.relu(h @ w)
    loss = (out.pow(2).mean() - 1.0).pow(2)
    (g,) = torch.autograd.grad(loss, (w,))
    return out.detach(), w - LR * g


def local_conv_layer(h, w):
    out = F.relu(F.conv2d(h, w, padding=1))
    loss = (out.pow(2).mean() - 1.0).pow(2)
    (g,) = torch.autograd.grad(loss, (w,))
    return out.detach(), w - LR * g


def conv_backprop(depth: int, channels: int = 8, batch: int = 4, size: int = 16):
    def step(x, *ws):
        h = x
        for w in ws:
            h = F.relu(F.conv2d(h, w, padding=1))
        loss = h.pow(2).mean()
        grads = torch.autograd.grad(loss, ws)
        return (loss, *[w - LR * g for w, g in zip(ws, grads, strict=True)])

    ws = [torch.randn(channels, channels, 3, 3) / 8 for _ in range(depth)]
    return step, (torch.randn(batch, channels, size, size), *ws), range(1, 1 + depth), {
        1 + i: 1 + i for i in range(depth)}


def test_joint_graph_categories_views_and_inplace() -> None:
    fn, args, params, bindings = mlp_backprop(2)
    s = joint_schedule(fn, *args, params=params, bindings=bindings)
    cats = [t.category for t in s.tensors.values()]
    assert cats.count("parameter") == 3 and cats.count("update_buffer") == 3
    assert cats.count("input") == 2 and cats.count("output") == 1  # x, y; the loss
    # views (t, detach) allocate nothing: they are ops without outputs
    views = [op for op in s.ops if op.op_type.startswith(("aten.t.", "aten.detach."))]
    assert views and all(op.outputs == () for op in views)
    # every new weight is `w - lr * g`: elementwise, last reader of w -> in place
    plan, lb, _ = plan_schedule(s)
    assert dict(plan.aliases) == dict(s.bindings)
    check_no_overlap(plan)
    assert plan.arena_bytes >= lb


def layers(schedule: Schedule, depth: int) -> list[Schedule]:
    """`depth` copies of one layer's schedule, each with its own tensor names (its own weights:
    a sequence shares the storage of a persistent name that several graphs hold)."""
    def copy(i: int) -> Schedule:
        def n(name: str) -> str:
            return f"l{i}.{name}"
        return Schedule(
            [Op(n(o.name), o.op_type, tuple(map(n, o.inputs)), tuple(map(n, o.outputs)))
             for o in schedule.ops],
            {n(k): dataclasses.replace(t, name=n(k)) for k, t in schedule.tensors.items()},
            {n(a): n(b) for a, b in schedule.bindings.items()},
            tuple(map(n, schedule.outputs)), schedule.name)
    return [copy(i) for i in range(depth)]


def test_backprop_peak_grows_with_depth_local_stays_flat() -> None:
    joint, local = [], []
    for depth in (1, 2, 4, 8):
        fn, args, params, bindings = mlp_backprop(depth)
        joint.append(simulate(joint_schedule(fn, *args, params=params, bindings=bindings), BIG))
        h, w = args[0], args[2]
        layer = joint_schedule(local_layer, h, w, params=(1,), bindings={1: 1})
        local.append(simulate_sequence(layers(layer, depth), BIG))
    arenas = [r.arena_bytes for r in joint]
    assert arenas == sorted(set(arenas))  # strictly growing: saved activations pile up
    assert len({r.arena_bytes for r in local}) == 1  # one layer at a time: flat
    # both keep every weight resident; only the transient part differs
    assert [r.persistent_onchip_bytes for r in local] == [
        r.persistent_onchip_bytes - 64 * 10 * 4 for r in joint]  # joint also has the head
    assert arenas[-1] > 3 * local[-1].arena_bytes
    cmp = compare(joint[-1], local[-1], ("backprop", "local"))
    assert cmp["arena_bytes"]["ratio"] < 1 / 3


def test_conv_backprop_grows_with_depth_local_stays_flat() -> None:
    joint, local = [], []
    for depth in (1, 2, 4):
        fn, args, params, bindings = conv_backprop(depth)
        s = joint_schedule(fn, *args, params=params, bindings=bindings)
        joint.append(simulate(s, BIG))
        layer = joint_schedule(local_conv_layer, args[0], args[1], params=(1,), bindings={1: 1})
        local.append(simulate_sequence(layers(layer, depth), BIG))
    arenas = [r.arena_bytes for r in joint]
    assert arenas == sorted(set(arenas))
    assert len({r.arena_bytes for r in local}) == 1
    assert joint[-1].peak_op["op_type"] != ""


def test_joint_schedule_errors() -> None:
    with pytest.raises(EdgeError, match="not a tensor"):
        joint_schedule(lambda x: x, 3.0)
    with pytest.raises(EdgeError, match="could not trace"):
        joint_schedule(lambda x: torch.autograd.grad(x.sum(), x), torch.ones(3))  # no grad


def test_report_is_json_and_plan_consistent() -> None:
    fn, args, params, bindings = conv_backprop(2)
    r = simulate(joint_schedule(fn, *args, params=params, bindings=bindings), BIG,
                 SimOptions(persistent="sram"))
    d = r.to_dict()
    assert d["fits"] and d["peak_bytes"] == d["arena_bytes"] + d["persistent_onchip_bytes"]
    arena = [p for p in r.plan if p.category not in ("parameter", "optimizer_state")
             and p.alias_of is None]
    assert max(p.offset + p.size for p in arena) <= r.arena_bytes
    assert max(row.onchip_bytes for row in r.timeline) == r.peak_op["live_bytes"]
