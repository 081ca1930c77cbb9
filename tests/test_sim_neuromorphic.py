"""neuromorphic_report on small spiking networks, every number worked out by hand."""

from __future__ import annotations

import json

import pytest

import targets
from edge.errors import EdgeError
from edge.sim.neuromorphic import NeuromorphicReport, SpikingLayer, neuromorphic_report
from targets import MemoryTier, Neuromorphic, Target

L = SpikingLayer


def chip(**kw: object) -> Target:
    nm = Neuromorphic(source="test figures", **kw)  # type: ignore[arg-type]
    return Target(
        "chip", "test chip", (MemoryTier("sram", "sram", 1 << 20),), ("int8",), neuromorphic=nm
    )


def per_connection() -> Target:
    """8 cores of 256 neurons and 4096 B of weights; 8-bit weights, 24-bit neuron state."""
    return chip(
        cores=8,
        neurons_per_core=256,
        synapse_bytes_per_core=4096,
        weight_bits=8,
        neuron_state_bits=24,
    )


def test_layer_sizes() -> None:
    conv = L.conv(2, 4, 3, (8, 8))
    assert (conv.neurons, conv.fan_in, conv.synapses, conv.connections) == (256, 18, 72, 4608)
    fc = L.linear(256, 10)
    assert (fc.neurons, fc.fan_in, fc.synapses, fc.connections) == (10, 256, 2560, 2560)
    pool = L.sumpool(4, 2, (4, 4))
    assert (pool.neurons, pool.fan_in, pool.synapses, pool.connections) == (64, 4, 0, 256)


def test_per_connection_target_splits_a_conv_over_cores() -> None:
    """conv 2->4, 3x3, 8x8 out: 256 neurons x 18 inputs = 4608 weights = 4608 B > 4096, so two
    cores of 128 neurons (2304 B each). linear 256->10: 2560 B, 10 neurons: one core."""
    r = neuromorphic_report(
        [L.conv(2, 4, 3, (8, 8), name="c1"), L.linear(256, 10, name="fc")], per_connection()
    )
    c1, fc = r.layers
    assert (c1.neurons, c1.synapses, c1.synapse_bytes, c1.neuron_state_bytes) == (
        256,
        4608,
        4608,
        768,
    )
    assert (c1.cores, c1.core_ids, c1.limited_by) == (2, (0, 1), "synapse_memory")
    assert (fc.synapses, fc.synapse_bytes, fc.neuron_state_bytes) == (2560, 2560, 30)
    # one core: weights at 2560/4096 = 62.5 % of their limit, neurons at 10/256
    assert (fc.cores, fc.core_ids, fc.limited_by) == (1, (2,), "synapse_memory")
    assert r.fits and (r.cores_needed, r.cores_available) == (3, 8)
    assert r.limiting_resource == "synapse_memory"
    assert r.utilization == {"neurons": 266 / 2048, "synapse_memory": 7168 / 32768, "cores": 3 / 8}
    assert (r.neurons, r.synapses, r.synapse_bytes, r.neuron_state_bytes) == (266, 7168, 7168, 798)


def test_shared_kernels_store_a_conv_kernel_once() -> None:
    """Same conv on a shared-kernel chip: 4 x 18 = 72 weights; its 256 neurons fill a core."""
    target = chip(
        cores=8,
        neurons_per_core=256,
        synapse_bytes_per_core=4096,
        weight_bits=8,
        neuron_state_bits=24,
        shared_kernels=True,
    )
    (c1,) = neuromorphic_report([L.conv(2, 4, 3, (8, 8))], target).layers
    assert (c1.synapses, c1.synapse_bytes, c1.cores, c1.limited_by) == (72, 72, 1, "neurons")


def test_too_few_cores_and_what_forced_them() -> None:
    """linear 50->150 on 4 cores of 100 neurons / 1000 B: neurons alone need 2 cores, weights
    need parts of <= 20 neurons (20 x 50 B): 150 / 20 -> 8 cores > 4 available."""
    target = chip(
        cores=4,
        neurons_per_core=100,
        synapse_bytes_per_core=1000,
        weight_bits=8,
        neuron_state_bits=16,
    )
    r = neuromorphic_report([L.linear(50, 150)], target)
    (fc,) = r.layers
    assert (fc.cores, fc.core_ids, fc.placeable, fc.limited_by) == (8, (), True, "synapse_memory")
    assert not r.fits and r.cores_needed == 8 and r.limiting_resource == "synapse_memory"
    assert r.utilization["cores"] == 2.0 and any("needs 8 cores" in n for n in r.notes)


