"""`python -m benchmarks PROFILE`: the paper's question, answered side by side on this machine.

Profiles (each writes benchmarks/results/PROFILE/{results.json, results.md, *.png}):
  quick  CIFAR-10, best local rule (CLAPP++) vs BP-InfoNCE vs the random encoder, 2 seeds,
         plus memory, speed, the exported step's speed and quantization; about 45 min on
         2 CPU cores
  rules  every rule at the quick budget (hours; resumable: rerun the same command)
  full   the paper's scale (VGG-6 at full width, 100 epochs) for a GPU: --device cuda

Runs are cached per run directory, so an interrupted profile resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks import accuracy, memory, speed
from edge.data import load
from edge.nets import encode, preset
from edge.app.train import TrainConfig

# the quantization comparison: a CIFAR-10 subset at the accuracy section's width
QUANT_CIFAR = dict(data="cifar10", net="vgg6", width=0.0625, subset=10000, epochs=2, batch_size=32)
LOCAL = ["clapp", "clapp++", "clapp++dfb", "clapp++both", "ff"]
CIFAR = dict(data="cifar10", net="vgg6")
PROFILES = {
    "quick": dict(
        CIFAR,
        rules=["clapp++", "bp-infonce"],
        seeds=[0, 1],
        width=0.0625,
        epochs=2,
        subset=None,
        quant=QUANT_CIFAR,
        alignment_every=20,
    ),
    "rules": dict(
        CIFAR,
        rules=LOCAL + ["bp-infonce", "bp-clapp++"],
        seeds=[0, 1],
        width=0.0625,
        epochs=2,
        subset=None,
        quant=QUANT_CIFAR,
        alignment_every=20,
    ),
    "full": dict(
        CIFAR,
        rules=LOCAL + ["bp-infonce", "bp-clapp++"],
        seeds=[0, 1],
        width=1.0,
        epochs=100,
        subset=None,
        quant=dict(data="cifar10", net="vgg6", width=1.0, subset=None, epochs=5,
                   batch_size=64),
        alignment_every=100,
    ),
    # exercises every section in a minute or two; its numbers mean nothing
    "smoke": dict(
        data="digits",
        net="digits",
        rules=["clapp++", "bp-infonce"],
        seeds=[0],
        width=0.25,
        epochs=1,
        subset=512,
        quant=dict(data="digits", net="digits", width=0.25, subset=512, epochs=1,
                   batch_size=32),
        alignment_every=2,
    ),
}


def machine() -> dict:
    import onnxruntime

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def quant_section(data_dir: str | None, q: dict) -> dict:
    """fp32 CLAPP++ against int8-w16 integer mode, same images, views and epochs, each at its
    own default rate (benchmarks/quant_accuracy.py; int8 and qat are in its own results)."""
    from benchmarks import quant_accuracy as qa
    from edge import rules
    from quant.engine import integer_default_lr

    args = argparse.Namespace(
        **q,
        lr=rules.default_lr("clapp++"),
        integer_lr=integer_default_lr("clapp++"),
        rule="clapp++",
        seed=0,
        calib_batches=4,
    )
    ds = load(q["data"], data_dir, q["subset"])
    net = preset(q["net"], ds.in_shape, q["width"])
    rule = rules.get("clapp++")
    rule.check(net)
    init = qa.initial_params(qa._cfg(args), net, rule)
    out = {
        **q,
        "random_probe": qa.probe(lambda x: encode(net, init, x), ds),
        "runs": {},
    }
    for config in ("fp32", "int8-w16"):
        out["runs"][config] = qa.run(config, args, ds, net, rule)
    return out


def simulated_step_bytes(width: float, batch: int, rule_name: str = "clapp++") -> dict:
    """The simulator's peak for a local rule's exported fp32 step (in-place bindings)."""
    from edge.sim.onnx_graph import GraphOptions
    from edge.sim.simulate import SimOptions, simulate
    from edge.nets import init_params, preset
    from edge.optim import OptimConfig
    from edge.rules import get
    from export.training_step import training_step

    net = preset("vgg6", (3, 32, 32), width)
    rule = get(rule_name)
    rule.check(net)
    gen = torch.Generator().manual_seed(0)
    params = init_params(net, gen)
    params.update(rule.init(net, gen))
    opt = OptimConfig("adamw", lr=1e-3)
    model, manifest = training_step(net, rule, opt, params, opt.init_state(params), batch)
    opts = SimOptions(graph=GraphOptions.from_manifest(manifest.step.memory_view()))
    report = simulate(model, "host", opts)
    return {
        "peak_bytes": report.peak_bytes,
        "arena_bytes": report.arena_bytes,
        "lower_bound_bytes": report.lower_bound_bytes,
    }


def headline(acc: dict, mem: dict | None, spd: dict | None, ort: dict | None,
             quant: dict | None) -> dict:
    """The run's figures against the goals; a skipped section's figures are None."""
    summary = acc["summary"]
    local = {k: v for k, v in summary.items() if k not in ("bp-infonce", "bp-clapp++", "random")}
    best = max(local, key=lambda k: local[k]["all"]["mean"])
    h = {
        "best_local_rule": best,
        "accuracy_ratio": local[best]["all"]["mean"] / summary["bp-infonce"]["all"]["mean"],
        "accuracy_ratio_last_layer": local[best]["last"]["mean"]
        / summary["bp-infonce"]["last"]["mean"],
        "memory_ratio": None,
        "memory_floor_ratio": None,
        "speed_ratio_local_vs_bp": spd["ratio_local_vs_bp"]["median"] if spd else None,
        "speed_ratio_onnxruntime_vs_torch":
            ort["ratio_onnxruntime_vs_torch"]["median"] if ort else None,
        "quant_gap_points": None,
    }
    if mem:
        rows = {r["rule"]: r for r in mem["rows"]}
        h["memory_ratio"] = rows["clapp++"]["peak_bytes"] / rows["bp-infonce"]["peak_bytes"]
        h["memory_floor_ratio"] = rows["clapp++"]["peak_bytes"] / rows["clapp++"]["floor_bytes"]
    if quant:
        r = quant["runs"]
        # quant_accuracy reports probe accuracy in percent already
        h["quant_gap_points"] = r["fp32"]["probe"]["all"] - r["int8-w16"]["probe"]["all"]
    return h


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="edge benchmarks")
    ap.add_argument("profile", choices=sorted(PROFILES))
    ap.add_argument("--data-dir", default=None, help="data root (else $EDGE_DATA, ../shared/data)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="results dir (default benchmarks/results/PROFILE)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip")
    ap.add_argument("--fresh", action="store_true", help="ignore sections already measured")
    a = ap.parse_args(argv)
    torch.set_num_threads(
        min(2, os.cpu_count() or 1) if a.device == "cpu" else torch.get_num_threads()
    )
    p = PROFILES[a.profile]
    out = Path(a.out or Path(__file__).parent / "results" / a.profile)
    runs = out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, a.skip.split(",")))
    base = TrainConfig(
        data=p["data"],
        net=p["net"],
        width=p["width"],
        epochs=p["epochs"],
        batch_size=64,
        subset=p["subset"],
        device=a.device,
    )
    res: dict = {"profile": a.profile, "machine": machine(), "sections": {}}
    previous = out / "results.json"
    if previous.exists() and not a.fresh:  # resume: keep the sections already measured
        old = json.loads(previous.read_text())
        if old.get("profile") == a.profile:
            res["sections"] = old.get("sections", {})
    t0 = time.perf_counter()

    def section(name: str, fn):
        if name in skip:
            return None
        if name in res["sections"]:
            return res["sections"][name]
        print(f"[{time.perf_counter() - t0:7.0f} s] {name} ...", file=sys.stderr, flush=True)
        res["sections"][name] = fn()
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        return res["sections"][name]

    acc = section("accuracy", lambda: accuracy.run(
        p["rules"], p["seeds"], base, runs, a.data_dir, alignment_every=p["alignment_every"]))
    small = a.profile == "smoke"
    w = 0.03125 if small else 0.125
    # every rule of the profile, plus clapp++ and both backprop baselines (the headline's
    # memory ratios are clapp++ against bp-infonce); the simulator's figure for each local
    # rule's exported step
    mem_rules = list(dict.fromkeys([*p["rules"], "clapp++", "bp-infonce", "bp-clapp++"]))
    mem = section(
        "memory",
        lambda: {
            **memory.run(mem_rules, batch=32, width=w),
            "simulated": {r: simulated_step_bytes(w, 32, r) for r in mem_rules
                          if not r.startswith("bp-")},
        },
    )
    spd = section("speed", lambda: speed.run(batch=32, width=w, repeats=2 if small else 5))
    from benchmarks import export_speed

    ort = section("export_speed", lambda: export_speed.run("vgg6", w, 32, repeats=3, steps=5))
    quant = section(
        "quant", lambda: quant_section(a.data_dir, p["quant"])
    )
    if acc:
        res["headline"] = headline(acc, mem, spd, ort, quant)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    from benchmarks.report import write_report

    write_report(res, out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
