"""Moonshot: the smallest SRAM in which a CLAPP++ conv net trains all its layers on device.

    python benchmarks/moonshot.py [--quick] -> benchmarks/results/moonshot/{results.json,
                                                                        results.md}

Setting: int8-w16 integer mode (int8 weights read from int16 stores, int32 biases and
accumulators, stochastic rounding from explicit random bits), every layer trained in one step,
batch 1 (as asked) and batch 2 (the smallest batch with an in-batch negative: CLAPP++ pairs
image i with image i+1, so at batch 1 a device must keep a past code as its negative; the
memory of the step's ops is what is simulated here).

Graph (a real graph of the step, never a formula), first that works:
  1. the exported integer ONNX training step (`export.integer.integer_program`, the graph a
     device would run with onnxruntime), batch >= 2 via `training_step`, batch 1 via the
     exporter's `export_function` directly (training_step refuses batch 1);
  2. else `quant.integer.integer_step` itself traced with make_fx (`edge.sim.backprop`
     converts the FX graph): the same function the training loop runs, op by op, at the dtypes
     it computes in: int64 working width for the integer arithmetic, float64 for the host's
     exact 8-bit convolutions (in ONNX those are ConvInteger, int8 x int8 -> int32).
`source` in the results says which one and why.

Smallest SRAM: the simulator's peak (arena + every persistent tensor in SRAM; the step writes
every store, so none can stay in flash) on a device with one large SRAM, checked by simulating
an SRAM of exactly that size (fits) and 16 bytes less (does not). Also: which catalog devices
fit, and a what-if with the random bits drawn on chip (noise inputs at 0 bytes).

Accuracy: `edge train --quant int8-w16 --mode integer` on MNIST (first 10,000 training
images, 3 epochs, batch 2), linear probe on all layers beside the same net untrained.
Reference: Lin et al., On-Device Training Under 256KB Memory (NeurIPS 2022): 256 KB SRAM and
1 MB flash to fine-tune a sparse subset of layers of an int8 MCUNet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results" / "moonshot"
MIT_SRAM = 256 * 1024
TRAIN = {"subset": 10000, "epochs": 3, "batch": 2}


def build(net_name: str, width: float, batch: int, data_dir: str | None, rank: int = 64,
          seed: int = 0):
    """Net, rule, integer plan (calibrated on real MNIST views) and one step's inputs."""
    from edge.data import default_views, load, two_views
    from edge.nets import init_params, preset
    from edge.rules.clapp_pp import ClappPP
    from quant import calibrate as qc
    from quant.integer import make_noise

    net = preset(net_name, (1, 28, 28), width)
    rule = ClappPP(rank=rank)
    rule.check(net)
    gen = torch.Generator().manual_seed(seed)
    params = init_params(net, gen)
    params.update(rule.init(net, gen))
    ds = load("mnist", data_dir)
    views = [two_views(ds.x_train[s * 16:(s + 1) * 16], gen, default_views("mnist"), ds.mean,
                       ds.std) for s in range(8)]
    plan, q = qc.make_plan(net, rule, params, views, quant="int8-w16")
    plan = dataclasses.replace(plan, batch=batch)  # calibrated on 16 images, run at `batch`
    noise = make_noise(plan, q, gen)
    x1, x2 = (qc.quantize_input(v[:batch], plan.f_in) for v in views[0])
    return net, rule, plan, q, noise, x1, x2


def exported(net, rule, plan, q, batch: int):
    """(ModelProto, manifest view) of the exported integer step, or raise EdgeError."""
    from edge.optim import OptimConfig
    from export.integer import integer_program, integer_state
    from export.manifest import NEW_PARAMS, NEW_STATE, NOISE, PARAMS, STATE
    from export.trace import export_function
    from export.training_step import example_inputs, step_function, training_step

    program, state = integer_program(net, rule, plan, q), integer_state()
    if batch >= 2:
        model, man = training_step(net, rule, OptimConfig("sgd", lr=1e-3), q, state, batch,
                                   program=program)
        return model, man.step.memory_view()
    inputs = example_inputs(net, q, state, batch, program)
    fn = step_function(program, list(q), list(state))
    with torch.no_grad():
        outputs = list(fn(dict(inputs)))
    model = export_function(fn, inputs, outputs)
    bindings = {NEW_PARAMS + k: PARAMS + k for k in q} | {NEW_STATE + "step": STATE + "step"}
    names = [i.name for i in model.graph.input]
    return model, {"bindings": bindings, "param_names": [PARAMS + k for k in q],
                   "state_names": [STATE + "step"],
                   "noise_names": [n for n in names if n.startswith(NOISE)]}


