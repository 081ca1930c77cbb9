"""The simulator's fit verdict counts against usable bytes = capacity - reserved (by hand)."""

from __future__ import annotations

import json

import pytest

from edge.sim.schedule import Op, Schedule, TensorInfo
from edge.sim.simulate import SimOptions, simulate
from targets import MemoryTier, Target


def step() -> Schedule:
    """A(in, 96) + P(param, 32) -op0-> B(64) -op1-> C(out, 32).

    Lifetimes A [0,0], B [0,1], C [1,1]. Greedy: A@0, B@96 (overlaps A), C@0 (only B is live
    with it). Arena 160 = the lower bound (A + B at step 0). P is persistent: 32 B beside it.
    """
    tensors = [
        TensorInfo("A", 96, "input"),
        TensorInfo("P", 32, "parameter"),
        TensorInfo("B", 64, "activation"),
        TensorInfo("C", 32, "output"),
    ]
    ops = [Op("op0", "Conv", ("A", "P"), ("B",)), Op("op1", "Relu", ("B",), ("C",))]
    return Schedule(ops, tensors)


def target(sram: int, reserved: int, flash: int = 4096) -> Target:
    tiers = (
        MemoryTier(
            "sram",
            "sram",
            sram,
            reserved_bytes=reserved,
            reserved_source="test: stack + heap" if reserved else "",
        ),
        MemoryTier("flash", "flash", flash),
    )
    return Target("dev", "test device", tiers, ("fp32",))


@pytest.mark.parametrize(
    ("reserved", "fits", "headroom"),
    [(0, True, 200 - 192), (8, True, 0), (9, False, -1), (40, False, -32)],
)
def test_reserved_bytes_are_not_usable(reserved: int, fits: bool, headroom: int) -> None:
    """SRAM 200 B; arena 160 + P 32 = 192 B on chip (persistent policy: sram)."""
    r = simulate(step(), target(200, reserved), SimOptions(persistent="sram"))
    assert r.arena_bytes == 160 and r.peak_bytes == 192
    sram = r.tier("sram")
    assert (sram.capacity, sram.reserved, sram.usable) == (200, reserved, 200 - reserved)
    assert sram.used == 192 and sram.headroom == headroom
    assert sram.fits is fits and r.fits is fits
    assert json.loads(json.dumps(r.to_dict()))["tiers"][0]["usable"] == 200 - reserved
    assert any("reserved" in n for n in r.notes) is bool(reserved)


def test_auto_placement_moves_parameters_off_chip_when_reserved_takes_their_room() -> None:
    """auto keeps P in SRAM while arena + P <= usable: 160 + 32 <= 240 - 48, not <= 240 - 49."""
    stays = simulate(step(), target(240, 48), SimOptions(persistent="auto"))
    assert stays.tier("sram").used == 192 and stays.tier("flash").used == 0 and stays.fits
    moves = simulate(step(), target(240, 49), SimOptions(persistent="auto"))
    assert moves.tier("sram").used == 160 and moves.tier("flash").used == 32 and moves.fits
    assert moves.persistent_onchip_bytes == 0


def test_the_arena_goes_to_the_sram_tier_with_the_most_usable_bytes() -> None:
    tiers = (
        MemoryTier("big", "sram", 300, reserved_bytes=200, reserved_source="test"),
        MemoryTier("small", "sram", 250),
    )
    r = simulate(step(), Target("two", "two SRAMs", tiers, ("fp32",)), SimOptions("sram"))
    assert r.arena_tier == "small" and r.tier("big").usable == 100
    # P (worst fit) goes where the most room is left: big 100 B vs small 250 - 160 = 90 B
    assert (r.tier("small").used, r.tier("big").used) == (160, 32) and r.fits
