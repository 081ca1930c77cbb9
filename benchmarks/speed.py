"""Samples per second of a local training step against a backprop step, in torch eager.

Both steps run on the same network, batch and threads, interleaved (local, bp, local, bp,
...) so machine noise hits both alike; each repeat times `steps` consecutive steps after a
warm-up. The figure is the ratio of medians, with the spread over repeats.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.memory import setup
from edge.nets import NetSpec, preset
from edge.step import train_step


def _stepper(net: NetSpec, rule_name: str, batch: int, seed: int = 0):
    rule, opt, params, state, x1, x2 = setup(net, rule_name, batch, seed)
    box = {"p": params, "s": state}

    def step() -> None:
        box["p"], box["s"], _ = train_step(net, rule, opt, box["p"], box["s"], x1, x2, donate=True)

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
) -> dict:
    torch.set_num_threads(threads)
    net = preset("vgg6", (3, 32, 32), width)
    steppers = {local: _stepper(net, local, batch), bp: _stepper(net, bp, batch)}
    for s in steppers.values():
        s()  # warm-up
    rates: dict[str, list[float]] = {local: [], bp: []}
    for _ in range(repeats):
        for name, s in steppers.items():
            rates[name].append(samples_per_second(s, batch, steps))
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
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(repeats=3), indent=1))