def traced(net, rule, plan, q, noise, x1, x2):
    """The integer step traced with make_fx: a Schedule (see the module docstring)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from edge.sim.backprop import fx_to_schedule
    from quant.integer import integer_step

    names, nnames = list(q), list(noise)

    def step(*a: torch.Tensor):
        p = dict(zip(names, a[: len(names)], strict=True))
        bits = dict(zip(nnames, a[len(names): len(names) + len(nnames)], strict=True))
        new, _ = integer_step(net, rule, plan, p, a[-2], a[-1], bits)
        return tuple(new[k] for k in names)

    gm = make_fx(step, tracing_mode="fake", _allow_non_fake_inputs=True)(
        *q.values(), *noise.values(), x1, x2)
    sched = fx_to_schedule(gm, params=range(len(names)), bindings={i: i for i in
                                                                   range(len(names))},
                           name=f"integer_step b{x1.shape[0]}")
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    noise_names = placeholders[len(names): len(names) + len(nnames)]
    return sched, noise_names


def flat_sram(nbytes: int):
    from targets import MemoryTier, Target

    return Target("sram-only", "one SRAM of the given size", (MemoryTier("sram", "sram", nbytes),),
                  ("int8", "int16", "int32"))


def without(schedule, names: list[str]):
    """The same schedule with the named tensors at 0 bytes (the what-if: bits drawn on chip)."""
    from edge.sim.schedule import Schedule

    tensors = {n: (dataclasses.replace(t, nbytes=0) if n in names else t)
               for n, t in schedule.tensors.items()}
    return Schedule(schedule.ops, tensors, schedule.bindings, schedule.outputs,
                    schedule.name + " (noise on chip)", schedule.notes)


def smallest_sram(graph, options) -> dict[str, Any]:
    """Peak on one big SRAM, checked at exactly that size (fits) and 16 B less (does not)."""
    from edge.sim.simulate import simulate

    r = simulate(graph, flat_sram(1 << 40), options)
    need = r.peak_bytes
    fits = simulate(graph, flat_sram(need), options).fits
    short = simulate(graph, flat_sram(need - 16), options).fits
    assert fits and not short, (need, fits, short)
    return {"sram_bytes": need, "arena_bytes": r.arena_bytes,
            "lower_bound_bytes": r.lower_bound_bytes,
            "persistent_bytes": r.persistent_onchip_bytes, "peak_op": dict(r.peak_op),
            "per_category": dict(r.per_category), "ops": len(r.timeline),
            "inplace_saved_bytes": r.inplace_saved_bytes}


def catalog_fit(graph, options) -> dict[str, bool]:
    import targets
    from edge.sim.simulate import simulate

    out = {}
    for t in targets.catalog():
        if any(tier.kind == "sram" for tier in t.tiers):
            out[t.name] = simulate(graph, t, options).fits
    return out


def memory(net_name: str, width: float, rank: int, batch: int, data_dir: str | None
           ) -> dict[str, Any]:
    from edge.errors import EdgeError
    from edge.sim.onnx_graph import GraphOptions, schedule_from_onnx
    from edge.sim.simulate import SimOptions

    net, rule, plan, q, noise, x1, x2 = build(net_name, width, batch, data_dir, rank)
    options = SimOptions(persistent="sram", inplace=True)
    try:
        model, man = exported(net, rule, plan, q, batch)
        extra = man.pop("noise_names", None)
        sched = schedule_from_onnx(model, GraphOptions.from_manifest(man))
        noise_names = extra or [n for n in sched.tensors if n.startswith("noise/")]
        source = {"kind": "exported integer ONNX step", "nodes": len(model.graph.node)}
    except EdgeError as e:  # integer conv export not there yet: trace the same function
        sched, noise_names = traced(net, rule, plan, q, noise, x1, x2)
        source = {"kind": "make_fx trace of quant.integer.integer_step",
                  "why": f"export failed: {' '.join(str(e).split())[:200]}"}
    dtype_bytes: dict[str, int] = {}
    for t in sched.tensors.values():
        dtype_bytes[t.dtype] = dtype_bytes.get(t.dtype, 0) + t.nbytes
    out = {"net": net_name, "width": width, "rank": rank,
           "channels": [ly.out_features for ly in net.layers],
           "batch": batch, "source": source, **smallest_sram(sched, options),
           "noise_bytes": sum(sched.tensors[n].nbytes for n in noise_names),
           "bytes_by_dtype": dtype_bytes, "catalog_fits": catalog_fit(sched, options)}
    out["noise_on_chip"] = smallest_sram(without(sched, noise_names), options)
    out["stores"] = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in q.items()}
    return out


def train(net_name: str, width: float, rank: int, data_dir: str | None, out: Path
          ) -> dict[str, Any]:
    """`edge train` in integer mode, probed (a subprocess: exactly what a user runs)."""
    cmd = [sys.executable, "-m", "edge", "train", "--rule", "clapp++", "--data", "mnist",
           "--net", net_name, "--width", str(width), "--quant", "int8-w16", "--mode", "integer",
           "--subset", str(TRAIN["subset"]), "--epochs", str(TRAIN["epochs"]),
           "--batch-size", str(TRAIN["batch"]), "--hp", f"rank={rank}", "--json",
           "--out", str(out)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if res.returncode:
        raise RuntimeError(f"edge train failed: {res.stderr.strip()[-400:]}")
    r = json.loads(res.stdout)
    return {"command": " ".join(cmd[1:]), "probe_accuracy": r["probe_accuracy"],
            "random_probe_accuracy": r["random_probe_accuracy"],
            "parameters": r["parameters"], "final_loss": r["final_loss"],
            "seconds": round(time.time() - t, 1)}


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def write_markdown(result: dict[str, Any], path: Path) -> None:
    lines = ["# Moonshot: smallest SRAM to train a CLAPP++ conv net on device",
             "", "Written by `python benchmarks/moonshot.py` (method: its docstring). MNIST, "
             "int8-w16 integer mode, all layers trained every step, AdamW-free integer update.",
             "", "| net (channels) | batch | graph | SRAM needed | arena | stores | random bits "
             "| SRAM, bits on chip | fits (catalog) |", "|---|---|---|---|---|---|---|---|---|"]
    for m in result["memory"]:
        fits = ", ".join(k for k, v in m["catalog_fits"].items() if v) or "none"
        lines.append(f"| {m['net']} x{m['width']} {m['channels']}, rank {m['rank']} "
                     f"| {m['batch']} "
                     f"| {m['source']['kind']} | {_kib(m['sram_bytes'])} "
                     f"| {_kib(m['arena_bytes'])} | {_kib(m['persistent_bytes'])} "
                     f"| {_kib(m['noise_bytes'])} | {_kib(m['noise_on_chip']['sram_bytes'])} "
                     f"| {fits} |")
    lines += ["", "| net | probe (all layers) | untrained net | training |", "|---|---|---|---|"]
    for a in result["accuracy"]:
        lines.append(f"| {a['net']} x{a['width']}, rank {a['rank']} "
                     f"| {100 * a['probe_accuracy']:.2f} % "
                     f"| {100 * a['random_probe_accuracy']:.2f} % | `{a['command']}` |")
    lines += ["", f"Reference: {MIT_SRAM // 1024} KB SRAM (Lin et al. 2022, fine-tuning a subset "
              "of layers). " + result["summary"]]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="memory only, no training")
    p.add_argument("--memory-only", action="store_true",
                   help="recompute memory; keep the accuracy of the results.json in --out")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--configs", nargs="+", default=["0.25:64", "0.125:64", "0.125:16"],
                   help="width:predictor-rank of the mnist conv net")
    a = p.parse_args(argv)
    t0 = time.time()
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=repo).stdout

    start = {"commit": git("rev-parse", "HEAD").strip(),
             "uncommitted": [ln for ln in git("status", "--porcelain", "quant", "export",
                                              "edge").splitlines() if ln]}
    configs = [(float(c.split(":")[0]), int(c.split(":")[1])) for c in a.configs]
    mem = [memory("mnist", w, r, b, a.data_dir) for w, r in configs for b in (1, 2)]
    for m in mem:
        print(f"mnist x{m['width']} rank {m['rank']} b{m['batch']}: {_kib(m['sram_bytes'])} "
              f"({m['source']['kind']}); bits on chip {_kib(m['noise_on_chip']['sram_bytes'])}",
              flush=True)
    acc, acc_from = [], start
    if a.memory_only:
        old = json.loads((a.out / "results.json").read_text())
        acc, acc_from = old["accuracy"], old.get("accuracy_from", old.get("start"))
    elif not a.quick:
        for w, r in configs:
            acc.append({"net": "mnist", "width": w, "rank": r,
                        **train("mnist", w, r, a.data_dir, a.out / "runs" / f"x{w}-r{r}")})
            print(f"mnist x{w} rank {r}: probe {acc[-1]['probe_accuracy']:.4f} vs untrained "
                  f"{acc[-1]['random_probe_accuracy']:.4f}", flush=True)
    best = min((m for m in mem if m["batch"] == 1), key=lambda m: m["sram_bytes"])
    summary = (f"Smallest here: mnist x{best['width']} {best['channels']}, predictor rank "
               f"{best['rank']}, "
               f"{_kib(best['sram_bytes'])} at batch 1 per the simulator "
               f"({best['sram_bytes'] / MIT_SRAM:.2f} x 256 KB), all layers trained.")
    result = {"memory": mem, "accuracy": acc, "train": TRAIN, "mit_sram_bytes": MIT_SRAM,
              "summary": summary, "start": start, "accuracy_from": acc_from,
              "seconds": round(time.time() - t0, 1)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, a.out / "results.md")
    print(summary)
    return result


if __name__ == "__main__":
    main()
