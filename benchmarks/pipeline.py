"""`python -m benchmarks.pipeline`: pipelined and data-parallel local training, measured and
simulated, beside backprop's pipeline.

Measured (this machine, gloo on CPU, one thread a process, synthetic views of the data
shape; the same batches everywhere): the step throughput (images/s) of one process, of the
pipeline on 2 processes (`edge.app.pipeline`) and of data parallel on 2 processes
(`edge.app.distributed`), and of one process with as many threads as the two together.

Simulated, from the per-block times measured here in one process:
  local pipeline, S stages  the blocks split into S contiguous stages balancing the measured
                            times (`split`); stage s runs step t - s; a step ends every
                            max_s(stage time, its send time); an epoch of M steps takes
                            (M + S - 1) such periods (the drain at the epoch's end)
  data parallel, S ranks    every rank runs the whole step on N / S images (block times
                            measured at that batch); block l's gradient all-reduce (ring:
                            2 (S - 1) / S of its bytes, plus a latency) starts when its update
                            is computed and runs on one link while later blocks compute
  backprop pipeline, S      GPipe: K = 4 S micro-batches (at least 1 image each) forward
                            through the stages, then backward in reverse; the update waits
                            for the last backward; per-block forward and backward times
                            measured at the micro-batch size; the loss head on the top stage
Speedups are against one process running the same step on the whole batch (the local rule's
for the first two, backprop's for the third). Link: `--link-gbps` (0: compute only), with a
fixed per-message latency. A network of B blocks has at most B stages: more are not used.
Reference points (other hardware and networks, quoted, not reproduced): SEDONA (ICLR 2021)
reports up to 2.02x over backprop in total training time; Pipeline Forward-Forward (arXiv
2404.08573) 3.75x on MNIST with a four-layer network on four nodes.

Writes benchmarks/results/pipeline/{results.json, results.md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks import provenance
from edge.app import distributed as D
from edge.app.config import TrainConfig
from edge.app.pipeline import PipelineEngine, split
from edge.app.train import FloatEngine, build, optim
from edge.layers import EAGER
from edge.step import block_step

OUT = Path(__file__).resolve().parent / "results" / "pipeline"
LATENCY_S = 20e-6  # per message
SHAPES = {"cifar10": (3, 32, 32), "digits": (1, 8, 8)}


def _setup(args: argparse.Namespace, rule: str | None = None) -> tuple:
    cfg = TrainConfig(rule=rule or args.rule, data=args.data, net=args.net, width=args.width,
                      batch_size=args.batch)
    net, rule_obj, params = build(cfg, SHAPES[args.data])
    return cfg, net, rule_obj, params


def _views(args: argparse.Namespace, n: int, count: int) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(0)
    return [tuple(torch.randn(n, *SHAPES[args.data], generator=gen) for _ in range(2))
            for _ in range(count)]


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def local_block_times(args: argparse.Namespace, n: int) -> list[float]:
    """Seconds of each block's `block_step` (forward, rule, adjoint, update) at batch n."""
    cfg, net, rule, params = _setup(args)
    opt = optim(cfg)
    eng = FloatEngine()
    eng.bind(net, rule, opt)
    eng.start(params, [])
    times: list[list[float]] = [[] for _ in net.blocks]
    for r, (v1, v2) in enumerate(_views(args, n, args.reps + 1)):
        x, step = rule.inputs(v1, v2), eng.state["step"] + 1
        for i in range(len(net.blocks)):
            t0 = time.perf_counter()
            x, _, _, _ = block_step(net, rule, opt, EAGER, i, eng.params, eng.state, x, None,
                                    step)
            if r:  # the first pass warms the kernels up
                times[i].append(time.perf_counter() - t0)
    return [_median(t) for t in times]


