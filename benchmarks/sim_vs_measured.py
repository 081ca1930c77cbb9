"""Simulated peak memory of the exported fp32 training step vs what onnxruntime uses running it.

    python benchmarks/sim_vs_measured.py [--quick]
        -> benchmarks/results/sim_vs_measured/{results.json, results.md}

How it is measured (`measure`): every graph and setting runs in a fresh Python process that
imports only numpy and onnxruntime (CPU execution provider, one thread, sequential), with

* `enable_cpu_mem_arena=False`: ORT's allocations go straight to malloc and free (with the
  arena on, ORT keeps freed chunks and the peak says little about the graph);
* glibc told to serve every allocation >= 16 KiB by its own mmap and to give freed memory back
  (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, one malloc arena), so the resident set
  rises and falls with the tensors that are live, to the page;
* every graph input (parameters, optimizer state, views) preallocated and bound with
  IOBinding, the outputs left for ORT to allocate when their node runs (the previous run's
  dropped first), so the process's extra memory during a run is what ORT allocates: outputs,
  intermediate tensors and kernel scratch (im2col ...);
* per run: `malloc_trim(0)`, read VmRSS, reset the high-water mark (`echo 5 >
  /proc/self/clear_refs`), run, read VmHWM. The first run (which builds the memory pattern,
  when on) is reported apart; `measured_delta` = max over the next runs of VmHWM - VmRSS.

Graph optimizations off (`ORT_DISABLE_ALL`): ORT runs the nodes of the file, so the simulator
and ORT see the same tensors. Settings (`SETTINGS`), all with the arena off:

* ORT defaults: ORT sorts the nodes itself (its DEFAULT execution order need not be the file's),
  its planner reuses a dead buffer for a later tensor of the same size, keeping it allocated
  in between (`enable_mem_reuse`), and plans one block for all intermediates
  (`enable_mem_pattern`), so its peak can exceed the most bytes live at once;
* file order: `ExecutionOrder.PRIORITY_BASED` runs the nodes as listed (`ort_keeps_file_order`
  checks it against the profiler), the order the simulator and a device runtime use;
* no buffer reuse (`enable_mem_reuse` and the pattern off): each tensor is allocated by its
  producer and freed after its last reader: the simulator's model of memory, the like-with-like
  setting (`LIKE_WITH_LIKE`, in file order).

What is compared, like with like:

* `sim_peak`: the simulator's peak for the step on a device with one big SRAM, with every
  graph input held by the caller (persistent: parameters, state and the views), outputs and
  intermediates in the arena, Reshape-like ops as views (`alias_views`, as ORT runs them), no
  in-place updates (ORT writes new outputs), nodes in the order ORT ran them (read off ORT's
  profiler), vs `measured_total` = input bytes + `measured_delta`. Ratio `ratio_peak`; the
  goal is within 25%. `ratio_peak_file_order`: the simulator's answer for the file as is.
* `sim_transient` (the arena) vs `measured_delta`: only what the run allocates.

The simulator counts no kernel scratch (im2col buffers and the like) and none of ORT's buffer
reuse: the activation ratio under each setting shows how much those weigh.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "sim_vs_measured"
CHILD_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(16 << 10),
    "MALLOC_TRIM_THRESHOLD_": "0",
    "MALLOC_ARENA_MAX": "1",
    "OMP_NUM_THREADS": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
}
GOAL = 0.25

# --- the child process: numpy + onnxruntime only ------------------------------------------

_NP_OF = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64",
    "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(bool)": "bool", "tensor(float16)": "float16",
}  # fmt: skip


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _session_options(mem_pattern: bool, optimize: bool, profile: str | None = None,
                     reuse: bool = True, order: str = "default", arena: bool = False,
                     prepack: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.enable_mem_pattern = mem_pattern
    so.enable_mem_reuse = reuse
    so.execution_order = getattr(ort.ExecutionOrder, order.upper())
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )  # fmt: skip
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return so


def _inputs(sess, seed: int = 0):
    """IOBinding with every input preallocated (numpy, pages touched); outputs left to ORT."""
    import numpy as np

    rng = np.random.default_rng(seed)
    io = sess.io_binding()
    keep = []
    for v in sess.get_inputs():
        dtype = np.dtype(_NP_OF[v.type])
        if dtype.kind == "f":
            arr = np.asarray(0.1 * rng.standard_normal(v.shape), dtype)
        else:
            arr = np.zeros(v.shape, dtype)
        keep.append(arr)
        io.bind_cpu_input(v.name, arr)
    _bind_outputs(sess, io)
    return io, keep, sum(a.nbytes for a in keep)


def _bind_outputs(sess, io) -> None:
    io.clear_binding_outputs()  # drops the previous run's outputs
    for v in sess.get_outputs():
        io.bind_output(v.name, "cpu")  # ORT allocates each output when its node runs


def child_measure(path: str, mem_pattern: bool, optimize: bool, repeats: int, reuse: bool,
                  order: str, arena: bool = False, prepack: bool = True) -> dict[str, Any]:
    """Peak extra resident memory of one run (see the module docstring)."""
    import ctypes

    import onnxruntime as ort

    libc = ctypes.CDLL("libc.so.6")
    rss0 = _status("VmRSS")
    so = _session_options(mem_pattern, optimize, reuse=reuse, order=order, arena=arena,
                          prepack=prepack)
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    io, keep, bound = _inputs(sess)
    deltas, seconds = [], 0.0
    for _ in range(repeats + 1):  # the first run builds the memory pattern: reported apart
        _bind_outputs(sess, io)
        libc.malloc_trim(0)
        base = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        t = time.perf_counter()
        sess.run_with_iobinding(io)
        seconds = time.perf_counter() - t
        deltas.append(_status("VmHWM") - base)
    first, deltas = deltas[0], deltas[1:]
    del keep
    return {"measured_delta": max(deltas), "deltas": deltas, "first_run_delta": first,
            "input_bytes": bound, "session_rss": base - rss0, "run_seconds": seconds}


def child_order(path: str, optimize: bool, order: str) -> dict[str, Any]:
    """Node names in the order ORT ran them (its profiler's Node events)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = _session_options(False, optimize, profile=str(Path(tmp) / "prof"), order=order)
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        io, keep, _ = _inputs(sess)  # keep: the bound buffers must outlive the run
        sess.run_with_iobinding(io)
        del keep
        events = json.loads(Path(sess.end_profiling()).read_text())
    nodes = sorted((e for e in events if e.get("cat") == "Node"
                    and e.get("name", "").endswith("_kernel_time")), key=lambda e: e["ts"])
    return {"order": [e["name"][: -len("_kernel_time")] for e in nodes]}


def _child_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["measure", "order"])
    p.add_argument("path")
    p.add_argument("--mem-pattern", type=int, default=0)
    p.add_argument("--optimize", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-reuse", type=int, default=1)
    p.add_argument("--order", default="default")
    p.add_argument("--arena", type=int, default=0)
    p.add_argument("--prepack", type=int, default=1)
    a = p.parse_args(argv)
    if a.what == "measure":
        out = child_measure(a.path, bool(a.mem_pattern), bool(a.optimize), a.repeats,
                            bool(a.mem_reuse), a.order, bool(a.arena), bool(a.prepack))
    else:
        out = child_order(a.path, bool(a.optimize), a.order)
    print(json.dumps(out))


def _spawn(args: list[str], timeout: float = 600, env_extra: dict | None = None
           ) -> dict[str, Any]:
    env = {**os.environ, **CHILD_ENV, **(env_extra or {})}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode:
        raise RuntimeError(f"child {args} failed: {res.stderr.strip()[-400:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(path: str | Path, *, mem_pattern: bool, optimize: bool = False, repeats: int = 3,
            reuse: bool = True, order: str = "default", arena: bool = False,
            prepack: bool = True, env: dict | None = None) -> dict[str, Any]:
    """Measure one graph file in a fresh process (see the module docstring); `env` replaces
    CHILD_ENV's entries (e.g. glibc's allocation thresholds)."""
    return _spawn(["measure", str(path), "--mem-pattern", str(int(mem_pattern)),
                   "--optimize", str(int(optimize)), "--repeats", str(repeats),
                   "--mem-reuse", str(int(reuse)), "--order", order, "--arena",
                   str(int(arena)), "--prepack", str(int(prepack))], env_extra=env)


def ort_order(path: str | Path, optimize: bool = False, order: str = "default") -> list[str]:
    """Node names in the order ORT executes them (`order`: its ExecutionOrder setting)."""
    return _spawn(["order", str(path), "--optimize", str(int(optimize)), "--order", order])["order"]


# --- the parent: graphs, simulation, comparison --------------------------------------------


@contextlib.contextmanager
def unreordered() -> Iterator[None]:
    """Export without the memory-aware node order (export.reorder), to compare before/after."""
    import export.passes as passes

    original = passes.reorder_for_memory
    passes.reorder_for_memory = lambda m: m
    try:
        yield
    finally:
        passes.reorder_for_memory = original


CASES = [("digits", "digits", "digits", 1.0, 32), ("vgg6 x1/8", "cifar10", "vgg6", 0.125, 8),
         ("vgg6 x1/8", "cifar10", "vgg6", 0.125, 32)]


def step_graphs(data: str, net_name: str, width: float, batch: int, per_block: bool,
                rule_name: str = "clapp++") -> list[tuple[str, Any, dict[str, Any]]]:
    """(part, model, manifest view): the whole fp32 step and, if `per_block`, every block's
    graph, exported as `edge export` does (AdamW at lr 1e-3)."""
    from edge.app.commands.sim_sources import in_shape
    from edge.app.config import TrainConfig
    from edge.app.train import build
    from edge.optim import OptimConfig
    from edge.step import init_state
    from export.step import block_graphs, fp32_program, step_graph

    cfg = TrainConfig(rule=rule_name, data=data, net=net_name, width=width)
    net, rule, params = build(cfg, in_shape(data))
    opt = OptimConfig("adamw", lr=1e-3)
    state = init_state(net, rule, opt, params)
    program = fp32_program(net, rule, opt)
    model, man = step_graph(net, rule, program, params, state, batch)
    out = [("whole step", model, man.step.memory_view())]
    if per_block:
        models, ios = block_graphs(net, rule, program, params, state, batch)
        out += [(f"layer {i}", m, io.memory_view())
                for i, (m, io) in enumerate(zip(models, ios, strict=True))]
    return out


def build_graphs(quick: bool = False) -> list[dict[str, Any]]:
    """(name, model, manifest view) for each graph compared, as exported, both node orders."""
    out = []
    for label, data, net_name, width, batch in CASES[:1] if quick else CASES:
        for order in ("exported", "reordered"):
            ctx = unreordered() if order == "exported" else contextlib.nullcontext()
            with ctx:
                for part, model, view in step_graphs(data, net_name, width, batch, batch == 32):
                    out.append({"graph": f"{label} b{batch} {part}", "order": order,
                                "model": model, "manifest": view})
    return out


def in_order(model: Any, names: list[str]) -> Any | None:
    """The model with its nodes listed in `names` order, or None if names do not match."""
    import onnx

    by_name = {n.name: n for n in model.graph.node}
    if len(by_name) != len(model.graph.node) or sorted(names) != sorted(by_name):
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(by_name[n] for n in names)
    return out


def simulated(model: Any, manifest: dict[str, Any]) -> dict[str, int]:
    """The simulator's figures for ORT's setting (see the module docstring): every graph input
    is the caller's (persistent: parameters, state and the views alike), outputs and
    intermediates are the arena, Reshape-like ops are views, no in-place updates."""
    from edge.sim.onnx_graph import GraphOptions
    from edge.sim.simulate import SimOptions, simulate
    from targets import MemoryTier, Target

    big = Target("measurement", "one flat memory", (MemoryTier("ram", "sram", 1 << 40),),
                 ("fp32",))
    inits = {t.name for t in model.graph.initializer}
    caller = [i.name for i in model.graph.input if i.name not in inits]
    held = {**manifest, "param_names": sorted(set(manifest.get("param_names", [])) |
                                              (set(caller) - set(manifest.get("state_names", []))))}
    gopts = GraphOptions.from_manifest(held, alias_views=True)
    report = simulate(model, big, SimOptions(persistent="sram", inplace=False, graph=gopts))
    return {"sim_peak": report.peak_bytes, "sim_transient": report.arena_bytes,
            "sim_transient_lower_bound": report.lower_bound_bytes,
            "sim_inputs": report.persistent_onchip_bytes}


# (label, ORT execution order, enable_mem_reuse, enable_mem_pattern); the arena is always off
SETTINGS = (
    ("ORT defaults", "default", True, True),
    ("ORT defaults, no mem pattern", "default", True, False),
    ("file order", "priority_based", True, True),
    ("no buffer reuse, ORT order", "default", False, False),
    ("no buffer reuse, file order", "priority_based", False, False),
)
LIKE_WITH_LIKE = "no buffer reuse, file order"


def compare_one(g: dict[str, Any], tmp: Path, repeats: int) -> list[dict[str, Any]]:
    """Every setting of `SETTINGS` for one graph: measured vs simulated, in ORT's order."""
    import onnx

    path = tmp / "g.onnx"
    onnx.save(g["model"], str(path))
    file_names = [n.name for n in g["model"].graph.node]
    file_sim = simulated(g["model"], g["manifest"])
    sims: dict[str, tuple[dict[str, int], bool]] = {}
    for order in ("default", "priority_based"):
        names = ort_order(path, order=order)
        ort_model = in_order(g["model"], names)
        sims[order] = ((simulated(ort_model, g["manifest"]) if ort_model is not None
                        else file_sim), names == file_names)
    rows = []
    for label, order, reuse, pattern in SETTINGS:
        m = measure(path, mem_pattern=pattern, reuse=reuse, order=order, repeats=repeats)
        sim, keeps = sims[order]
        total = m["input_bytes"] + m["measured_delta"]
        rows.append({
            "graph": g["graph"], "node_order": g["order"], "setting": label,
            "execution_order": order, "mem_reuse": reuse, "mem_pattern": pattern,
            "nodes": len(file_names), "ort_keeps_file_order": keeps, **m,
            "measured_total": total,
            "sim_peak": sim["sim_peak"], "sim_peak_file_order": file_sim["sim_peak"],
            "sim_transient": sim["sim_transient"],
            "sim_transient_lower_bound": sim["sim_transient_lower_bound"],
            "ratio_peak": sim["sim_peak"] / total,
            "ratio_peak_file_order": file_sim["sim_peak"] / total,
            "ratio_transient": sim["sim_transient"] / max(m["measured_delta"], 1),
            "within_goal": abs(sim["sim_peak"] / total - 1) <= GOAL,
        })
    return rows


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.2f}"


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for label, *_ in SETTINGS:
        for order in ("exported", "reordered"):
            rs = [r for r in rows if r["setting"] == label and r["node_order"] == order]
            if not rs:
                continue
            ratios = [r["ratio_peak"] for r in rs]
            out.append({"setting": label, "node_order": order, "graphs": len(rs),
                        "ratio_min": min(ratios), "ratio_max": max(ratios),
                        "within_goal": sum(r["within_goal"] for r in rs)})
    return out


