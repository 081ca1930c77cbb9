"""Acceptance: a local step keeps no activations of other layers.

Measured with torch's MemTracker: the extra memory of one step is its peak minus what it is
given (parameters, optimizer state, the two views) and what it returns (the new parameters
and state). For CLAPP++ that is one layer's working set, the same at depth 4 and 8; for the
backprop baseline it is every layer's activations, so it grows with depth.
"""

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from edge.nets.presets import vgg
from edge.optim import OptimConfig
from edge.rules import get
from edge.step import train_step


def _bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def extra_step_memory(rule_name: str, depth: int) -> int:
    net = vgg([32] * depth, [], (3, 16, 16))
    rule = get(rule_name)
    rule.check(net)
    gen = torch.Generator().manual_seed(0)
    params = net.init_params(gen)
    params.update(rule.init(net, gen))
    opt = OptimConfig("sgd", lr=0.01)
    state = opt.init_state(params)
    x1, x2 = torch.randn(16, 3, 16, 16, generator=gen), torch.randn(16, 3, 16, 16, generator=gen)
    tracker = MemTracker()
    tracker.track_external(*params.values(), *state.values(), x1, x2)
    with tracker:
        new_params, new_state, metrics = train_step(net, rule, opt, params, state, x1, x2)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    given = _bytes([*params.values(), *state.values(), x1, x2])
    returned = _bytes([*new_params.values(), *new_state.values(), *metrics.values()])
    return peak - given - returned


def test_local_step_memory_is_flat_in_depth_and_backprop_grows():
    local4, local8 = extra_step_memory("clapp++", 4), extra_step_memory("clapp++", 8)
    bp4, bp8 = extra_step_memory("bp-infonce", 4), extra_step_memory("bp-infonce", 8)
    assert local4 > 0 and bp4 > 0
    assert abs(local8 - local4) <= 0.10 * local4, (local4, local8)
    # backprop keeps 4 more layers of activations for both views: 4 * 2 * 16*32*16*16*4 B
    assert bp8 - bp4 >= 4 * 2 * 16 * 32 * 16 * 16 * 4 * 0.9, (bp4, bp8)


def test_row_chunks_by_hand_on_vgg6():
    """VGG-6 x1/8 at 64 rows, per sample (input, largest map): (3072, 16384), (16384, 32768),
    (8192, 8192), (8192, 16384), (4096, 8192), (2048, 2048). The floor's working set is
    block 1's 16384 + 32768 = 49152; a block takes the fewest power-of-two chunks c with
    c * 49152 >= 4 * its largest map, block 1 (which sets the floor) 8 * it: 2, 8, 1, 2, 1, 1."""
    from edge.nets import preset
    from edge.step import row_chunks

    assert row_chunks(preset("vgg6", (3, 32, 32), 0.125), 64) == (2, 8, 1, 2, 1, 1)
    assert row_chunks(preset("vgg6", (3, 32, 32), 0.125), 4) == (2, 4, 1, 2, 1, 1)  # <= rows
