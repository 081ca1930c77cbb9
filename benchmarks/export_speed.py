"""Steps per second of the exported training step (onnxruntime) against torch eager.

Both run the same step (same net, rule, optimizer, batch, views) with the same number of
threads, interleaved (torch, onnxruntime, torch, onnxruntime, ..., the order rotating each
repeat) so machine noise hits both alike; each repeat times `steps` consecutive steps after a
warm-up. The onnxruntime figure is
end to end through `export.runner.OnnxStepper` (torch tensors in and out, what
`edge train --runtime onnxruntime` would call): the exported graph after
`export.passes.onnxruntime_speed`, idle threads sleeping. `--before` also times, in the same
loop, the graph as exported in a plain session with onnxruntime's default spinning threads
(the runner before those two changes), so the gain is measured side by side. Prints one JSON
line: per-runtime median, min and max steps/s over the repeats, the per-repeat ratios'
median, min and max, and the load average while it ran (on a shared machine, read the
spread before the median).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/export_speed.py [--net digits --width 0.25
        --batch 16 --repeats 5 --steps 20 --before]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from edge.nets import preset
from edge.optim import OptimConfig
from edge.rules import get
from edge.step import train_step
from export.manifest import PARAMS, STATE
from export.runner import OnnxStepper
from export.step import fp32_program, step_graph

IN_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "vgg6": (3, 32, 32), "mlp": (1, 8, 8)}


def _rate(step, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t0)


def _plain_session_step(model, io, threads: int, x1, x2):
    """The step in a session as the runner made it before: the graph as exported, intra-op
    threads spinning (onnxruntime's default); torch tensors in and out like OnnxStepper."""
    import numpy as np
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    sess = onnxruntime.InferenceSession(model.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    views = {"x1": x1.numpy(), "x2": x2.numpy()}

    def step(p, s):
        feeds = {PARAMS + k: v.numpy() for k, v in p.items()}
        feeds.update({STATE + k: v.numpy() for k, v in s.items()})
        res = dict(zip(outs, sess.run(outs, {**feeds, **views}), strict=True))
        new = {inp: res[o] for o, inp in io.bindings}
        return ({k: torch.from_numpy(np.asarray(new[PARAMS + k])) for k in p},
                {k: torch.from_numpy(np.asarray(new[STATE + k])) for k in s}, {})

    return step


def _spread(v: list[float], digits: int) -> dict:
    return {"median": round(statistics.median(v), digits), "min": round(min(v), digits),
            "max": round(max(v), digits)}


def run(net_name: str = "digits", width: float = 0.25, batch: int = 16, repeats: int = 5,
        steps: int = 20, threads: int = 2, openvino: bool = False,
        before: bool = False) -> dict:
    torch.set_num_threads(threads)
    net = preset(net_name, IN_SHAPES[net_name], width)
    rule = get("clapp++")
    rule.check(net)
    gen = torch.Generator().manual_seed(0)
    from edge.nets import fold_batchnorm
    from edge.step import init_state

    net, params = fold_batchnorm(net, net.init_params(gen))
    params.update(rule.init(net, gen))
    opt = OptimConfig("adamw", lr=1e-3)
    state = init_state(net, rule, opt, params)
    x1 = torch.randn(batch, *net.in_shape, generator=gen)
    x2 = torch.randn(batch, *net.in_shape, generator=gen)
    model, manifest = step_graph(net, rule, fp32_program(net, rule, opt), params, state, batch)
    runtimes = {"torch": lambda p, s: train_step(net, rule, opt, p, s, x1, x2)}
    stepper = OnnxStepper.from_graphs(net, rule, opt, [model], [manifest.step], threads=threads)
    runtimes["onnxruntime"] = lambda p, s: stepper(p, s, x1, x2)
    if before:
        runtimes["onnxruntime_before"] = _plain_session_step(model, manifest.step, threads,
                                                             x1, x2)
    if openvino:
        ov = OnnxStepper.from_graphs(net, rule, opt, [model], [manifest.step], threads=threads,
                                     runtime="openvino")
        runtimes["openvino"] = lambda p, s: ov(p, s, x1, x2)
    boxes = {name: {"p": dict(params), "s": dict(state)} for name in runtimes}

    def stepping(name: str):
        def step() -> None:
            box = boxes[name]
            box["p"], box["s"], _ = runtimes[name](box["p"], box["s"])
        return step

    steppers = {name: stepping(name) for name in runtimes}
    for s in steppers.values():
        for _ in range(3):
            s()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in runtimes}
    load0 = os.getloadavg()[0]
    names = list(steppers)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each goes first in turn
            rates[name].append(_rate(steppers[name], steps))

    def ratio(name: str) -> dict:
        return _spread([o / t for o, t in zip(rates[name], rates["torch"], strict=True)], 2)

    out = {
        "net": f"{net_name} x{width}", "batch": batch, "threads": threads, "repeats": repeats,
        "steps_per_repeat": steps,
        "steps_per_s": {k: _spread(v, 1) for k, v in rates.items()},
        "ratio_onnxruntime_vs_torch": ratio("onnxruntime"),
    }
    if before:
        out["ratio_onnxruntime_before_vs_torch"] = ratio("onnxruntime_before")
        out["ratio_onnxruntime_vs_before"] = _spread(
            [a / b for a, b in zip(rates["onnxruntime"], rates["onnxruntime_before"],
                                   strict=True)], 2)
    return out | {
        "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="digits", choices=sorted(IN_SHAPES))
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--openvino", action="store_true", help="also time OpenVINO (if installed)")
    ap.add_argument("--before", action="store_true",
                    help="also time the plain graph in a default (spinning) session")
    a = ap.parse_args()
    print(json.dumps(run(a.net, a.width, a.batch, a.repeats, a.steps, a.threads, a.openvino,
                         a.before)))


if __name__ == "__main__":
    main()