def bp_block_times(args: argparse.Namespace, n: int) -> tuple[list[float], list[float], float]:
    """Backprop's per-block forward and backward seconds at batch n (autograd, both views),
    and the InfoNCE head's forward + backward."""
    from edge.app.distributed import _Pass, _TopOnly

    _, net, rule, params = _setup(args, "bp-infonce")
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    fw: list[list[float]] = [[] for _ in net.blocks]
    bw: list[list[float]] = [[] for _ in net.blocks]
    head: list[float] = []
    for r, (v1, v2) in enumerate(_views(args, n, args.reps + 1)):
        x = torch.cat((v1, v2))
        for i, block in enumerate(net.blocks):
            x = x.detach().requires_grad_(i > 0)
            t0 = time.perf_counter()
            y, _ = block.forward(EAGER, i, leaves, x)
            t1 = time.perf_counter()
            wrt = [x] * (i > 0) + [leaves[k] for k in net.blocks[i].param_shapes(i)]
            torch.autograd.grad(y, wrt, torch.ones_like(y))
            t2 = time.perf_counter()
            if r:
                fw[i].append(t1 - t0)
                bw[i].append(t2 - t1)
            x = y
        top = x.detach().requires_grad_(True)
        t0 = time.perf_counter()
        loss = rule.loss(_TopOnly([_Pass()] * len(net.blocks)), leaves, top[:n], top[n:])
        torch.autograd.grad(loss, [top])
        if r:
            head.append(time.perf_counter() - t0)
    return [_median(t) for t in fw], [_median(t) for t in bw], _median(head)


