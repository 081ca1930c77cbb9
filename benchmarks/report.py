"""results.json -> results.md (tables, goals met or missed with the gap) and PNG plots."""

from __future__ import annotations

from pathlib import Path

GOALS = {
    "accuracy_ratio": (">=", 1.00, "best local / BP-InfoNCE probe accuracy (all layers)"),
    "accuracy_ratio_adam_probe": (">=", 1.00, "the same with the Adam probe (the paper's kind)"),
    "memory_ratio": ("<=", 0.5, "local / backprop peak step memory, batch 32, 6 layers"),
    "memory_floor_ratio": ("<=", 1.2, "local peak / physical floor"),
    "speed_ratio_local_vs_bp": (">=", 1.0, "local / backprop samples per second, torch"),
    "speed_ratio_onnxruntime_vs_torch": (">=", 1.0, "exported step in onnxruntime / torch eager"),
    "quant_gap_points": ("<=", 1.0, "fp32 - int8-w16 integer CLAPP++ probe, points"),
}


def _mb(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


def _pct(s: dict) -> str:
    return f"{100 * s['mean']:.2f} [{100 * s['min']:.2f}-{100 * s['max']:.2f}]"


def _stamp(prov: dict | None) -> str:
    if not prov:
        return "no provenance recorded"
    m = prov.get("machine", {})
    commit = (prov.get("commit") or "?")[:10]
    mod = " (tree modified)" if prov.get("tree_modified") else ""
    secs = f", {prov['seconds'] / 60:.1f} min" if prov.get("seconds") is not None else ""
    return (f"run {prov['run']}, {prov['measured']}, {m.get('processor', '?')} "
            f"{m.get('cpus', '?')} CPUs, torch {m.get('torch', '?')}, onnxruntime "
            f"{m.get('onnxruntime', '?')}, load {m.get('loadavg_1min', '?')}, commit "
            f"{commit}{mod}{secs}")


def provenance_lines(res: dict) -> list[str]:
    """Which figures this run measured and which it took from earlier runs (and whose)."""
    status = res.get("status", {})
    measured = [k for k, s in status.items() if s["status"] == "measured"]
    reused = [k for k, s in status.items() if s["status"] == "reused"]
    failed = [k for k, s in status.items() if s["status"] == "failed"]
    lines = ["## What this run measured", ""]
    if not measured and reused:
        lines.append("**This run measured nothing: every figure below is reused from an "
                     "earlier run.**")
    else:
        lines.append(f"Measured in this run: {', '.join(measured) or 'nothing'}. Reused from "
                     f"earlier runs: {', '.join(reused) or 'nothing'}."
                     + (f" Failed: {', '.join(failed)}." if failed else ""))
    lines += ["", "| section | status | provenance |", "|---|---|---|"]
    for name, st in status.items():
        data = res["sections"].get(name) or {}
        if st["status"] in ("measured", "reused"):
            what = _stamp(data.get("provenance")) if data.get("provenance") else st.get("note")
            if st["status"] == "reused" and st.get("same_code") is False:
                what += "; other code than this run's"
        elif st["status"] == "failed":
            what = st["error"]
        else:
            what = "-"
        lines.append(f"| {name} | {st['status']} | {what} |")
    acc = res["sections"].get("accuracy") or {}
    if acc.get("reused_runs"):
        lines += ["", f"The accuracy section reused {len(acc['reused_runs'])} trained run(s) "
                  f"from earlier runs: {', '.join(acc['reused_runs'])}."]
    return lines + [""]


def _good(res: dict) -> dict:
    return {k: v for k, v in res["sections"].items() if "error" not in v}


def _tag(res: dict, name: str) -> str:
    st = res.get("status", {}).get(name, {})
    if st.get("status") == "reused":
        return f" (reused from run {st.get('run') or 'unknown'}, {st.get('measured') or '?'})"
    return " (measured in this run)" if st.get("status") == "measured" else ""


def markdown(res: dict) -> str:
    m, sec = res["machine"], _good(res)
    lines = [
        f"# edge benchmarks: `{res['profile']}`",
        "",
        f"This run: {res.get('run', '?')}, `{res.get('command', '?')}` (reuse policy "
        f"`{res.get('reuse', '?')}`); {m['processor']}, {m['cpus']} CPUs, torch "
        f"{m['torch']}, onnxruntime {m['onnxruntime']}, {m['threads']} threads; {m['date']}; "
        f"{res.get('seconds', 0) / 60:.0f} min in all.",
        "",
        *provenance_lines(res),
    ]
    if "headline" in res:
        src = res.get("headline_sources", {})
        lines += ["## Goals", "", "| figure | measured | goal | met | section |",
                  "|---|---|---|---|---|"]
        for key, (op, goal, what) in GOALS.items():
            v = res["headline"].get(key)
            where = src.get(key) or "-"
            if v is None:
                lines.append(f"| {what} | not measured | {op} {goal} | - | {where} |")
                continue
            met = v >= goal if op == ">=" else v <= goal
            lines.append(f"| {what} | {v:.3f} | {op} {goal} | {'yes' if met else 'no'} "
                         f"| {where} |")
        lines += ["", f"Best local rule: `{res['headline']['best_local_rule']}`. The section "
                  "column says whether a figure was measured in this run or reused.", ""]
    if acc := sec.get("accuracy"):
        c = acc["config"]
        lines += [
            "## Linear-probe accuracy (%)" + _tag(res, "accuracy"),
            "",
            f"{c['data']}, {c['net']} x{c['width']}, {c['epochs']} epochs, batch "
            f"{c['batch_size']}, {'all' if not c['subset'] else c['subset']} training "
            f"images; mean [min-max] over seeds {acc['seeds']}.",
            "",
            "| encoder | probe: all layers | probe: last layer | Adam probe: all layers "
            "| train s | alignment per layer |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in acc["summary"].items():
            secs = f"{s['seconds_mean']:.0f}" if "seconds_mean" in s else "-"
            al = " ".join(f"{a:+.3f}" for a in s["alignment"]) if s.get("alignment") else "-"
            adam = _pct(s["all_adam"]) if "all_adam" in s else "n/m"
            lines.append(f"| {name} | {_pct(s['all'])} | {_pct(s['last'])} | {adam} | {secs} "
                         f"| {al} |")
        lines += ["", "Probes (edge.probe): edge's L-BFGS probe on all layers and on the last; "
                  "the Adam probe is the paper's kind (a linear layer, Adam, fixed epochs, raw "
                  "features). Alignment: cosine between the rule's update of each layer's "
                  "weights and the BP-InfoNCE gradient of the same batch, mean over the "
                  "measured batches and seeds (local rules only).", ""]
    if mem := sec.get("memory"):
        lines += [
            "## Peak memory of one step (measured, MemTracker)" + _tag(res, "memory"),
            "",
            f"{mem['net']['name']} ({mem['width']} width), batch {mem['batch']}.",
            "",
            "| rule | peak | transient | parameters+state | floor | simulated, exported step |",
            "|---|---|---|---|---|---|",
        ]
        # older results hold only CLAPP++'s simulated figure, under its own key
        sim = mem.get("simulated") or {"clapp++": mem.get("simulated_clapp++")}
        sim = {k: v for k, v in sim.items() if v}
        for r in mem["rows"]:
            s = sim.get(r["rule"])
            lines.append(
                f"| {r['rule']} | {_mb(r['peak_bytes'])} | {_mb(r['transient_bytes'])} | "
                f"{_mb(r['persistent_bytes'])} | {_mb(r['floor_bytes'])} | "
                f"{_mb(s['peak_bytes']) if s else '-'} |"
            )
        lines.append(
            "\nSimulated: the exported fp32 step on the host target with in-place bindings "
            "(peak of the greedy plan; the backprop baselines are not simulated here)."
        )
        lines.append("")
    if spd := sec.get("speed"):
        lines += [
            "## Speed (samples/s, torch eager)" + _tag(res, "speed"),
            "",
            f"{spd['net']}, batch {spd['batch']}, {spd['threads']} threads, "
            f"{spd['repeats']} interleaved repeats: median [min-max].",
            "",
        ]
        for k, v in spd["samples_per_s"].items():
            lines.append(f"- {k}: {v['median']:.1f} [{v['min']:.1f}-{v['max']:.1f}]")
        lines.append("")
    if ort := sec.get("export_speed"):
        lines += ["## Exported step (steps/s)" + _tag(res, "export_speed"), "",
                  f"{ort['net']}, batch {ort['batch']}.", ""]
        for k, v in ort["steps_per_s"].items():
            lines.append(f"- {k}: {v['median']} [{v['min']}-{v['max']}]")
        lines.append("")
    if q := sec.get("quant"):
        lines += [
            "## Quantized CLAPP++ (probe accuracy %)" + _tag(res, "quant"),
            "",
            f"{q.get('data', 'mnist')}, {q['subset'] or 'all'} images, {q['epochs']} epoch(s), "
            f"batch {q.get('batch_size', 64)}; random encoder "
            f"{q['random_probe']['all']:.2f} (all) / "
            f"{q['random_probe']['last']:.2f} (last).",
            "",
            "| mode | all layers | last layer |",
            "|---|---|---|",
        ]
        for k, r in q["runs"].items():
            lines.append(f"| {k} | {r['probe']['all']:.2f} | {r['probe']['last']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plots(res: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths, sec = [], _good(res)
    if acc := sec.get("accuracy"):
        names = list(acc["summary"])
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for j, layers in enumerate(("all", "last")):
            s = [acc["summary"][n][layers] for n in names]
            mean = [100 * x["mean"] for x in s]
            err = [
                [100 * (x["mean"] - x["min"]) for x in s],
                [100 * (x["max"] - x["mean"]) for x in s],
            ]
            ax.bar(
                [i + 0.4 * j for i in range(len(names))],
                mean,
                0.4,
                yerr=err,
                label=f"probe: {layers}",
                capsize=3,
            )
        ax.set_xticks([i + 0.2 for i in range(len(names))], names)
        ax.set_ylabel("test accuracy (%)")
        lo = min(100 * acc["summary"][n][k]["min"] for n in names for k in ("all", "last"))
        ax.set_ylim(max(0, lo - 5), None)
        ax.legend()
        fig.tight_layout()
        paths.append(out / "accuracy.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if mem := sec.get("memory"):
        fig, ax = plt.subplots(figsize=(6, 3))
        names = [r["rule"] for r in mem["rows"]]
        ax.bar(names, [r["peak_bytes"] / 2**20 for r in mem["rows"]], label="peak")
        ax.bar(
            names,
            [r["persistent_bytes"] / 2**20 for r in mem["rows"]],
            label="parameters + optimizer state",
        )
        ax.set_ylabel("MiB")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "memory.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_report(res: dict, out: Path) -> None:
    (out / "results.md").write_text(markdown(res))
    plots(res, out)
