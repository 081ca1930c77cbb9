"""Measured peak memory of one training step, local rules against backprop.

Each figure is torch's MemTracker peak over one `train_step` call (every tensor the step
allocates, op outputs included), after one warm-up step, in a fresh tracker:

- `peak_bytes`: everything live at the peak: parameters, optimizer state, the two views and
  what the step allocated. The step runs as the training loop runs it (`donate=True`: each
  block's new parameters replace the old ones as soon as they exist, as on a device).
- `transient_bytes`: peak minus parameters, optimizer state and views: the working set.
- `floor_bytes`: the physical floor: parameters + optimizer state + the largest single
  block's working set, taken as that block's input and its largest inner map (for a VGG
  block conv + ReLU + pool: the pre-activation conv output) for both views, in fp32.

Networks are built as training builds them (`edge.app.train.build`: BatchNorm folded, the
rule's own parameters added), so any preset works.

    python -m benchmarks.memory [--net vgg6 --width 0.125 --batch 32 --rules clapp++,bp-infonce]
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from edge.app.config import TrainConfig
from edge.app.train import build
from edge.nets import NetSpec
from edge.optim import OptimConfig
from edge.step import init_state, train_step

IN_SHAPES = {"cifar10": (3, 32, 32), "mnist": (1, 28, 28), "digits": (1, 8, 8)}


def _bytes(tensors) -> int:
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def largest_inner(block, i: int, shape: tuple[int, ...]) -> int:
    """Elements of the largest map inside block i (any primitive's output), per sample."""
    chains = block.chains(i)
    best = 0
    for part in ("body", "shortcut"):
        s = shape
        for _, p in chains.get(part, []):
            s = p.out_shape(s)
            best = max(best, math.prod(s))
    return best


def floor_bytes(net: NetSpec, batch: int, persistent: int) -> int:
    largest = 0
    for i, (block, shape) in enumerate(zip(net.blocks, net.block_inputs(), strict=True)):
        largest = max(largest, 2 * batch * 4 * (math.prod(shape) + largest_inner(block, i,
                                                                                  shape)))
    return persistent + largest


def build_net(net_name: str, in_shape: tuple[int, ...], width: float, rule_name: str,
              seed: int = 0):
    """(net, rule, params) exactly as `edge train` builds them (BatchNorm folded)."""
    cfg = TrainConfig(rule=rule_name, net=net_name, width=width, seed=seed)
    return build(cfg, in_shape)


def setup(net: NetSpec, rule_name: str, batch: int, seed: int = 0):
    """A rule's initial parameters, AdamW state and two random views: what one step takes.
    `net` is a preset as built by `edge.nets.preset` (BatchNorm is folded here)."""
    from edge import rules
    from edge.nets import fold_batchnorm

    rule = rules.get(rule_name)
    gen = torch.Generator().manual_seed(seed)
    params = net.init_params(gen)
    net2, params = fold_batchnorm(net, params)
    if net2 != net:
        raise ValueError("setup() takes a network without BatchNorm; use measure_preset")
    rule.check(net)
    params.update(rule.init(net, gen))
    opt = OptimConfig("adamw", lr=1e-3)
    x1 = torch.randn(batch, *net.in_shape, generator=gen)
    x2 = torch.randn(batch, *net.in_shape, generator=gen)
    return rule, opt, params, init_state(net, rule, opt, params), x1, x2


def measure_built(net: NetSpec, rule, params: dict, batch: int, seed: int = 0) -> dict:
    """MemTracker peak of one AdamW step of `rule` on `net` from `params` (see the module
    docstring)."""
    opt = OptimConfig("adamw", lr=1e-3)
    state = init_state(net, rule, opt, params)
    gen = torch.Generator().manual_seed(seed + 1)
    x1 = torch.randn(batch, *net.in_shape, generator=gen)
    x2 = torch.randn(batch, *net.in_shape, generator=gen)
    params, state, _ = train_step(net, rule, opt, params, state, x1, x2)  # warm-up
    given = _bytes([*params.values(), *state.values(), x1, x2])
    persistent = _bytes([*params.values(), *state.values()])
    tracker = MemTracker()
    tracker.track_external(*params.values(), *state.values(), x1, x2)
    with tracker:
        train_step(net, rule, opt, params, state, x1, x2, donate=True)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return {
        "rule": rule.name,
        "batch": batch,
        "peak_bytes": peak,
        "transient_bytes": peak - given,
        "persistent_bytes": persistent,
        "floor_bytes": floor_bytes(net, batch, persistent),
    }


def measure_preset(net_name: str, in_shape: tuple[int, ...], width: float, rule_name: str,
                   batch: int, seed: int = 0) -> dict:
    net, rule, params = build_net(net_name, in_shape, width, rule_name, seed)
    return measure_built(net, rule, params, batch, seed)


def measure(net: NetSpec, rule_name: str, batch: int, seed: int = 0) -> dict:
    """One rule's step on a BatchNorm-free `net` (e.g. `preset("vgg6", ...)`)."""
    rule, _, params, _, _, _ = setup(net, rule_name, batch, seed)
    return measure_built(net, rule, params, batch, seed)


def run(rules: list[str], batch: int = 32, width: float = 0.125, net_name: str = "vgg6",
        in_shape: tuple[int, ...] = (3, 32, 32)) -> dict:
    rows = [measure_preset(net_name, in_shape, width, r, batch) for r in rules]
    net, _, _ = build_net(net_name, in_shape, width, rules[0])
    return {"net": net.to_dict(), "width": width, "batch": batch, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="vgg6")
    ap.add_argument("--data", default="cifar10", choices=sorted(IN_SHAPES),
                    help="input shape only")
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rules", default="clapp++,bp-infonce,bp-clapp++")
    a = ap.parse_args(argv)
    res = run(a.rules.split(","), a.batch, a.width, a.net, IN_SHAPES[a.data])
    rows = {r["rule"]: r for r in res["rows"]}
    if "clapp++" in rows and "bp-infonce" in rows:
        res["local_vs_backprop"] = rows["clapp++"]["peak_bytes"] / rows["bp-infonce"][
            "peak_bytes"]
        res["local_vs_floor"] = rows["clapp++"]["peak_bytes"] / rows["clapp++"]["floor_bytes"]
    print(json.dumps({k: v for k, v in res.items() if k != "net"}, indent=1))


if __name__ == "__main__":
    main()