def _sizes(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """Bytes a block sends on (its output, both views, per image) and its gradient bytes."""
    _, net, rule, params = _setup(args)
    act = [4 * rule.streams * math.prod(s) for s in net.shapes()]
    grad = [0] * len(net.blocks)
    for k, v in params.items():
        grad[int(k.split(".")[1])] += 4 * v.numel()
    return act, grad


# ------------------------------------------------------------------------------ simulation
def sim_local_pipeline(times: list[float], act: list[int], n: int, stages: int, steps: int,
                       gbps: float) -> dict:
    s = min(stages, len(times))
    bounds = split(times, s)
    edges = [0, *bounds, len(times)]
    stage = [sum(times[a:b]) for a, b in zip(edges, edges[1:], strict=False)]
    send = [_link(act[b - 1] * n, gbps) for b in edges[1:-1]] + [0.0]
    period = max(max(c, m) for c, m in zip(stage, send, strict=True))
    one = sum(times)
    return {"stages": stages, "stages_used": s, "bounds": bounds,
            "stage_seconds": stage, "period_s": period,
            "speedup_steady": one / period,
            "speedup_epoch": steps * one / ((steps + s - 1) * period)}


def _link(nbytes: float, gbps: float) -> float:
    return 0.0 if gbps <= 0 else LATENCY_S + nbytes * 8 / (gbps * 1e9)


def sim_data_parallel(shard_times: list[float], grad: list[int], ranks: int, gbps: float,
                      one: float) -> dict:
    t = comm = 0.0
    for c, g in zip(shard_times, grad, strict=True):
        t += c
        ring = 0.0 if ranks == 1 else _link(2 * (ranks - 1) / ranks * g, gbps)
        comm = max(comm, t) + ring
    step = max(t, comm)
    return {"ranks": ranks, "compute_s": t, "step_s": step, "exposed_comm_s": step - t,
            "speedup": one / step}


def sim_gpipe(fw: list[float], bw: list[float], head: float, act: list[int], micro: int,
              stages: int, k: int, gbps: float, one: float) -> dict:
    """GPipe: all forwards, then all backwards, then the update (fw/bw at the micro batch)."""
    s = min(stages, len(fw))
    cost = [f + b for f, b in zip(fw, bw, strict=True)]
    cost[-1] += head
    bounds = split(cost, s)
    edges = [0, *bounds, len(fw)]
    F = [sum(fw[a:b]) for a, b in zip(edges, edges[1:], strict=False)]
    B = [sum(bw[a:b]) for a, b in zip(edges, edges[1:], strict=False)]
    F[-1] += head / 2
    B[-1] += head / 2
    link = [_link(act[b - 1] * micro, gbps) for b in edges[1:-1]]
    fend = [[0.0] * k for _ in range(s)]
    for j in range(k):
        for st in range(s):
            ready = fend[st - 1][j] + link[st - 1] if st else 0.0
            free = fend[st][j - 1] if j else 0.0
            fend[st][j] = max(ready, free) + F[st]
    bend = [[0.0] * k for _ in range(s)]
    for j in reversed(range(k)):  # a stage runs its backwards after all its forwards
        for st in reversed(range(s)):
            ready = bend[st + 1][j] + link[st] if st < s - 1 else fend[st][j]
            free = bend[st][j + 1] if j < k - 1 else fend[st][k - 1]
            bend[st][j] = max(ready, free) + B[st]
    step = max(bend[st][0] for st in range(s))
    return {"stages": stages, "stages_used": s, "micro_batches": k, "micro_batch": micro,
            "bounds": bounds, "step_s": step, "speedup": one / step,
            "bubble": 1 - k * max(f + b for f, b in zip(F, B, strict=True)) / step}


def timeline(stage: list[float], steps: int = 6, width: int = 60) -> list[str]:
    """The local pipeline's first steps as text: row s, step t drawn from t * period + s."""
    period = max(stage)
    scale = width / ((steps + len(stage) - 1) * period)
    rows = []
    for s, c in enumerate(stage):
        line = [" "] * width
        for t in range(steps):
            a = int(((t + s) * period) * scale)
            for x in range(a, min(width, a + max(1, int(c * scale)))):
                line[x] = str(t % 10)
        rows.append(f"stage {s} |{''.join(line)}|")
    return rows


# ------------------------------------------------------------------------------- measured
def _worker(rank: int, world: int, port: int, mode: str, args: argparse.Namespace,
            out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    comm = D.connect(mode)
    cfg, net, rule, params = _setup(args)
    engine = PipelineEngine(comm) if mode == "pipeline" else D.DataParallelEngine(comm)
    engine.bind(net, rule, optim(cfg))
    engine.start(params, [])
    views = _views(args, args.batch, args.steps + args.warmup)
    for v1, v2 in views[: args.warmup]:
        engine.step(v1, v2, None)
    engine.tensors()
    torch.distributed.barrier()
    t0 = time.perf_counter()
    for v1, v2 in views[args.warmup :]:
        engine.step(v1, v2, None)
    engine.tensors()  # the pipeline drains
    torch.distributed.barrier()
    seconds = time.perf_counter() - t0
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds,
                                         "blocks": list(getattr(engine, "blocks", []))}))
    torch.distributed.destroy_process_group()