def test_shared_core_memory_and_layer_bits() -> None:
    """One 1000 B memory per core for state and weights, no neuron limit; layers give bits.
    linear 10->20, 8-bit weights, 32-bit state: 20 x (10 + 4) = 280 B -> 1 core.
    linear 100->50: 104 B per neuron, so <= 9 per core -> ceil(50 / 9) = 6 cores.
    With 4-bit weights: 50 + 4 = 54 B per neuron, 18 per core -> 3 cores."""
    target = chip(cores=16, core_bytes_per_core=1000)
    small, big = (
        L.linear(10, 20, weight_bits=8, neuron_state_bits=32),
        L.linear(100, 50, weight_bits=8, neuron_state_bits=32),
    )
    r = neuromorphic_report([small, big], target)
    assert [(u.cores, u.synapse_bytes, u.neuron_state_bytes) for u in r.layers] == [
        (1, 200, 80),
        (6, 5000, 200),
    ]
    assert r.layers[1].limited_by == "core_memory" and r.cores_needed == 7 and r.fits
    assert r.utilization["core_memory"] == (280 + 5200) / 16000
    half = L.linear(100, 50, weight_bits=4, neuron_state_bits=32)
    (u,) = neuromorphic_report([half], target).layers
    assert (u.cores, u.synapse_bytes, u.weight_bits) == (3, 2500, 4)


def test_a_unit_too_big_for_any_core_and_the_per_layer_limit() -> None:
    target = chip(cores=4, core_bytes_per_core=1000, weight_bits=8, neuron_state_bits=8)
    r = neuromorphic_report([L.linear(2000, 1, name="wide")], target)
    (u,) = r.layers  # one neuron's 2000 weights exceed a core
    assert (u.cores, u.placeable, u.limited_by) == (0, False, "core_memory")
    assert not r.fits and r.limiting_resource == "core_memory"
    capped = chip(
        cores=4,
        neurons_per_core=10,
        synapse_bytes_per_core=1000,
        weight_bits=8,
        neuron_state_bits=8,
        max_cores_per_layer=2,
    )
    (u,) = neuromorphic_report([L.linear(4, 25)], capped).layers  # 25 / 10 -> 3 cores > 2
    assert (u.cores, u.placeable, u.core_ids, u.limited_by) == (3, False, (), "neurons")


# ------------------------------------------------------------------------- Speck


def test_speck_rejects_the_sinabs_example() -> None:
    """Sinabs overview.md: conv 16->32, 3x3, 64x64 out needs K = 16 * 2^(4 + 5) = 8 Ki kernel
    entries and N = 32 * 2^(6 + 6) = 128 Ki neurons: more than any core's 64 Ki."""
    r = neuromorphic_report([L.conv(16, 32, 3, (64, 64))], targets.load("speck"))
    (u,) = r.layers
    assert (u.synapses, u.neuron_entries, u.synapse_bytes, u.neuron_state_bytes) == (
        8192,
        131072,
        8192,
        262144,
    )
    assert (u.placeable, u.cores, u.limited_by) == (False, 0, "neurons")
    assert not r.fits and r.limiting_resource == "neurons"


def test_speck_network_one_layer_per_core() -> None:
    """conv 2->8 3x3 32x32: K = 2 * 2^(4+3) = 256, N = 8 * 2^(5+5) = 8192 -> core 0.
    sumpool 2x2: on the previous core (pool_in_core). conv 8->16 3x3 16x16: K = 8 * 2^(4+4)
    = 2048, N = 16 * 2^8 = 4096 -> core 1. Readout as conv 16->10 with a 16x16 kernel (Sinabs'
    linear): K = 16 * 2^(8 + 4) = 64 Ki -> only cores 5 and 6 have that: core 5."""
    layers = [
        L.conv(2, 8, 3, (32, 32)),
        L.sumpool(8, 2, (16, 16)),
        L.conv(8, 16, 3, (16, 16)),
        L.conv(16, 10, (16, 16), (1, 1)),
    ]
    r = neuromorphic_report(layers, targets.load("speck"))
    assert [(u.synapses, u.neuron_entries, u.cores, u.core_ids) for u in r.layers] == [
        (256, 8192, 1, (0,)),
        (0, 0, 0, ()),
        (2048, 4096, 1, (1,)),
        (65536, 10, 1, (5,)),
    ]
    assert r.layers[1].limited_by == "none" and r.layers[3].limited_by == "synapse_memory"
    assert r.fits and (r.cores_needed, r.cores_available) == (3, 9)
    assert r.limiting_resource == "synapse_memory"  # layer 4 fills 64 Ki of 64 Ki
    assert r.neuron_state_bytes == 2 * (8192 + 4096 + 10)
    assert any("pool_in_core" in n for n in r.notes)


