"""Parity of the exported training step across runtimes: onnxruntime, OpenVINO, IREE, QNN HTP.

For every local rule, the fp32 step (digits conv net, SGD with momentum: the optimizer the
fp16 HTP can run, see export.qnn) and, for the rules integer mode has, the int8-w16 integer
step (linear net: conv integer export is not there yet) run STEPS steps from the same start
on the same views in each runtime. Per runtime: the max |difference| and the worst relative
L2 over every parameter and state tensor after the last step (against onnxruntime on the
plain graph; onnxruntime itself against torch eager, or against the integer NumPy-exact
reference graph for integer steps), steps per second over the STEPS timed steps (compile /
session time apart), and how many graph nodes the accelerator took. A runtime that cannot
run a step gets its error in the table instead of numbers.

    python benchmarks/runtimes.py [--steps 20] [--out benchmarks/results/runtimes]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge import rules
from edge.errors import EdgeError
from edge.nets import init_params, preset
from edge.optim import OptimConfig
from edge.step import train_step
from export.manifest import NOISE, PARAMS, STATE
from export.profile import apply_profile
from export.runner import Runner, apply_bindings
from export.training_step import training_step

RULES = ["clapp", "clapp++", "clapp++dfb", "clapp++both", "ff"]
RUNTIMES = ["onnxruntime", "openvino", "iree", "qnn-htp"]
BATCH = 8


def _views(steps: int, dtype: str, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    if dtype == "int8":
        return [tuple(rng.integers(-64, 64, (BATCH, 1, 8, 8)).astype(np.int8) for _ in "12")
                for _ in range(steps)]
    return [tuple(rng.standard_normal((BATCH, 1, 8, 8)).astype(np.float32) for _ in "12")
            for _ in range(steps)]


def _fp32_case(rule_name: str) -> dict[str, Any]:
    net = preset("digits", (1, 8, 8), width=0.25)
    rule = rules.get(rule_name)
    rule.check(net)
    gen = torch.Generator().manual_seed(0)
    params = init_params(net, gen)
    params.update(rule.init(net, gen))
    opt = OptimConfig("sgd", lr=1e-2)
    state = opt.init_state(params)
    model, manifest = training_step(net, rule, opt, params, state, BATCH)
    return {"net": net, "rule": rule, "opt": opt, "params": params, "state": state,
            "model": model, "io": manifest.step, "noise": None}


def _int_case(rule_name: str) -> dict[str, Any]:
    import quant.calibrate as qc
    from export.integer import integer_program, integer_state
    from quant.integer import make_noise

    net = preset("mlp", (1, 8, 8), width=0.25)
    rule = rules.get(rule_name)
    rule.check(net)
    gen = torch.Generator().manual_seed(0)
    params = init_params(net, gen)
    params.update(rule.init(net, gen))
    calib = [tuple(torch.randn(2, BATCH, 1, 8, 8, generator=gen)) for _ in range(2)]
    plan, q = qc.make_plan(net, rule, params, calib)
    model, manifest = training_step(net, rule, OptimConfig(), q, integer_state(), BATCH,
                                    program=integer_program(net, rule, plan, q))
    return {"params": q, "state": integer_state(), "model": model, "io": manifest.step,
            "noise": [{NOISE + k: v.numpy() for k, v in make_noise(plan, q, gen).items()}
                      for _ in range(64)]}


def _carried(case: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {PARAMS + k: v.numpy() for k, v in case["params"].items()}
    out.update({STATE + k: v.numpy() for k, v in case["state"].items()})
    return out


def _run(runner: Runner, case: dict[str, Any], views: list) -> tuple[dict, float]:
    carried = _carried(case)
    start = time.perf_counter()
    for s, (x1, x2) in enumerate(views):
        noise = case["noise"][s % len(case["noise"])] if case["noise"] else {}
        apply_bindings(carried, runner.run({**carried, **noise, "x1": x1, "x2": x2}), case["io"])
    return carried, len(views) / (time.perf_counter() - start)


def _torch_reference(case: dict[str, Any], views: list) -> dict[str, np.ndarray]:
    params, state = case["params"], case["state"]
    for x1, x2 in views:
        params, state, _ = train_step(case["net"], case["rule"], case["opt"], params, state,
                                      torch.from_numpy(x1), torch.from_numpy(x2))
    return _carried({"params": params, "state": state})


def _compare(got: dict, ref: dict) -> dict[str, float]:
    diff, rel = 0.0, 0.0
    for k, r in ref.items():
        a, b = np.asarray(got[k], np.float64), np.asarray(r, np.float64)
        diff = max(diff, float(np.abs(a - b).max()) if b.size else 0.0)
        rel = max(rel, float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
    return {"max_abs_diff": diff, "max_rel_l2": rel}


def _one(runtime: str, case: dict[str, Any], views: list, ref: dict) -> dict[str, Any]:
    model = case["model"] if runtime in ("onnxruntime", "openvino") else apply_profile(
        case["model"], "npu")
    start = time.perf_counter()
    try:
        runner = Runner(model, runtime=runtime, threads=2)
        setup = time.perf_counter() - start
        final, rate = _run(runner, case, views)
    except EdgeError as e:
        return {"runtime": runtime, "error": str(e)[:300]}
    row = {"runtime": runtime, "profile": "plain" if model is case["model"] else "npu",
           **_compare(final, ref), "steps_per_s": rate, "setup_s": setup}
    if runner.placement is not None:
        p = runner.placement
        row["nodes_on_accelerator"] = f"{p.on_accelerator}/{p.nodes}"
        row["partitions"] = p.partitions
    return row


def run(steps: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for kind in ("fp32", "int8-w16"):
        for rule_name in RULES:
            try:
                case = _fp32_case(rule_name) if kind == "fp32" else _int_case(rule_name)
            except Exception as e:  # noqa: BLE001 - a rule or mode that does not export
                rows.append({"step": kind, "rule": rule_name, "runtime": "-",
                             "error": f"does not export: {type(e).__name__}: {str(e)[:200]}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            views = _views(steps, case["io"].input("x1").dtype)
            ort, _ = _run(Runner(case["model"]), case, views)
            for runtime in RUNTIMES:
                if runtime == "onnxruntime":
                    ref = _torch_reference(case, views) if kind == "fp32" else ort
                    row = _one(runtime, case, views, ref)
                    row["reference"] = "torch eager" if kind == "fp32" else "itself"
                else:
                    row = _one(runtime, case, views, ort)
                    row["reference"] = "onnxruntime"
                rows.append({"step": kind, "rule": rule_name, **row})
                print(json.dumps(rows[-1]), flush=True)
    return {"steps": steps, "batch": BATCH, "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "rows": rows,
            "versions": _versions()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("onnxruntime", "openvino", "iree-base-compiler", "iree-base-runtime",
                "onnxruntime-qnn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Exported training step, {result['steps']} steps, batch {result['batch']}: fp32 = "
             "digits conv net x0.25 with SGD (momentum 0.9); int8-w16 = linear net x0.25 in "
             "integer mode. Max |diff| and relative L2: worst over every parameter and state "
             "tensor after the last step, against the reference column. QNN HTP runs in its "
             "x86 simulator (fp16): its steps/s say nothing about a phone's NPU.", "",
             "| step | rule | runtime | profile | max abs diff | rel L2 | reference | steps/s "
             "| nodes on accelerator |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            err = r["error"]
            if "onnx.Cast" in err and "si16" in err:  # the IREE import's message is long
                err = "iree-compile: cannot legalize onnx.Cast to int16"
            lines.append(f"| {r['step']} | {r['rule']} | {r['runtime']} | | {err[:160]} "
                         "| | | | |")
            continue
        diff, rel = f"{r['max_abs_diff']:.2e}", f"{r['max_rel_l2']:.2e}"
        if r["reference"] == "itself":  # the integer reference run: nothing to compare
            diff, rel = "reference", "-"
        lines.append(f"| {r['step']} | {r['rule']} | {r['runtime']} | {r['profile']} | "
                     f"{diff} | {rel} | {r['reference']} | "
                     f"{r['steps_per_s']:.1f} | {r.get('nodes_on_accelerator', 'CPU')} |")
    v = result["versions"]
    lines += ["", "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
              f"Load average while it ran: {', '.join(f'{x:.2f}' for x in result['load_average'])}"
              f" on {result['cpus']} CPUs (shared machine: steps/s are indicative)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/runtimes"))
    ap.add_argument("--markdown-only", action="store_true", help="Re-render the saved JSON.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.markdown_only:
        result = json.loads((args.out / "runtimes.json").read_text())
    else:
        result = run(args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtimes.json").write_text(json.dumps(result, indent=2))
    (args.out / "runtimes.md").write_text(markdown(result))
    print(markdown(result))