def measure_parallel(args: argparse.Namespace, mode: str, world: int = 2) -> dict:
    import tempfile

    ctx = torch.multiprocessing.get_context("spawn")
    port = D.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r.json")
        procs = [ctx.Process(target=_worker, args=(r, world, port, mode, args, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"{mode} workers failed: {[p.exitcode for p in procs]}")
        r = json.loads(Path(out).read_text())
    return {"mode": mode, "processes": world, "threads_each": 1, "seconds": r["seconds"],
            "images_per_s": args.steps * args.batch / r["seconds"]}


def measure_one(args: argparse.Namespace, threads: int) -> dict:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg, net, rule, params = _setup(args)
        engine = FloatEngine()
        engine.bind(net, rule, optim(cfg))
        engine.start(params, [])
        views = _views(args, args.batch, args.steps + args.warmup)
        for v1, v2 in views[: args.warmup]:
            engine.step(v1, v2, None)
        t0 = time.perf_counter()
        for v1, v2 in views[args.warmup :]:
            engine.step(v1, v2, None)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)
    return {"mode": "one process", "processes": 1, "threads_each": threads, "seconds": seconds,
            "images_per_s": args.steps * args.batch / seconds}


# ----------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    n = args.batch
    rounds = []
    for _ in range(args.rounds):  # interleaved, so the machine's load drifts alike for all
        rounds.append([measure_one(args, 1), measure_one(args, 2),
                       measure_parallel(args, "pipeline"), measure_parallel(args, "data")])
    measured = []
    for col in zip(*rounds, strict=True):
        best = sorted(col, key=lambda m: m["images_per_s"])[len(col) // 2]
        measured.append({**best, "rounds_images_per_s": [m["images_per_s"] for m in col]})
    base = measured[0]["images_per_s"]
    for m in measured:
        m["speedup_vs_one_thread"] = m["images_per_s"] / base
    act, grad = _sizes(args)
    shard_sizes = sorted({max(1, n // s) for s in (1, *args.stages)}, reverse=True)
    local = {m: local_block_times(args, m) for m in shard_sizes}
    micro_sizes = sorted({max(1, n // (4 * s)) for s in args.stages} | {n}, reverse=True)
    bp = {m: bp_block_times(args, m) for m in micro_sizes}
    one_local = sum(local[n])
    fw, bw, head = bp[n]
    one_bp = sum(fw) + sum(bw) + head
    sims = []
    for gbps in args.link_gbps:
        for s in args.stages:
            micro = max(1, n // (4 * s))
            k = n // micro
            f, b, h = bp[micro]
            per = micro / n  # linear: every time scaled per image from batch n
            sims.append({
                "link_gbps": gbps, "stages": s,
                "local_pipeline": sim_local_pipeline(local[n], act, n, s, args.epoch_steps,
                                                     gbps),
                "data_parallel": sim_data_parallel(local[max(1, n // s)], grad, s, gbps,
                                                   one_local),
                "data_parallel_linear": sim_data_parallel([t * max(1, n // s) / n
                                                           for t in local[n]], grad, s, gbps,
                                                          one_local),
                "backprop_gpipe": sim_gpipe(f, b, h, act, micro, s, k, gbps, one_bp),
                "backprop_gpipe_linear": sim_gpipe([t * per for t in fw], [t * per for t in bw],
                                                   head * per, act, micro, s, k, gbps, one_bp)})
    return {
        "config": {"rule": args.rule, "data_shape": list(SHAPES[args.data]), "net": args.net,
                   "width": args.width, "batch": n, "steps": args.steps,
                   "warmup": args.warmup, "reps": args.reps, "rounds": args.rounds,
                   "epoch_steps": args.epoch_steps,
                   "latency_s": LATENCY_S},
        "measured": measured,
        "block_seconds": {"local": {str(m): v for m, v in local.items()},
                          "bp_forward": {str(m): v[0] for m, v in bp.items()},
                          "bp_backward": {str(m): v[1] for m, v in bp.items()},
                          "bp_head": {str(m): v[2] for m, v in bp.items()}},
        "one_process_step_s": {"local": one_local, "backprop": one_bp},
        "activation_bytes_per_image": act, "gradient_bytes": grad,
        "simulated": sims,
        "timeline": {str(s["stages"]): timeline(s["local_pipeline"]["stage_seconds"])
                     for s in sims if s["link_gbps"] == args.link_gbps[0]},
        "references": {"SEDONA (ICLR 2021)": "up to 2.02x over backprop, total training time",
                       "Pipeline Forward-Forward (arXiv 2404.08573)":
                           "3.75x, MNIST, four-layer network, four nodes"},
        "provenance": provenance(t0),
    }


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        "# Pipelined and data-parallel local training",
        "",
        f"Written by `python -m benchmarks.pipeline`; method: that file's docstring. Rule "
        f"{c['rule']}, {c['net']} at width {c['width']:g} on {'x'.join(map(str, c['data_shape']))}"
        f" inputs, batch {c['batch']}, {c['steps']} timed steps after {c['warmup']}, median of "
        f"{c['rounds']} interleaved rounds; gloo on "
        f"CPU, load average {r['provenance']['machine']['loadavg_1min']} when measured (the "
        "machine is shared: the measured numbers are noisy).",
        "",
        "## Measured throughput",
        "",
        "| mode | processes x threads | images/s | vs one process, 1 thread |",
        "|---|---|---|---|",
    ]
    for m in r["measured"]:
        lines.append(f"| {m['mode']} | {m['processes']} x {m['threads_each']} | "
                     f"{m['images_per_s']:.1f} | {m['speedup_vs_one_thread']:.2f}x |")
    n = str(c["batch"])
    lines += ["", "## Per-block step times (one process, 1 thread, ms)", "",
              "| block | local step | BP forward | BP backward | activation KiB/image | "
              "gradient KiB |", "|---|---|---|---|---|---|"]
    bs = r["block_seconds"]
    for i, t in enumerate(bs["local"][n]):
        lines.append(f"| {i} | {1e3 * t:.1f} | {1e3 * bs['bp_forward'][n][i]:.1f} | "
                     f"{1e3 * bs['bp_backward'][n][i]:.1f} | "
                     f"{r['activation_bytes_per_image'][i] / 1024:.1f} | "
                     f"{r['gradient_bytes'][i] / 1024:.1f} |")
    lines += ["", f"One process: local step {1e3 * r['one_process_step_s']['local']:.0f} ms, "
              f"backprop step {1e3 * r['one_process_step_s']['backprop']:.0f} ms (InfoNCE head "
              f"{1e3 * bs['bp_head'][n]:.1f} ms).", "",
              "## Simulated speedups (from the per-block times above)", "",
              "Data parallel and GPipe run smaller batches per worker or micro-batch: "
              "`measured` takes the block times measured at that batch size (small batches "
              "run less efficiently), `linear` scales the batch-n times per image (the bound "
              "without that loss). Each against one process on the whole batch: local "
              "rule for the first three columns, backprop for GPipe.", "",
              "| link | stages / ranks | local pipeline (steady) | local pipeline (epoch of "
              f"{c['epoch_steps']} steps) | data parallel measured / linear | "
              "backprop GPipe measured / linear | GPipe bubble (linear) |",
              "|---|---|---|---|---|---|---|"]
    for s in r["simulated"]:
        lp, dp, gp = s["local_pipeline"], s["data_parallel"], s["backprop_gpipe"]
        dpl, gpl = s["data_parallel_linear"], s["backprop_gpipe_linear"]
        used = "" if lp["stages_used"] == s["stages"] else f" ({lp['stages_used']} used)"
        link = "compute only" if s["link_gbps"] <= 0 else f"{s['link_gbps']:g} Gb/s"
        lines.append(f"| {link} | {s['stages']}{used} | {lp['speedup_steady']:.2f}x | "
                     f"{lp['speedup_epoch']:.2f}x | {dp['speedup']:.2f}x / "
                     f"{dpl['speedup']:.2f}x | {gp['speedup']:.2f}x / {gpl['speedup']:.2f}x "
                     f"(K={gp['micro_batches']}) | {gpl['bubble']:.0%} |")
    lines += ["", "Reference points (quoted, other hardware and networks): SEDONA (ICLR 2021) "
              "up to 2.02x over backprop in total training time; Pipeline Forward-Forward "
              "(arXiv 2404.08573) 3.75x on MNIST, four-layer network, four nodes.", "",
              "## Local pipeline timeline (first 6 steps; digit = step)", ""]
    for s, rows in r["timeline"].items():
        lines += [f"{s} stages:", "", "```", *rows, "```", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rule", default="clapp++")
    ap.add_argument("--data", default="cifar10", choices=sorted(SHAPES))
    ap.add_argument("--net", default="vgg6")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epoch-steps", type=int, default=1562)  # CIFAR-10 at batch 32
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--link-gbps", type=float, nargs="+", default=[0.0, 10.0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    r = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(r, indent=1))
    (args.out / "results.md").write_text(markdown(r))
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
