"""Samples per second of a local training step against a backprop step, in torch eager.

Both steps run on the same network, batch and threads, interleaved (local, bp, local, bp,
..., the order rotating each repeat) so machine noise hits both alike; each repeat times
`steps` consecutive steps after a warm-up. The figure is the median of the per-repeat ratios,
with their min and max.
`before=True` also times, in the same loop, the local step with the pooled layers' error map
built as before (a pooled-size temporary product per window offset; now masked in place
into the strided view, see `edge.nets.layer_backward`), so the change is measured side by
side.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.speed [--before --repeats 5]
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

import edge.nets as nets
from benchmarks.memory import setup
from edge.nets import NetSpec, preset
from edge.step import train_step


@contextlib.contextmanager
def _full_error_weight_gradient():
    """Pooled layers build the error map from temporary products (the code before the
    in-place masking)."""
    import sys

    original = nets.layer_backward

    def legacy(layer, out, gy):
        if out.pool_off is None:
            return original(layer, out, gy)
        e = gy * (out.y > 0).to(gy.dtype)
        n, c, hp, wp = e.shape
        full = e.new_zeros(n, c, out.x.shape[2], out.x.shape[3])
        for k in range(4):
            dy, dx = divmod(k, 2)
            full[:, :, dy : 2 * hp : 2, dx : 2 * wp : 2] = e * (out.pool_off == k)
        shape = (layer.out_features, layer.in_features, 3, 3)
        return torch.nn.grad.conv2d_weight(out.x, shape, full, padding=1), e.sum((0, 2, 3))

    modules = [m for m in list(sys.modules.values())
               if getattr(m, "layer_backward", None) is original]  # the rules' imports
    for m in modules:
        m.layer_backward = legacy
    try:
        yield
    finally:
        for m in modules:
            m.layer_backward = original


def _stepper(net: NetSpec, rule_name: str, batch: int, seed: int = 0, legacy: bool = False):
    rule, opt, params, state, x1, x2 = setup(net, rule_name, batch, seed)
    box = {"p": params, "s": state}

    def step() -> None:
        with _full_error_weight_gradient() if legacy else contextlib.nullcontext():
            box["p"], box["s"], _ = train_step(net, rule, opt, box["p"], box["s"], x1, x2,
                                               donate=True)

    return step


def samples_per_second(step, batch: int, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def run(
    local: str = "clapp++",
    bp: str = "bp-infonce",
    batch: int = 32,
    width: float = 0.125,
    repeats: int = 5,
    steps: int = 5,
    threads: int = 2,
    before: bool = False,
) -> dict:
    torch.set_num_threads(threads)
    net = preset("vgg6", (3, 32, 32), width)
    steppers = {local: _stepper(net, local, batch), bp: _stepper(net, bp, batch)}
    if before:
        steppers[f"{local} (before)"] = _stepper(net, local, batch, legacy=True)
    for s in steppers.values():
        s()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each goes first in turn
            rates[name].append(samples_per_second(steppers[name], batch, steps))

    def spread(v: list[float]) -> dict:
        return {"median": statistics.median(v), "min": min(v), "max": max(v)}

    def ratio(a: str, b: str) -> dict:
        return spread([x / y for x, y in zip(rates[a], rates[b], strict=True)])

    extra = {}
    if before:
        extra = {"ratio_local_before_vs_bp": ratio(f"{local} (before)", bp),
                 "ratio_local_vs_before": ratio(local, f"{local} (before)")}
    ratios = [a / b for a, b in zip(rates[local], rates[bp], strict=True)]
    return {
        "net": f"vgg6 x{width}",
        "batch": batch,
        "threads": threads,
        "repeats": repeats,
        "samples_per_s": {
            k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for k, v in rates.items()
        },
        "ratio_local_vs_bp": {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        },
    } | extra


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--before", action="store_true", help="also time the previous formulation")
    a = ap.parse_args()
    print(json.dumps(run(batch=a.batch, width=a.width, repeats=a.repeats, steps=a.steps,
                         before=a.before), indent=1))
