"""Step speed: every local rule against backprop in torch, the step's arithmetic against
what this machine's kernels achieve, and the exported step in onnxruntime against torch.

Three sections, one run, same network, batch and threads:

1. Local vs backprop (torch eager). Every rule's step and BP-InfoNCE's, interleaved (rule a,
   rule b, ..., the order rotating each repeat, so machine noise hits all alike); each repeat
   times `steps` consecutive steps after a warm-up. Figures: median, min and max samples/s
   over the repeats, and each rule's per-repeat ratio to backprop (median, min, max).
2. Arithmetic. The step's multiply-adds counted from the network (`Primitive.macs` of every
   conv and linear at its input shape, times the rows the step runs): forward, weight
   gradient and input gradient, where a local step needs an input gradient only inside a
   block (after a trainable primitive of the same chain) and backprop everywhere but the
   first layer; rules with a top-block context add one forward of both views; the rules'
   predictors are not counted. The machine rate: each of those layers' forward, weight
   gradient and input gradient timed alone with aten's kernels at the step's rows and layout
   (what the eager step calls), and a square fp32 GEMM. A step's "kernel time" is the sum of
   its layers' isolated kernel times; achieved GFLOP/s = 2 MACs / step time, and the
   fraction of the machine's rate = kernel time / step time (the rest is everything that is
   not a conv or linear kernel: pooling, routing, the rule, the optimizer, dispatch).
3. Exported step: `benchmarks.export_speed` (the CLAPP++ step through
   `export.runner.OnnxStepper` against torch eager, interleaved).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.speed [--width 0.125 --batch 32
        --repeats 11 --steps 3 --export-repeats 7] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.export_speed import _rate, _spread
from benchmarks.memory import setup
from edge.layers.conv import Conv
from edge.layers.linear import Linear
from edge.nets import NetSpec, preset
from edge.step import train_step

LOCAL_RULES = ("clapp", "clapp++", "clapp++dfb", "clapp++both", "ff")
BP = "bp-infonce"


def _stepper(net: NetSpec, rule_name: str, batch: int, seed: int = 0):
    rule, opt, params, state, x1, x2 = setup(net, rule_name, batch, seed)
    box = {"p": params, "s": state}

    def step() -> None:
        box["p"], box["s"], _ = train_step(net, rule, opt, box["p"], box["s"], x1, x2,
                                           donate=True)

    return step, rule


def weighted_layers(net: NetSpec) -> list[dict]:
    """Every conv / linear of the net: (block, primitive, input shape, forward MACs per
    sample, whether a local step needs its input gradient)."""
    out = []
    for i, (block, shape) in enumerate(zip(net.blocks, net.block_inputs(), strict=True)):
        for part, chain in block.chains(i).items():
            s = shape if part != "post" else block._through(block.body, shape, "layer")
            for j, (key, prim) in enumerate(chain):
                if isinstance(prim, Conv | Linear):
                    inner = any(p.trainable for _, p in chain[:j])
                    out.append({"key": key, "prim": prim, "shape": s, "macs": prim.macs(s),
                                "local_gx": inner})
                s = prim.out_shape(s)
    return out


def step_kernels(net: NetSpec, rule: Any, batch: int) -> list[dict[str, int]]:
    """Per weighted layer (in `weighted_layers` order): the rows each kernel kind runs over
    in one step of `rule` (module docstring, section 2)."""
    layers = weighted_layers(net)
    out = []
    for lay in layers:
        if not rule.is_local:  # both views; every input gradient but the first layer's
            rows = 2 * batch
            out.append({"forward": rows, "weight_grad": rows,
                        "input_grad": rows if lay is not layers[0] else 0})
            continue
        rows = rule.streams * batch
        context = 2 * batch if getattr(rule, "needs_top", False) else 0
        out.append({"forward": rows + context, "weight_grad": rows,
                    "input_grad": rows if lay["local_gx"] else 0})
    return out


def step_macs(net: NetSpec, rule: Any, batch: int) -> dict[str, int]:
    """Multiply-adds of one step of `rule`, per kernel kind."""
    per = zip(weighted_layers(net), step_kernels(net, rule, batch), strict=True)
    total = {"forward": 0, "weight_grad": 0, "input_grad": 0}
    for lay, rows in per:
        for k, r in rows.items():
            total[k] += r * lay["macs"]
    return total


def _time(f, reps: int) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t0) / reps


def kernel_rates(net: NetSpec, rows: int, reps: int = 5) -> dict[str, dict]:
    """Each weighted layer's forward, weight-gradient and input-gradient kernel timed alone
    at `rows` rows (aten, the eager step's layouts): seconds per call, and the machine's
    rate over the whole net per kind."""
    per_layer = []
    gen = torch.Generator().manual_seed(0)
    for lay in weighted_layers(net):
        prim, shape = lay["prim"], lay["shape"]
        x = torch.randn(rows, *shape, generator=gen)
        w = torch.randn(*prim.param_shapes()["w"], generator=gen)
        b = torch.zeros(prim.param_shapes()["b"])
        if isinstance(prim, Conv):
            x = x.contiguous(memory_format=prim._layout)
            y = F.conv2d(x, w, b, prim.stride, prim.padding, 1, prim.groups)
            g = torch.randn(y.shape, generator=gen).contiguous(memory_format=prim._layout)

            def back(mask, x=x, w=w, g=g, prim=prim):
                return torch.ops.aten.convolution_backward(
                    g, x, w, [prim.cout], list(prim.stride), list(prim.padding), [1, 1],
                    False, [0, 0], prim.groups, mask)

            kinds = {"forward": lambda x=x, w=w, b=b, p=prim: F.conv2d(
                         x, w, b, p.stride, p.padding, 1, p.groups),
                     "weight_grad": lambda back=back: back([False, True, True]),
                     "input_grad": lambda back=back: back([True, False, False])}
        else:
            x = x.flatten(1)
            g = torch.randn(rows, w.shape[0], generator=gen)
            kinds = {"forward": lambda x=x, w=w, b=b: F.linear(x, w, b),
                     "weight_grad": lambda x=x, g=g: (g.t() @ x, g.sum(0)),
                     "input_grad": lambda w=w, g=g: g @ w}
        per_layer.append({"key": lay["key"], "macs": rows * lay["macs"],
                          **{k: _time(f, reps) for k, f in kinds.items()}})
    total = {k: sum(p[k] for p in per_layer) for k in ("forward", "weight_grad", "input_grad")}
    macs = sum(p["macs"] for p in per_layer)
    return {"layers": per_layer, "seconds": total,
            "gflops": {k: 2 * macs / t / 1e9 for k, t in total.items()}}


def gemm_gflops(n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _time(lambda: a @ b, reps) / 1e9


def kernel_seconds(net: NetSpec, rule: Any, batch: int, kernels: dict, rows: int) -> float:
    """The step's conv/linear kernels alone: each layer's isolated times (measured at `rows`
    rows), scaled to the rows the step runs them over."""
    per = zip(kernels["layers"], step_kernels(net, rule, batch), strict=True)
    return sum(k[kind] * r / rows for k, step in per for kind, r in step.items())


def run(width: float = 0.125, batch: int = 32, rules: tuple[str, ...] = LOCAL_RULES,
        repeats: int = 11, steps: int = 3, threads: int = 2, export_repeats: int = 7) -> dict:
    torch.set_num_threads(threads)
    net = preset("vgg6", (3, 32, 32), width)
    names = [*rules, BP]
    steppers, rule_objs = {}, {}
    for name in names:
        steppers[name], rule_objs[name] = _stepper(net, name, batch)
    for s in steppers.values():
        s()  # warm-up
    load0 = os.getloadavg()[0]
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each goes first in turn
            rates[name].append(batch * _rate(steppers[name], steps))
    load1 = os.getloadavg()[0]
    kernels = kernel_rates(net, 2 * batch)
    gemm = gemm_gflops()
    out: dict[str, Any] = {
        "net": f"vgg6 x{width}", "batch": batch, "threads": threads, "repeats": repeats,
        "steps_per_repeat": steps,
        "samples_per_s": {k: _spread(v, 1) for k, v in rates.items()},
        "ratio_vs_bp": {k: _spread([a / b for a, b in zip(rates[k], rates[BP], strict=True)], 3)
                        for k in rules},
        "machine": {"gemm_1024_gflops": round(gemm, 1),
                    "conv_gflops": {k: round(v, 1) for k, v in kernels["gflops"].items()},
                    "layers": [{k: (round(v * 1e3, 3) if k not in ("key", "macs") else v)
                                for k, v in lay.items()} for lay in kernels["layers"]],
                    "layer_times": "ms per call at 2 x batch rows"},
        "arithmetic": {},
    }
    for name in names:
        macs = step_macs(net, rule_objs[name], batch)
        t = batch / statistics.median(rates[name])
        kt = kernel_seconds(net, rule_objs[name], batch, kernels, 2 * batch)
        out["arithmetic"][name] = {
            "macs": macs, "total_macs": sum(macs.values()),
            "step_ms": round(t * 1e3, 2), "kernel_ms": round(kt * 1e3, 2),
            "achieved_gflops": round(2 * sum(macs.values()) / t / 1e9, 1),
            "fraction_of_machine_conv_rate": round(kt / t, 3),
            "fraction_of_gemm_rate": round(2 * sum(macs.values()) / t / 1e9 / gemm, 3),
        }
    if export_repeats:
        from benchmarks.export_speed import run as export_run

        out["exported"] = export_run("vgg6", width, batch, export_repeats, steps, threads)
    return out | {"loadavg_1min": [round(load0, 2), round(load1, 2),
                                   round(os.getloadavg()[0], 2)],
                  "cpus": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                  "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rules", default=",".join(LOCAL_RULES))
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--export-repeats", type=int, default=7, help="0: skip the exported step")
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    a = ap.parse_args()
    res = run(a.width, a.batch, tuple(r for r in a.rules.split(",") if r), a.repeats, a.steps,
              a.threads, a.export_repeats)
    text = json.dumps(res, indent=1)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"speed_vgg6_x{a.width}_b{a.batch}.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
