"""Acceptance figures of the MCU / NPU presets (resnet8, dscnn, mobilenetv1-0.25,
mobilenetv2-0.35) at a reduced width, CLAPP++ throughout.

Per preset, four sections, each stamped with its provenance when measured:

  train     CLAPP++ trained on real data (CIFAR-10 32x32 for the image nets; MNIST 28x28 for
            dscnn, which takes any 2-D map), `--subset` images, `--epochs`, batch 64, the
            rule's default AdamW rate; edge's linear probe (all blocks) of the trained
            encoder beside the same encoder at its initialisation (`probe_accuracy`,
            `random_probe_accuracy` of `edge.app.train.train`), one row per seed
  memory    MemTracker peak of one AdamW step (benchmarks/memory.py), CLAPP++ against
            BP-InfoNCE in torch, same network, batch and views
  parity    from the trained checkpoint (seed 0) and real views: one fp32 step exported
            (`export.step.step_graph`) and run in onnxruntime (`export.runner.OnnxStepper`)
            against the torch step from the same state: relative L2 of the update over all
            parameters together, and of the optimizer state; the int8-w16 integer step
            (calibrated on real views) exported and run in onnxruntime against
            `quant.integer.integer_step_state` for `INT_STEPS` free-running steps: bit-exact
            or not, after each step
  simulate  `edge simulate --rule clapp++ --net NAME --width W --data D --target T --batch 2
            --max-batch --json` (and with `--quant int8-w16 --mode integer`) on stm32f746 and
            nrf52840, run as the command (a subprocess), its wall time recorded

plus `vgg6_memory`: the earlier figure that must still hold (VGG-6 x1/8, batch 32: CLAPP++ peak
step memory <= 0.5x backprop and <= 1.2x the physical floor).

    python -m benchmarks.presets [--presets resnet8,dscnn,mobilenetv1-0.25,mobilenetv2-0.35]
        [--seeds 0 1] [--subset 10000] [--epochs 1] [--data-dir ../shared/data]
        [--sections train,memory,parity,simulate] [--reuse same-code|any|none]

Writes benchmarks/results/presets/{results.json, results.md}; runs under runs/ (ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import code_digest, machine, provenance, run_id
from benchmarks.accuracy import REUSE

RESULTS = Path(__file__).parent / "results" / "presets"
# preset -> (data, width): reduced widths that train in minutes on 2 CPU cores
PRESETS = {"resnet8": ("cifar10", 0.5), "dscnn": ("mnist", 0.5),
           "mobilenetv1-0.25": ("cifar10", 0.5), "mobilenetv2-0.35": ("cifar10", 0.5)}
TARGETS = ("stm32f746", "nrf52840")
SECTIONS = ("train", "memory", "parity", "simulate")
PARITY_BATCH, INT_STEPS, MEMORY_BATCH, SIM_BATCH = 16, 3, 32, 2


def train_cfg(name: str, seed: int, a):
    from edge.app.config import TrainConfig

    data, width = a.presets[name]
    return TrainConfig(rule="clapp++", data=data, net=name, width=width, subset=a.subset,
                       epochs=a.epochs, batch_size=64, seed=seed)


def run_dir(a, name: str, seed: int) -> Path:
    return a.out / "runs" / f"{name}-s{seed}"


def train_section(name: str, a) -> dict:
    from edge.app.train import train

    rows = []
    for seed in a.seeds:
        cfg = train_cfg(name, seed, a)
        r = train(cfg, run_dir(a, name, seed), data_dir=a.data_dir, overwrite=True,
                  progress=False, probe=True)
        rows.append({"seed": seed, "probe_accuracy": r["probe_accuracy"],
                     "random_probe_accuracy": r["random_probe_accuracy"],
                     "gain_points": 100 * (r["probe_accuracy"] - r["random_probe_accuracy"]),
                     "final_loss": r["final_loss"], "history": r["history"],
                     "parameters": r["parameters"], "train_images": r["train_images"],
                     "seconds": r["seconds"]})
        print(f"  {name} seed {seed}: probe {r['probe_accuracy']:.4f} random "
              f"{r['random_probe_accuracy']:.4f} ({r['seconds']:.0f} s)", file=sys.stderr,
              flush=True)
    return {"config": {k: v for k, v in train_cfg(name, a.seeds[0], a).to_dict().items()
                       if k != "seed"}, "rows": rows}


def memory_section(name: str, a) -> dict:
    from benchmarks.memory import measure_preset
    from edge.app.commands.sim_sources import in_shape

    data, width = a.presets[name]
    rows = {r: measure_preset(name, in_shape(data), width, r, MEMORY_BATCH)
            for r in ("clapp++", "bp-infonce")}
    c, b = rows["clapp++"], rows["bp-infonce"]
    return {"batch": MEMORY_BATCH, "rows": list(rows.values()),
            "local_vs_backprop": c["peak_bytes"] / b["peak_bytes"],
            "local_vs_floor": c["peak_bytes"] / c["floor_bytes"]}


def _update_error(old: dict, got: dict, want: dict) -> float:
    """||(got - old) - (want - old)|| / ||want - old|| over all float tensors together."""
    keys = [k for k in want if want[k].is_floating_point() and k != "step"]
    d_got = torch.cat([(got[k] - old[k]).double().flatten() for k in keys])
    d_want = torch.cat([(want[k] - old[k]).double().flatten() for k in keys])
    return float((d_got - d_want).norm() / d_want.norm().clamp_min(1e-30))


def real_views(cfg, ds, n_batches: int, batch: int, seed: int = 7) -> list:
    from edge.data import two_views, view_config

    views = view_config(cfg.views or "edge", ds)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(ds.x_train.shape[0], generator=gen)[: n_batches * batch]
    return [two_views(ds.x_train[idx[i * batch:(i + 1) * batch]], gen, views, ds.mean, ds.std)
            for i in range(n_batches)]


def parity_section(name: str, a) -> dict:
    """fp32: one exported step vs torch from the trained state; integer: bit-exactness."""
    from edge import checkpoint
    from edge.app.train import make_rule, optim
    from edge.data import load
    from edge.nets import NetSpec

    cfg = train_cfg(name, a.seeds[0], a)
    src = run_dir(a, name, a.seeds[0])
    params, state, meta = checkpoint.load(src)
    net, rule, opt = NetSpec.from_dict(meta["net"]), make_rule(cfg), optim(cfg)
    rule.check(net)
    ds = load(cfg.data, a.data_dir, cfg.subset)
    views = real_views(cfg, ds, 1 + INT_STEPS, PARITY_BATCH)
    return step_parity(net, rule, opt, params, state, views,
                       f"{src.name} checkpoint (epoch {meta['epoch']})")


def step_parity(net, rule, opt, params: dict, state: dict, views: list, source: str) -> dict:
    """One fp32 step exported and run in onnxruntime vs torch from (params, state) on
    views[0]; the int8-w16 integer step calibrated on views[:2] from `params`, exported and
    run in onnxruntime vs `integer_step_state` for the remaining views (free-running)."""
    from edge.step import train_step
    from export.runner import OnnxStepper
    from export.step import fp32_program, integer_program, step_graph
    from quant.calibrate import make_plan
    from quant.engine import integer_default_lr
    from quant.integer import (
        integer_step_state,
        make_noise,
        noise_shapes,
        quantize_input,
        rule_state,
    )

    batch = int(views[0][0].shape[0])
    t0 = time.perf_counter()
    model, manifest = step_graph(net, rule, fp32_program(net, rule, opt), params, state, batch)
    export_s = time.perf_counter() - t0
    stepper = OnnxStepper.from_graphs(net, rule, opt, [model], [manifest.step])
    x1, x2 = views[0]
    p_o, s_o, m_o = stepper(params, state, x1, x2)
    p_t, s_t, m_t = train_step(net, rule, opt, params, state, x1, x2)
    fp32 = {"batch": batch, "from": source,
            "update_rel_l2_params": _update_error(params, p_o, p_t),
            "update_rel_l2_state": _update_error(state, s_o, s_t),
            "loss_onnx": float(m_o["loss"]), "loss_torch": float(m_t["loss"]),
            "nodes": len(model.graph.node), "export_seconds": round(export_s, 1)}
    enc = {k: v for k, v in params.items() if not k.startswith(("m.", "v."))}
    plan, stores = make_plan(net, rule, enc, views[:2], "int8-w16",
                             integer_default_lr(rule.name))
    form = rule.integer_form(net)
    program = integer_program(net, rule, plan, stores)
    istate = {"step": torch.zeros((), dtype=torch.int64), **rule_state(net, form, plan, stores)}
    t0 = time.perf_counter()
    imodel, iman = step_graph(net, rule, program, stores, istate, batch)
    iexport_s = time.perf_counter() - t0
    istepper = OnnxStepper.from_graphs(net, rule, None, [imodel], [iman.step], program=program)
    shapes, gen = noise_shapes(net, form, plan, stores), torch.Generator().manual_seed(5)
    q_t, s_t, q_o, s_o = stores, istate, stores, istate
    exact, moved = [], False
    for x1, x2 in views[1:]:
        q1, q2 = quantize_input(x1, plan.f_in), quantize_input(x2, plan.f_in)
        noise = make_noise(shapes, gen)
        q_t, s_t, m_t = integer_step_state(net, form, plan, q_t, s_t, q1, q2, noise)
        q_o, s_o, m_o = istepper(q_o, s_o, q1, q2, noise=noise)
        exact.append(all(torch.equal(q_o[k], q_t[k]) for k in q_t)
                     and all(torch.equal(s_o[k], s_t[k]) for k in s_t)
                     and float(m_o["loss"]) == float(m_t["loss"]))
        moved = moved or any(not torch.equal(q_t[k], stores[k]) for k in stores)
    integer = {"quant": "int8-w16", "batch": batch, "steps": len(views) - 1,
               "bit_exact_per_step": exact, "bit_exact": all(exact), "stores_moved": moved,
               "nodes": len(imodel.graph.node), "export_seconds": round(iexport_s, 1)}
    return {"fp32": fp32, "integer": integer}


def simulate_cmd(name: str, a, target: str, quant: bool) -> list[str]:
    data, width = a.presets[name]
    cmd = ["edge", "simulate", "--rule", "clapp++", "--net", name, "--width", f"{width:g}",
           "--data", data, "--target", target, "--batch", str(SIM_BATCH), "--max-batch",
           "--json"]
    return cmd + (["--quant", "int8-w16", "--mode", "integer"] if quant else [])


def simulate_section(name: str, a) -> dict:
    exe = Path(sys.executable).parent / "edge"
    rows = []
    for target in TARGETS:
        for quant in (False, True):
            cmd = simulate_cmd(name, a, target, quant)
            t0 = time.perf_counter()
            res = subprocess.run([str(exe), *cmd[1:]], capture_output=True, text=True,
                                 timeout=3600)
            wall = round(time.perf_counter() - t0, 1)
            row: dict[str, Any] = {"target": target, "step": "int8-w16 integer" if quant
                                   else "fp32", "command": " ".join(cmd), "wall_s": wall}
            if res.returncode != 0:
                row["error"] = (res.stderr.strip().splitlines() or ["?"])[-1]
            else:
                d = json.loads(res.stdout)
                sram = next(t for t in d["tiers"] if t["kind"] == "sram")
                row.update({k: d.get(k) for k in (
                    "fits", "peak_bytes", "arena_bytes", "lower_bound_bytes",
                    "persistent_onchip_bytes", "max_batch", "backprop_peak_bytes",
                    "backprop_fits", "local_vs_backprop_peak", "total_bytes")},
                    sram_usable=sram["usable"], peak_op=d["peak_op"].get("name"))
            rows.append(row)
            print(f"  {name} {target} {row['step']}: max batch {row.get('max_batch')} "
                  f"({wall} s)", file=sys.stderr, flush=True)
    return {"batch": SIM_BATCH, "rows": rows}


def vgg6_memory_section() -> dict:
    from benchmarks import memory

    res = memory.run(["clapp++", "bp-infonce", "bp-clapp++"], batch=32, width=0.125)
    rows = {r["rule"]: r for r in res["rows"]}
    c = rows["clapp++"]
    res["local_vs_backprop"] = c["peak_bytes"] / rows["bp-infonce"]["peak_bytes"]
    res["local_vs_floor"] = c["peak_bytes"] / c["floor_bytes"]
    res["goals"] = {"local_vs_backprop": ("<=", 0.5), "local_vs_floor": ("<=", 1.2)}
    return res


FNS = {"train": train_section, "memory": memory_section, "parity": parity_section,
       "simulate": simulate_section}


def _reusable(old: dict | None, reuse: str) -> bool:
    if not old or "error" in old:
        return False
    return reuse == "any" or (reuse == "same-code" and old.get("provenance", {}).get(
        "code_digest") == code_digest())


# ------------------------------------------------------------------ report
def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.2f} MiB"


def _kib(b: float | None) -> str:
    return "-" if b is None else f"{b / 1024:.1f} KiB"


def _stamp(p: dict | None, status: str) -> str:
    if not p:
        return status
    return (f"{status} — run {p['run']}, {p['measured']}, commit {(p['commit'] or '?')[:10]}"
            f"{' (tree modified)' if p['tree_modified'] else ''}, load "
            f"{p['machine']['loadavg_1min']}, {p.get('seconds', 0) / 60:.1f} min")


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Presets: CLAPP++ on the MCU / NPU networks (issue 13 acceptance)", "",
             f"This run: {res['run']}, `{res['command']}` (reuse `{res['reuse']}`); "
             f"{m['processor']}, {m['cpus']} CPUs, torch {m['torch']}, onnxruntime "
             f"{m['onnxruntime']}; {m['date']}; {res.get('seconds', 0) / 60:.0f} min in all. "
             "Each section says below whether it was measured in this run or reused.", ""]
    if v := res.get("vgg6_memory"):
        st = res["status"].get("vgg6_memory", "")
        rows = {r["rule"]: r for r in v["rows"]}
        lines += ["## VGG-6 x1/8, batch 32: peak step memory (MemTracker)", "",
                  _stamp(v.get("provenance"), st), "",
                  "| rule | peak | transient | parameters+state | floor |", "|---|---|---|---|---|"]
        for r in v["rows"]:
            lines.append(f"| {r['rule']} | {_mib(r['peak_bytes'])} | {_mib(r['transient_bytes'])}"
                         f" | {_mib(r['persistent_bytes'])} | {_mib(r['floor_bytes'])} |")
        lb, lf = v["local_vs_backprop"], v["local_vs_floor"]
        lines += ["", f"CLAPP++ / BP-InfoNCE peak: {lb:.3f} (goal <= 0.5: "
                  f"{'met' if lb <= 0.5 else 'missed'}); CLAPP++ / floor: {lf:.3f} (goal <= 1.2: "
                  f"{'met' if lf <= 1.2 else 'missed'}); clapp++ peak "
                  f"{_mib(rows['clapp++']['peak_bytes'])}.", ""]
    for name, secs in res["presets"].items():
        data, width = res["config"]["presets"][name]
        lines += [f"## {name} x{width:g} ({data})", ""]
        st = res["status"].get(name, {})
        for s in SECTIONS:
            if s in secs:
                lines.append(f"- {s}: {_stamp(secs[s].get('provenance'), st.get(s, '?'))}"
                             + (f" — **failed**: {secs[s]['error']}" if "error" in secs[s]
                                else ""))
        lines.append("")
        if (t := secs.get("train")) and "error" not in t:
            c = t["config"]
            lines += [f"Training: {c['subset'] or 'all'} {c['data']} training images, "
                      f"{c['epochs']} epoch(s), batch {c['batch_size']}, AdamW at the rule's "
                      "default rate; probe on all blocks (edge.probe).", "",
                      "| seed | probe, trained (%) | probe, random encoder (%) | gain (points) "
                      "| final loss | train + probe s |", "|---|---|---|---|---|---|"]
            for r in t["rows"]:
                lines.append(f"| {r['seed']} | {100 * r['probe_accuracy']:.2f} | "
                             f"{100 * r['random_probe_accuracy']:.2f} | {r['gain_points']:+.2f}"
                             f" | {r['final_loss']:.4f} | {r['seconds']:.0f} |")
            lines.append("")
        if (mem := secs.get("memory")) and "error" not in mem:
            rows = {r["rule"]: r for r in mem["rows"]}
            lines += [f"Peak step memory, torch, batch {mem['batch']} (MemTracker): CLAPP++ "
                      f"{_mib(rows['clapp++']['peak_bytes'])}, BP-InfoNCE "
                      f"{_mib(rows['bp-infonce']['peak_bytes'])}: local / backprop "
                      f"{mem['local_vs_backprop']:.3f}; local / floor "
                      f"{mem['local_vs_floor']:.3f}.", ""]
        if (par := secs.get("parity")) and "error" not in par:
            f, i = par["fp32"], par["integer"]
            lines += [f"Exported-step parity (batch {f['batch']}, from the {f['from']}, real "
                      f"views): fp32 onnxruntime vs torch, relative L2 of the update "
                      f"{f['update_rel_l2_params']:.1e} (parameters), "
                      f"{f['update_rel_l2_state']:.1e} (optimizer state), loss "
                      f"{f['loss_onnx']:.6g} vs {f['loss_torch']:.6g}; int8-w16 integer step "
                      f"bit-exact: **{'yes' if i['bit_exact'] else 'no'}** ({i['steps']} "
                      f"free-running steps, per step {i['bit_exact_per_step']}, stores moved: "
                      f"{i['stores_moved']}).", ""]
        if (sim := secs.get("simulate")) and "error" not in sim:
            lines += [f"`edge simulate` (batch {sim['batch']}, in-place bindings):", "",
                      "| target | step | SRAM usable | peak | arena | fits | largest batch that "
                      "fits | backprop peak (SGD, same net) | wall s |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for r in sim["rows"]:
                if "error" in r:
                    lines.append(f"| {r['target']} | {r['step']} | error: {r['error']} |"
                                 " | | | | | |")
                    continue
                mb = r["max_batch"] if r["max_batch"] is not None else "none (2 does not)"
                lines.append(f"| {r['target']} | {r['step']} | {_kib(r['sram_usable'])} | "
                             f"{_kib(r['peak_bytes'])} | {_kib(r['arena_bytes'])} | "
                             f"{'yes' if r['fits'] else 'no'} | {mb} | "
                             f"{_kib(r['backprop_peak_bytes'])} | {r['wall_s']} |")
            lines += ["", "Command per row: `" + sim["rows"][0]["command"] + "` (target and "
                      "`--quant int8-w16 --mode integer` varied).", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--widths", default=None,
                    help="comma list of widths, one per preset (default: PRESETS)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--data-dir", default=None, help="data root (else $EDGE_DATA)")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--no-vgg6", action="store_true", help="skip the VGG-6 memory figure")
    ap.add_argument("--reuse", default="same-code", choices=REUSE)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite results.md from results.json; measure nothing")
    a = ap.parse_args(argv)
    if a.report_only:
        res = json.loads((a.out / "results.json").read_text())
        (a.out / "results.md").write_text(markdown(res))
        return res
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    names = a.presets.split(",")
    widths = [float(w) for w in a.widths.split(",")] if a.widths else [PRESETS[n][1]
                                                                      for n in names]
    a.presets = {n: (PRESETS[n][0], w) for n, w in zip(names, widths, strict=True)}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "results.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    res: dict = {"run": run_id(), "command": "python -m benchmarks.presets " + " ".join(
        sys.argv[1:] if argv is None else argv), "reuse": a.reuse, "machine": machine(),
        "config": {"presets": a.presets, "seeds": a.seeds, "subset": a.subset,
                   "epochs": a.epochs, "targets": TARGETS}, "presets": {}, "status": {}}
    t0 = time.perf_counter()

    def save() -> None:
        res["seconds"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(res, indent=1, default=str))
        (a.out / "results.md").write_text(markdown(res))

    def run(key: tuple[str, ...], fn, config: Any) -> None:
        """One section: reused if the old one had the same config and `--reuse` allows."""
        prev = old
        for k in key:
            prev = (prev or {}).get(k)
        here = res
        for k in key[:-1]:
            here = here.setdefault(k, {})
        status = res["status"]
        for k in key[1:-1] if key[0] == "presets" else key[:-1]:
            status = status.setdefault(k, {})
        if _reusable(prev, a.reuse) and prev.get("section_config") == config:
            here[key[-1]] = prev
            status[key[-1]] = f"reused from run {prev['provenance']['run']}"
            print(f"{'/'.join(key)}: reused", file=sys.stderr, flush=True)
            return
        print(f"[{time.perf_counter() - t0:6.0f} s] {'/'.join(key)} ...", file=sys.stderr,
              flush=True)
        s0 = time.perf_counter()
        try:
            data = fn()
        except Exception as e:  # one failing section must not lose the others
            import traceback

            traceback.print_exc()
            data = {"error": f"{type(e).__name__}: {e}"}
        data["section_config"] = config
        data["provenance"] = provenance(s0)
        here[key[-1]] = data
        status[key[-1]] = "failed" if "error" in data else "measured in this run"
        save()

    if not a.no_vgg6:
        run(("vgg6_memory",), vgg6_memory_section, {"net": "vgg6", "width": 0.125, "batch": 32})
    sections = a.sections.split(",")
    for name in names:
        res["presets"].setdefault(name, {})
        base = {"preset": name, "data": a.presets[name][0], "width": a.presets[name][1]}
        train_conf = {**base, "seeds": a.seeds, "subset": a.subset, "epochs": a.epochs}
        for s in sections:
            conf = train_conf if s in ("train", "parity") else base
            run(("presets", name, s), lambda s=s, name=name: FNS[s](name, a), conf)
    save()
    sys.stdout.write((a.out / "results.md").read_text())
    return res


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