def write_markdown(result: dict[str, Any], path: Path) -> None:
    rows = result["rows"]
    lines = [
        "# Simulated vs measured step memory (onnxruntime CPU, memory arena off)",
        "",
        "Written by `python benchmarks/sim_vs_measured.py`; the method (fresh process, arena "
        "off, IOBinding, VmHWM) and what is compared: that file's docstring. MiB. "
        "`measured` = the bound inputs + ORT's extra resident memory during the run (outputs, "
        "intermediates, scratch); `sim` = the simulator's peak for the nodes in the order ORT "
        "ran them (inputs held by the caller, views aliased, no in-place updates); `extra` vs "
        "`arena`: the part the run allocates. Goal: sim within 25% of "
        f"measured. onnxruntime {result['onnxruntime']}.",
        "",
        "| setting | node order | graphs | sim / measured, min-max | within 25% |",
        "|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        lines.append(f"| {s['setting']} | {s['node_order']} | {s['graphs']} "
                     f"| {s['ratio_min']:.3f} - {s['ratio_max']:.3f} "
                     f"| {s['within_goal']} of {s['graphs']} |")
    lines += ["", "| graph | node order | setting | measured | sim | ratio | measured extra "
              "| sim arena | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['graph']} | {r['node_order']} | {r['setting']} | {_mib(r['measured_total'])} "
            f"| {_mib(r['sim_peak'])} | {r['ratio_peak']:.3f} | {_mib(r['measured_delta'])} "
            f"| {_mib(r['sim_transient'])} | {r['ratio_transient']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="digits only")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    import onnxruntime

    t0 = time.time()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for g in build_graphs(a.quick):
            new = compare_one(g, Path(tmp), a.repeats)
            rows.extend(new)
            for r in new:
                print(f"{r['graph']:26s} {r['node_order']:9s} {r['setting']:28s} measured "
                      f"{_mib(r['measured_total'])} sim {_mib(r['sim_peak'])} ratio "
                      f"{r['ratio_peak']:.3f}", flush=True)
    result = {"onnxruntime": onnxruntime.__version__, "child_env": CHILD_ENV, "goal": GOAL,
              "like_with_like": LIKE_WITH_LIKE, "summary": summarize(rows), "rows": rows,
              "seconds": round(time.time() - t0, 1)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, a.out / "results.md")
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child_main(sys.argv[2:])
    else:
        main()
