"""Measured peak memory of one training step, local rules against backprop.

Each figure is torch's MemTracker peak over one `train_step` call (every tensor the step
allocates, op outputs included), after one warm-up step, in a fresh tracker:

- `peak_bytes`: everything live at the peak: parameters, optimizer state, the two views and
  what the step allocated. The step runs as the training loop runs it (`donate=True`: each
  layer's new parameters replace the old ones as soon as they exist, as on a device).
- `transient_bytes`: peak minus parameters, optimizer state and views: the working set.
- `floor_bytes`: the physical floor: parameters + optimizer state + the largest single
  layer's working set, taken as that layer's input and pre-activation output for both views.
"""

from __future__ import annotations

import math

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from edge.nets import NetSpec, init_params, preset
from edge.optim import OptimConfig
from edge.rules import get
from edge.step import train_step


def _bytes(tensors) -> int:
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def floor_bytes(net: NetSpec, batch: int, persistent: int) -> int:
    largest, shape = 0, net.in_shape
    for layer, out in zip(net.layers, net.shapes(), strict=True):
        pre = out if not layer.pool else (out[0], out[1] * 2, out[2] * 2)
        largest = max(largest, 2 * batch * 4 * (math.prod(shape) + math.prod(pre)))
        shape = out
    return persistent + largest


def setup(net: NetSpec, rule_name: str, batch: int, seed: int = 0):
    """A rule's initial parameters, AdamW state and two random views: what one step takes."""
    rule = get(rule_name)
    rule.check(net)
    gen = torch.Generator().manual_seed(seed)
    params = init_params(net, gen)
    params.update(rule.init(net, gen))
    opt = OptimConfig("adamw", lr=1e-3)
    x1 = torch.randn(batch, *net.in_shape, generator=gen)
    x2 = torch.randn(batch, *net.in_shape, generator=gen)
    return rule, opt, params, opt.init_state(params), x1, x2


def measure(net: NetSpec, rule_name: str, batch: int, seed: int = 0) -> dict:
    rule, opt, params, state, x1, x2 = setup(net, rule_name, batch, seed)
    train_step(net, rule, opt, params, state, x1, x2)  # warm-up
    given = _bytes([*params.values(), *state.values(), x1, x2])
    persistent = _bytes([*params.values(), *state.values()])
    tracker = MemTracker()
    tracker.track_external(*params.values(), *state.values(), x1, x2)
    with tracker:
        train_step(net, rule, opt, params, state, x1, x2, donate=True)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return {
        "rule": rule_name,
        "batch": batch,
        "peak_bytes": peak,
        "transient_bytes": peak - given,
        "persistent_bytes": persistent,
        "floor_bytes": floor_bytes(net, batch, persistent),
    }


def run(rules: list[str], batch: int = 32, width: float = 0.125) -> dict:
    net = preset("vgg6", (3, 32, 32), width)
    rows = [measure(net, r, batch) for r in rules]
    return {"net": net.to_dict(), "width": width, "batch": batch, "rows": rows}


if __name__ == "__main__":
    import json

    print(json.dumps(run(["clapp++", "bp-infonce", "bp-clapp++"]), indent=1))