def test_speck_matching_runs_out_of_big_cores() -> None:
    """Three layers needing 64 Ki kernel entries each: only cores 5 and 6 hold them."""
    big = L.conv(16, 10, (16, 16), (1, 1))
    r = neuromorphic_report([big, big, big], targets.load("speck"))
    assert [u.core_ids for u in r.layers] == [(5,), (6,), ()]
    assert all(u.placeable for u in r.layers) and r.cores_needed == 3
    assert not r.fits and r.limiting_resource == "cores"
    two = neuromorphic_report([big, L.conv(2, 8, 3, (32, 32)), big], targets.load("speck"))
    assert [u.core_ids for u in two.layers] == [(5,), (0,), (6,)] and two.fits


def test_augmenting_path_moves_an_earlier_layer() -> None:
    """Layer a (5 neurons) fits any core, b (50) only the 100-neuron one. With the big core
    second, a takes core 0 (first free) and b core 1; with the big core first, a takes it, then
    b's augmenting path moves a to core 1 and b gets core 0."""
    target = chip(
        cores=2,
        neurons_per_core=[10, 100],
        synapse_bytes_per_core=[100, 100],
        weight_bits=8,
        neuron_state_bits=8,
        max_cores_per_layer=1,
    )
    a, b = L.linear(2, 5, name="a"), L.linear(2, 50, name="b")
    assert [u.core_ids for u in neuromorphic_report([a, b], target).layers] == [(0,), (1,)]
    target2 = chip(
        cores=2,
        neurons_per_core=[100, 10],
        synapse_bytes_per_core=[100, 100],
        weight_bits=8,
        neuron_state_bits=8,
        max_cores_per_layer=1,
    )
    r = neuromorphic_report([a, b], target2)
    assert [u.core_ids for u in r.layers] == [(1,), (0,)] and r.fits


# ------------------------------------------------------------------------- catalog + errors


def test_loihi2_and_spinnaker2_from_the_catalog() -> None:
    """Loihi 2 stores a weight per connection: a 3x3 conv 16->32 on 32x32 has 32768 neurons
    x 144 inputs = 4,718,592 one-byte weights. A core's 131072 B hold 910 neurons' weights
    (910 x 144 = 131040), so ceil(32768 / 910) = 37 cores; state 32768 x 48 bits = 196608 B."""
    r = neuromorphic_report([L.conv(16, 32, 3, (32, 32))], targets.load("loihi2"))
    (u,) = r.layers
    assert (u.synapses, u.synapse_bytes, u.neuron_state_bytes) == (4_718_592, 4_718_592, 196_608)
    assert (u.cores, u.limited_by) == (37, "synapse_memory") and r.fits
    s2 = targets.load("spinnaker2")
    with pytest.raises(EdgeError, match="does not fix the neuron state size"):
        neuromorphic_report([L.linear(10, 10)], s2)
    r = neuromorphic_report([L.linear(100, 1000, weight_bits=16, neuron_state_bits=64)], s2)
    # per neuron 200 B weights + 8 B state = 208 B: 630 per 131072 B PE -> 2 PEs
    assert (r.layers[0].cores, r.layers[0].limited_by) == (2, "core_memory")


def test_report_is_plain_data() -> None:
    r = neuromorphic_report([L.linear(4, 4)], per_connection())
    assert isinstance(r, NeuromorphicReport)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["layers"][0]["core_ids"] == [0] and d["fits"] is True and d["packing"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: neuromorphic_report([L.linear(2, 2)], targets.load("stm32f746")),
            "no neuromorphic description",
        ),
        (lambda: neuromorphic_report([], per_connection()), "at least one layer"),
        (lambda: neuromorphic_report([("linear", 4)], per_connection()), "not a SpikingLayer"),
        (lambda: L("dense", (4, 1, 1), 2), "kind 'dense'"),
        (lambda: L("linear", (4, 2, 1), 2), "linear layer"),
        (lambda: L.conv(2, 4, 0, (8, 8)), "kernel"),
        (lambda: L.linear(4, 4, weight_bits=0), "weight_bits"),
        (lambda: L("sumpool", (4, 2, 2), 3, (2, 2)), "keeps its channels"),
    ],
)
def test_bad_input_is_one_line(call, message: str) -> None:
    with pytest.raises(EdgeError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
