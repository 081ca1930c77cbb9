"""Runtime parity of the exported training step, fp32 and integer, on every runtime.

For every local rule, the fp32 step (SGD: the optimizer the fp16 HTP can run, see export.qnn)
and, for the rules with an integer form, the int8-w16 integer step run the same STEPS steps
from the same start on the same views and random bits in torch eager and in each runtime:
onnxruntime and OpenVINO on the plain graph, IREE (llvm-cpu, this machine) and QNN HTP (its
x86 simulator) on the npu profile; QNN runs the integer step in its int32 form
(export.int32). Per runtime: parity after the last step against torch eager (integer: equal
bit for bit or not, and the max |difference| of any store; fp32: the worst relative L2 of
any parameter or state tensor), how many graph nodes the accelerator took, the setup time
(export aside: session creation, compilation) and steps/s: REPEATS passes of STEPS steps,
the runtimes of one case interleaved (pass r runs every runtime once, in rotated order), the
median pass and the spread (slowest, fastest). A runtime that cannot run a step gets its
error instead of numbers. QNN HTP keeps one precision per process (export.qnn): the fp32
and integer cases run in separate worker processes.

    python -m benchmarks.runtimes [--quick] [--steps N] [--repeats R] [--out DIR]

--quick: the linear net (mlp x0.25), 4 steps, 3 repeats: a few minutes on 2 cores. Default:
the digits conv net x0.25, 10 steps, 5 repeats. Writes DIR/results.json and DIR/results.md
(DIR: benchmarks/results/runtimes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge import rules
from edge.errors import EdgeError
from edge.nets import fold_batchnorm, preset
from edge.optim import OptimConfig
from export.manifest import NOISE, PARAMS, STATE, GraphIO
from export.profile import apply_profile
from export.runner import Runner, apply_bindings

INTEGER_RULES = ["clapp", "clapp++", "clapp++dfb", "clapp++both"]
FP32_RULES = [*INTEGER_RULES, "ff"]
RUNTIMES = ["onnxruntime", "openvino", "iree", "qnn-htp"]
KINDS = ("fp32", "int8-w16")
BATCH, THREADS = 8, 2
OUT = Path("benchmarks/results/runtimes")


@dataclass
class Case:
    kind: str
    rule: str
    model: Any
    io: GraphIO
    start: dict[str, np.ndarray]  # carried inputs at step 0
    feeds: list[dict[str, np.ndarray]]  # per step: views and random bits
    reference: dict[str, np.ndarray]  # carried inputs after the last step, torch eager
    eager: Any  # () -> (carried after the last step, seconds): the torch eager pass


def _net(quick: bool) -> tuple[str, tuple[int, int, int], float]:
    return ("mlp", (1, 8, 8), 0.25) if quick else ("digits", (1, 8, 8), 0.25)


def build_case(kind: str, rule_name: str, quick: bool, steps: int, seed: int = 0) -> Case:
    """The step graph of `rule_name` and its torch eager trajectory over `steps` steps."""
    from edge.step import train_step
    from export.step import fp32_program, integer_program, step_graph
    from quant.calibrate import make_plan
    from quant.integer import integer_step, make_noise, noise_shapes, quantize_input

    name, shape, width = _net(quick)
    net = preset(name, shape, width)
    rule = rules.get(rule_name)
    gen = torch.Generator().manual_seed(seed)
    net, params = fold_batchnorm(net, net.init_params(gen))
    rule.check(net)
    params.update(rule.init(net, gen))
    views = []
    for _ in range(steps):
        x1 = torch.randn(BATCH, *shape, generator=gen)
        views.append((x1, x1 + 0.3 * torch.randn(x1.shape, generator=gen)))
    if kind == "fp32":
        opt = OptimConfig("sgd", lr=1e-2)
        state = opt.init_state(params)
        program = fp32_program(net, rule, opt)
        model, manifest = step_graph(net, rule, program, params, state, BATCH)
        feeds = [{"x1": a.numpy(), "x2": b.numpy()} for a, b in views]

        def eager() -> tuple[dict[str, np.ndarray], float]:
            p, s = params, state
            t0 = time.perf_counter()
            for x1, x2 in views:
                p, s, _ = train_step(net, rule, opt, p, s, x1, x2)
            return _carried(p, s), time.perf_counter() - t0
    else:
        plan, params = make_plan(net, rule, params, views[:2], kind, 1e-3)
        state = {"step": torch.zeros((), dtype=torch.int64)}
        program = integer_program(net, rule, plan, params)
        model, manifest = step_graph(net, rule, program, params, state, BATCH)
        form = rule.integer_form(net)
        shapes, bits = noise_shapes(net, form, plan, params), torch.Generator().manual_seed(5)
        qviews = [(quantize_input(a, plan.f_in), quantize_input(b, plan.f_in)) for a, b in views]
        noise = [make_noise(shapes, bits) for _ in views]
        feeds = [{"x1": a.numpy(), "x2": b.numpy(), **{NOISE + k: v.numpy() for k, v in n.items()}}
                 for (a, b), n in zip(qviews, noise, strict=True)]

        def eager() -> tuple[dict[str, np.ndarray], float]:
            p, count = params, state["step"]
            t0 = time.perf_counter()
            for (x1, x2), n in zip(qviews, noise, strict=True):
                p, _ = integer_step(net, form, plan, p, x1, x2, n, count)
                count = count + 1
            return _carried(p, {"step": count}), time.perf_counter() - t0
    reference, _ = eager()
    return Case(kind, rule_name, model, manifest.step, _carried(params, state), feeds,
                reference, eager)


def _carried(params: dict, state: dict) -> dict[str, np.ndarray]:
    out = {PARAMS + k: v.detach().numpy() for k, v in params.items()}
    out.update({STATE + k: v.detach().numpy() for k, v in state.items()})
    return out


def one_pass(runner: Runner, case: Case) -> tuple[dict[str, np.ndarray], float]:
    carried = dict(case.start)
    t0 = time.perf_counter()
    for f in case.feeds:
        apply_bindings(carried, runner.run({**carried, **f}), case.io)
    return carried, time.perf_counter() - t0


def parity(case: Case, got: dict[str, np.ndarray]) -> dict[str, Any]:
    diff, rel, equal = 0.0, 0.0, True
    for k, ref in case.reference.items():
        a, b = np.asarray(got[k], np.float64), np.asarray(ref, np.float64)
        equal &= bool(np.array_equal(a, b)) and np.asarray(got[k]).dtype == ref.dtype
        diff = max(diff, float(np.abs(a - b).max()) if b.size else 0.0)
        if k != STATE + "step":
            rel = max(rel, float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
    return {"bit_exact": equal, "max_abs_diff": diff, "max_rel_l2": rel}


def measure(case: Case, runtimes: list[str], repeats: int) -> list[dict[str, Any]]:
    """Every runtime on one case: setup, parity, interleaved timed passes."""
    rows: list[dict[str, Any]] = [{"step": case.kind, "rule": case.rule, "runtime": "torch",
                                   "profile": "eager", "reference": True}]
    passes = {"torch": case.eager}
    for rt in runtimes:
        row: dict[str, Any] = {"step": case.kind, "rule": case.rule, "runtime": rt}
        model = case.model if rt in ("onnxruntime", "openvino") else apply_profile(case.model,
                                                                                    "npu")
        row["profile"] = "plain" if model is case.model else "npu"
        t0 = time.perf_counter()
        try:
            runner = Runner(model, runtime=rt, threads=THREADS)
            row["setup_s"] = round(time.perf_counter() - t0, 2)
            final, _ = one_pass(runner, case)  # also the warm-up
        except EdgeError as e:
            rows.append({**row, "error": str(e)[:300]})
            continue
        row.update(parity(case, final))
        if runner.placement is not None:
            p = runner.placement
            row.update(nodes=p.nodes, on_accelerator=p.on_accelerator, partitions=p.partitions)
        passes[rt] = lambda runner=runner: one_pass(runner, case)
        rows.append(row)
    seconds: dict[str, list[float]] = {rt: [] for rt in passes}
    order = list(passes)
    for r in range(repeats):
        k = r % len(order)
        for rt in order[k:] + order[:k]:
            seconds[rt].append(passes[rt]()[1])
    steps = len(case.feeds)
    for row in rows:
        if row["runtime"] in seconds:
            rates = [steps / s for s in seconds[row["runtime"]]]
            row.update(steps_per_s=statistics.median(rates), slowest=min(rates),
                       fastest=max(rates), repeats=len(rates))
    return rows


def worker(kind: str, quick: bool, steps: int, repeats: int, runtimes: list[str]) -> list[dict]:
    torch.set_num_threads(THREADS)
    out = []
    for rule_name in FP32_RULES if kind == "fp32" else INTEGER_RULES:
        try:
            case = build_case(kind, rule_name, quick, steps)
        except Exception as e:  # noqa: BLE001 - a rule that does not export is a row too
            out.append({"step": kind, "rule": rule_name, "runtime": "-",
                        "error": f"does not export: {type(e).__name__}: {str(e)[:200]}"})
            continue
        for row in measure(case, runtimes, repeats):
            out.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def run(quick: bool, steps: int, repeats: int, runtimes: list[str]) -> dict[str, Any]:
    """Each kind in its own worker process (one QNN precision per process)."""
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for kind in KINDS:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "rows.json"
            cmd = [sys.executable, "-m", "benchmarks.runtimes", "--worker", kind, "--steps",
                   str(steps), "--repeats", str(repeats), "--rows", str(path),
                   "--runtimes", ",".join(runtimes), *(["--quick"] if quick else [])]
            proc = subprocess.run(cmd)
            if proc.returncode != 0 or not path.is_file():
                rows.append({"step": kind, "rule": "-", "runtime": "-",
                             "error": f"worker exited with {proc.returncode}"})
                continue
            rows += json.loads(path.read_text())
    name, shape, width = _net(quick)
    return {"net": f"{name} x{width}", "in_shape": list(shape), "steps": steps,
            "repeats": repeats, "batch": BATCH, "threads": THREADS, "rows": rows,
            "seconds": round(time.perf_counter() - start, 1),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()), "versions": _versions()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "onnxruntime", "openvino", "iree-base-compiler", "iree-base-runtime",
                "onnxruntime-qnn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Exported training step of {result['net']}, batch {result['batch']}, "
             f"{result['steps']} steps from the same start on the same views and random bits "
             f"in every runtime ({result['threads']} threads). fp32: SGD, parity = worst "
             "relative L2 of any parameter / state tensor against torch eager. int8-w16: "
             "integer mode, parity = every store equal to torch's integer step bit for bit "
             "(and the max |difference|). steps/s: median of "
             f"{result['repeats']} interleaved passes (slowest - fastest). QNN HTP runs in "
             "its x86 simulator (fp16 for fp32 steps, the int32 form for integer steps): its "
             "steps/s say nothing about a phone's NPU.", "",
             "| step | rule | runtime | profile | parity | max abs diff | nodes on accelerator "
             "| setup s | steps/s (spread) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        head = f"| {r['step']} | {r['rule']} | {r['runtime']} | {r.get('profile', '')} |"
        if "error" in r:
            lines.append(f"{head} {r['error'][:160].replace('|', '/')} | | | | |")
            continue
        if r.get("reference"):
            par = "reference"
        elif r["step"] == "fp32":
            par = f"rel L2 {r['max_rel_l2']:.1e}"
        else:
            par = "bit-exact" if r["bit_exact"] else "DIFFERS"
        nodes = f"{r['on_accelerator']}/{r['nodes']}" if "nodes" in r else "-"
        rate = f"{r['steps_per_s']:.1f}"
        if "slowest" in r:
            rate += f" ({r['slowest']:.1f} - {r['fastest']:.1f})"
        diff = "-" if r.get("reference") else f"{r['max_abs_diff']:.2e}"
        lines.append(f"{head} {par} | {diff} | {nodes} | "
                     f"{r.get('setup_s', '-')} | {rate} |")
    v = result["versions"]
    lines += ["", "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".",
              f"Machine: {result['machine']}, {result['cpus']} CPUs, load average "
              f"{', '.join(f'{x:.2f}' for x in result['load_average'])} at the end (a shared "
              f"machine: steps/s are indicative). Whole run: {result['seconds']} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="mlp x0.25, 4 steps, 3 repeats")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--markdown-only", action="store_true", help="Re-render the saved JSON.")
    ap.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    steps = args.steps or (4 if args.quick else 10)
    repeats = args.repeats or (3 if args.quick else 5)
    runtimes = [r for r in args.runtimes.split(",") if r]
    if args.worker:
        rows = worker(args.worker, args.quick, steps, repeats, runtimes)
        args.rows.write_text(json.dumps(rows))
        return
    if args.markdown_only:
        result = json.loads((args.out / "results.json").read_text())
    else:
        result = run(args.quick, steps, repeats, runtimes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    (args.out / "results.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
