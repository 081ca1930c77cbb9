"""Anchor: ONNX Runtime's own on-device training (backprop) beside our exported local step.

ONNX Runtime's training API (`onnxruntime.training`: artifacts from a forward + loss graph,
then `Module` / `Optimizer`) was its on-device training story; 1.19.2 is the last release of
`onnxruntime-training-cpu` and it needs onnx 1.16 and a torch at import, so it lives in its
own venv and runs here as a subprocess:

    python3.11 -m venv ../venv-ortt
    ../venv-ortt/bin/pip install onnxruntime-training-cpu==1.19.2 onnx==1.16.2 torch

(or, to reuse this venv's torch, install only the first two and put a `.pth` file naming
this venv's site-packages into the anchor venv's: its own onnxruntime and onnx come first).

What is timed, on the same conv net, batch, two views and threads (AdamW, lr 1e-3):
  anchor          onnxruntime-training 1.19.2 training the net by backprop: the CLAPP++
                  hinge on the last layer (the `bp-clapp++` baseline's loss) exported as a
                  forward + loss graph (ONNX has no stop-gradient: the anchor's gradient also
                  flows through the hinge's context, which torch detaches), then
                  `generate_artifacts`, `Module` (forward + backward) and `Optimizer.step`
  local@1.19.2    our exported CLAPP++ step (`export.step.step_graph` of
                  `export.step.fp32_program`, with the exporter's own passes) in the same
                  onnxruntime build, 1.19.2
  local@main      the same graph in this venv's onnxruntime through export.runner.Runner
All three in one interleaved loop (local@main, local@1.19.2, anchor, ..., the order rotating
each repeat): each repeat times `steps` consecutive steps after a warm-up; figures are the
median steps/s over the repeats with min and max, and ratios per repeat. The worker checks
the anchor's first loss against torch's bp-clapp++ loss at the same parameters and views
(relative 1e-5).

    python benchmarks/ort_training_anchor.py [--net vgg6 --width 0.125 --batch 32]
        [--repeats 5 --steps 5 --threads 2 --venv ../venv-ortt]

Writes benchmarks/results/ort_training_anchor/results.json and results.md; exit status 2
with a one-line `error:` when the venv or its packages are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_VENV = Path("../venv-ortt")  # beside the checkout, as the set-up above makes it
RESULTS = Path(__file__).resolve().parent / "results" / "ort_training_anchor"
SETUP = ("python3.11 -m venv {v} && {v}/bin/pip install onnxruntime-training-cpu==1.19.2 "
         "onnx==1.16.2 torch")
IN_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "vgg6": (3, 32, 32)}


# --------------------------------------------------------------------------- worker (venv)
def _session_options(ort, threads: int):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def worker(workdir: Path, threads: int) -> None:
    """Runs in the anchor venv: builds the artifacts, then answers `{"run": name, "steps": n}`
    lines on stdin with `{"seconds": t}` on stdout."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    meta = json.loads((workdir / "meta.json").read_text())
    views = np.load(workdir / "views.npz")
    x1, x2 = views["x1"], views["x2"]
    art = workdir / "artifacts"
    art.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    artifacts.generate_artifacts(onnx.load(str(workdir / "forward_loss.onnx")),
                                 requires_grad=meta["requires_grad"], loss=None,
                                 optimizer=artifacts.OptimType.AdamW, artifact_directory=str(art))
    gen_s = time.perf_counter() - t0
    state = CheckpointState.load_checkpoint(str(art / "checkpoint"))
    so = _session_options(ort, threads)
    module = Module(str(art / "training_model.onnx"), state, str(art / "eval_model.onnx"),
                    session_options=so)
    optimizer = Optimizer(str(art / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(meta["lr"])
    module.train()

    def anchor_step() -> float:
        loss = module(x1, x2)
        optimizer.step()
        module.lazy_reset_grad()
        return float(np.asarray(loss))

    first_loss = anchor_step()
    sess = ort.InferenceSession(str(workdir / "local_step.onnx"), _session_options(ort, threads),
                                providers=["CPUExecutionProvider"])
    carried = dict(np.load(workdir / "local_inputs.npz"))
    carried.update({"x1": x1, "x2": x2})
    outs = [o.name for o in sess.get_outputs()]
    binds = {o: "params/" + o[len("new_params/"):] if o.startswith("new_params/")
             else "state/" + o[len("new_state/"):] for o in outs
             if o.startswith(("new_params/", "new_state/"))}

    def local_step() -> None:
        res = dict(zip(outs, sess.run(outs, carried), strict=True))
        carried.update({binds[o]: v for o, v in res.items() if o in binds})

    steps = {"anchor": anchor_step, "local": local_step}
    for f in steps.values():
        f()  # warm-up
    print(json.dumps({"ready": True, "first_loss": first_loss, "generate_s": gen_s,
                      "onnxruntime": ort.__version__, "onnx": onnx.__version__}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        f = steps[cmd["run"]]
        t = time.perf_counter()
        for _ in range(cmd["steps"]):
            f()
        print(json.dumps({"seconds": time.perf_counter() - t}), flush=True)


# --------------------------------------------------------------------------- driver (edge)
def _forward_loss_model(net, rule, params, x1, x2):
    """The bp-clapp++ forward + loss as an ONNX model whose parameters are initializers."""
    import io

    import onnx
    import torch

    names = list(params)

    class ForwardLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.ParameterList(
                [torch.nn.Parameter(params[k].detach().clone()) for k in names])

        def forward(self, a, b):
            return rule.loss(net, dict(zip(names, self.p, strict=True)), a, b)

    buf = io.BytesIO()
    torch.onnx.export(ForwardLoss(), (x1, x2), buf, dynamo=False, opset_version=17,
                      input_names=["x1", "x2"], output_names=["loss"], export_params=True,
                      do_constant_folding=False)
    model = onnx.load_model_from_string(buf.getvalue())
    model.ir_version = min(model.ir_version, 9)  # what onnx 1.16 reads
    grad = [i.name for i in model.graph.initializer if i.name.startswith("p.")]
    return model, grad


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _check_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.is_file():
        _fail(f"the anchor venv {venv} is missing (no {py}); create it with: "
              + SETUP.format(v=venv))
    probe = subprocess.run([str(py), "-c", "import onnxruntime.training, onnx, torch; "
                            "print(onnxruntime.__version__, onnx.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        _fail(f"the anchor venv {venv} cannot import onnxruntime.training ({last}); set it up "
              "with: " + SETUP.format(v=venv))
    return py


def _summary(v: list[float]) -> dict:
    import statistics

    return {"median": round(statistics.median(v), 2), "min": round(min(v), 2),
            "max": round(max(v), 2)}


def run(net_name: str = "vgg6", width: float = 0.125, batch: int = 32, repeats: int = 5,
        steps: int = 5, threads: int = 2, venv: Path = DEFAULT_VENV, out: Path = RESULTS) -> dict:
    import tempfile

    import numpy as np
    import onnx
    import torch

    from edge.nets import fold_batchnorm, preset
    from edge.optim import OptimConfig
    from edge.rules import get
    from edge.step import init_state
    from export.runner import OnnxStepper
    from export.step import fp32_program, step_graph

    py = _check_venv(venv)
    torch.set_num_threads(threads)
    local, bp = get("clapp++"), get("bp-clapp++")
    gen = torch.Generator().manual_seed(0)
    raw = preset(net_name, IN_SHAPES[net_name], width)
    net, enc = fold_batchnorm(raw, raw.init_params(gen))
    local.check(net)
    bp.check(net)
    lp = dict(enc) | local.init(net, gen)
    last = len(net.blocks) - 1
    bpp = dict(enc) | {k: v for k, v in lp.items() if k.startswith(f"rule.{last}.")}
    x1 = torch.randn(batch, *net.in_shape, generator=gen)
    x2 = torch.randn(batch, *net.in_shape, generator=gen)
    opt = OptimConfig("adamw", lr=1e-3)
    state = init_state(net, local, opt, lp)
    model, manifest = step_graph(net, local, fp32_program(net, local, opt), lp, state, batch)
    with torch.no_grad():
        torch_loss = float(bp.loss(net, bpp, x1, x2))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fl, grad = _forward_loss_model(net, bp, bpp, x1, x2)
        onnx.save(fl, str(work / "forward_loss.onnx"))
        onnx.save(model, str(work / "local_step.onnx"))
        inputs = {"params/" + k: v.numpy() for k, v in lp.items()}
        inputs.update({"state/" + k: v.numpy() for k, v in state.items()})
        np.savez(work / "local_inputs.npz", **inputs)
        np.savez(work / "views.npz", x1=x1.numpy(), x2=x2.numpy())
        (work / "meta.json").write_text(json.dumps({"requires_grad": grad, "lr": opt.lr}))
        proc = subprocess.Popen([str(py), str(Path(__file__).resolve()), "--worker", str(work),
                                 "--threads", str(threads)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        ready = proc.stdout.readline()
        if not ready:
            err = proc.stderr.read().strip().splitlines()
            _fail(f"the anchor worker failed: {err[-1] if err else '?'}")
        info = json.loads(ready)

        def remote(name: str) -> float:
            proc.stdin.write(json.dumps({"run": name, "steps": steps}) + "\n")
            proc.stdin.flush()
            return steps / json.loads(proc.stdout.readline())["seconds"]

        stepper = OnnxStepper.from_graphs(net, local, opt, [model], [manifest.step],
                                          threads=threads)
        box = {"p": dict(lp), "s": dict(state)}

        def main_step() -> None:
            box["p"], box["s"], _ = stepper(box["p"], box["s"], x1, x2)

        def local_main() -> float:
            t = time.perf_counter()
            for _ in range(steps):
                main_step()
            return steps / (time.perf_counter() - t)

        main_step()
        timed = {"local@main": local_main, "local@1.19.2": lambda: remote("local"),
                 "anchor": lambda: remote("anchor")}
        rates: dict[str, list[float]] = {k: [] for k in timed}
        names = list(timed)
        load0 = os.getloadavg()[0]
        for r in range(repeats):
            for name in names[r % 3:] + names[:r % 3]:  # each goes first in turn
                rates[name].append(timed[name]())
        proc.stdin.write(json.dumps({"quit": True}) + "\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    import onnxruntime

    rel = abs(info["first_loss"] - torch_loss) / max(abs(torch_loss), 1e-30)
    ratio = {k: [a / b for a, b in zip(rates[k], rates["anchor"], strict=True)]
             for k in ("local@main", "local@1.19.2")}
    result = {
        "net": f"{net_name} x{width}", "batch": batch, "threads": threads, "repeats": repeats,
        "steps_per_repeat": steps, "optimizer": "adamw lr 1e-3",
        "anchor": {"package": "onnxruntime-training-cpu", "onnxruntime": info["onnxruntime"],
                   "onnx": info["onnx"], "loss": "bp-clapp++ (CLAPP++ hinge on the last layer)",
                   "generate_artifacts_s": round(info["generate_s"], 2),
                   "first_loss": info["first_loss"], "torch_loss": torch_loss,
                   "first_loss_rel_err": rel, "first_loss_ok": rel < 1e-5},
        "local": {"rule": "clapp++", "onnxruntime_main": onnxruntime.__version__,
                  "graph": "export.step.step_graph(fp32_program) as exported"},
        "steps_per_s": {k: _summary(v) for k, v in rates.items()},
        "ratio_vs_anchor": {k: _summary(v) for k, v in ratio.items()},
        "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results.md").write_text(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    s, q = r["steps_per_s"], r["ratio_vs_anchor"]
    fmt = "{median} [{min}-{max}]".format
    net, width = r["net"].split(" x")
    lines = [
        "# onnxruntime-training (backprop) vs our exported local step",
        "",
        f"{r['net']}, batch {r['batch']}, {r['threads']} threads, AdamW; {r['repeats']} "
        f"interleaved repeats of {r['steps_per_repeat']} steps; median [min-max]; load "
        f"average {r['loadavg_1min']} on {r['cpus']} CPUs. Command: `OMP_WAIT_POLICY=PASSIVE "
        f"python benchmarks/ort_training_anchor.py --net {net} --width {width} --batch "
        f"{r['batch']} --repeats {r['repeats']} --steps {r['steps_per_repeat']}`.",
        "",
        "| step | runtime | steps/s | vs anchor |",
        "|---|---|---|---|",
        f"| anchor: backprop, bp-clapp++ loss | onnxruntime-training {r['anchor']['onnxruntime']}"
        f" | {fmt(**s['anchor'])} | 1 |",
        f"| ours: CLAPP++ local step | onnxruntime {r['anchor']['onnxruntime']} | "
        f"{fmt(**s['local@1.19.2'])} | {fmt(**q['local@1.19.2'])} |",
        f"| ours: CLAPP++ local step | onnxruntime {r['local']['onnxruntime_main']} (Runner) | "
        f"{fmt(**s['local@main'])} | {fmt(**q['local@main'])} |",
        "",
        f"Anchor's first loss {r['anchor']['first_loss']:.6g} vs torch "
        f"{r['anchor']['torch_loss']:.6g} (relative {r['anchor']['first_loss_rel_err']:.1e}). "
        f"generate_artifacts took {r['anchor']['generate_artifacts_s']} s. The anchor's "
        "gradient also flows through the hinge's context (ONNX has no stop-gradient).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="vgg6", choices=sorted(IN_SHAPES))
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.threads)
        return
    print(json.dumps(run(a.net, a.width, a.batch, a.repeats, a.steps, a.threads, a.venv,
                         a.out)))


if __name__ == "__main__":
    main()
