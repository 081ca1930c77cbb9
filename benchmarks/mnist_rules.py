"""Every local rule on MNIST at a small budget, beside the random encoder: accuracy and alignment.

    python -m benchmarks.mnist_rules [--seeds 0 1 2] [--subset 10000] [--epochs 1]
                                     [--batch-size 16] [--lr LR] [--data-dir DIR]

The acceptance run of the rules issue: one epoch on the first 10,000 MNIST training images,
the mnist conv net, every local rule and BP-InfoNCE with `--alignment` on (per layer, the
cosine between the rule's update and the BP-InfoNCE gradient of the same batch, averaged over
the epoch), each probed on all layers and on the last layer, for several seeds. The random
encoder of each seed is the same network at its initialisation, probed the same way: the
floor a rule must beat. The probe is deterministic, so the spread is the seeds'.

Writes benchmarks/results/mnist_rules/{results.json, results.md, alignment.png}; every run
directory is cached under runs/, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import provenance
from benchmarks.accuracy import REUSE, random_encoder, run_one
from edge.app.config import TrainConfig

DEFAULT_LR_TEXT = "each rule's default (`edge rules`)"
RULES = ["clapp", "clapp++", "clapp++dfb", "clapp++both", "ff", "bp-infonce"]


def _stats(vals: list[float]) -> dict:
    return {"mean": statistics.mean(vals), "min": min(vals), "max": max(vals), "values": vals}


def run(rules: list[str], seeds: list[int], base: TrainConfig, out: Path,
        data_dir: str | None, reuse: str = "same-code") -> dict:
    rows = []
    for seed in seeds:
        rows.append(random_encoder(TrainConfig(**{**base.to_dict(), "seed": seed}), data_dir))
        for rule in rules:
            # alignment compares a local rule's update with backprop's: local rules only
            cfg = TrainConfig(**{**base.to_dict(), "rule": rule, "seed": seed,
                                 "alignment": not rule.startswith("bp-")})
            row = run_one(cfg, out / "runs" / f"{rule}-s{seed}", data_dir, progress=True,
                          reuse=reuse)
            result = json.loads((out / "runs" / f"{rule}-s{seed}" / "result.json").read_text())
            row["alignment"] = result["alignment"]
            rows.append(row)
    summary = {}
    for name in ["random", *rules]:
        mine = [r for r in rows if r["rule"] == name]
        entry = {layers: _stats([r["probe"][layers] for r in mine]) for layers in ("all", "last")}
        if mine[0].get("alignment"):
            per_layer = list(zip(*(r["alignment"] for r in mine), strict=True))
            entry["alignment"] = [statistics.mean(v) for v in per_layer]
            entry["alignment_mean"] = statistics.mean(entry["alignment"])
        summary[name] = entry
    floor = {s: next(r for r in rows if r["rule"] == "random" and r["seed"] == s) for s in seeds}
    for name in rules:
        mine = [r for r in rows if r["rule"] == name]
        gains = [r["probe"]["all"] - floor[r["seed"]]["probe"]["all"] for r in mine]
        summary[name]["gain_over_random"] = _stats(gains)
        summary[name]["beats_random_every_seed"] = all(g > 0 for g in gains)
    reused = [f"{r['rule']}-s{r['seed']} (run {r['provenance']['run']}, "
              f"{r['provenance']['measured']})" for r in rows if r.get("reused")]
    return {"config": base.to_dict(), "seeds": seeds, "rows": rows, "summary": summary,
            "reused_runs": reused}


def markdown(res: dict) -> str:
    c, s = res["config"], res["summary"]
    lines = [
        "# Local rules on MNIST: probe accuracy and gradient alignment",
        "",
        f"MNIST, first {c['subset']} training images, {c['epochs']} epoch(s), net `mnist`, "
        f"batch {c['batch_size']}, AdamW at lr {c['lr'] or DEFAULT_LR_TEXT}, seeds "
        f"{', '.join(map(str, res['seeds']))}; probe: all layers / last layer, mean "
        "[min-max] over seeds; gain: all-layer probe minus the same seed's random encoder; "
        "alignment: mean over layers of the per-layer cosine with the BP-InfoNCE gradient.",
        "",
        *provenance_lines(res),
        "",
        "| encoder | probe all (%) | probe last (%) | gain (points) | beats random (every seed) "
        "| alignment (mean) | alignment per layer |",
        "|---|---|---|---|---|---|---|",
    ]

    def pct(x: dict) -> str:
        return f"{100 * x['mean']:.2f} [{100 * x['min']:.2f}-{100 * x['max']:.2f}]"

    for name, e in s.items():
        gain = e.get("gain_over_random")
        g = f"{100 * gain['mean']:+.2f} [{100 * gain['min']:+.2f}, {100 * gain['max']:+.2f}]" \
            if gain else "-"
        beats = {True: "yes", False: "no"}.get(e.get("beats_random_every_seed"), "-")
        al = f"{e['alignment_mean']:+.3f}" if "alignment_mean" in e else "-"
        per = ", ".join(f"{a:+.2f}" for a in e.get("alignment", [])) or "-"
        lines.append(f"| {name} | {pct(e['all'])} | {pct(e['last'])} | {g} | {beats} | {al} "
                     f"| {per} |")
    local = {k: v for k, v in s.items() if "alignment_mean" in v}
    if len(local) >= 3:
        names = sorted(local)
        a = [local[k]["alignment_mean"] for k in names]
        g = [local[k]["gain_over_random"]["mean"] for k in names]
        rho = _spearman(a, g)
        lines += ["", f"Spearman rank correlation of alignment with gain over the local rules: "
                  f"{rho:+.2f} (n = {len(names)})."]
    return "\n".join(lines) + "\n"


def provenance_lines(res: dict) -> list[str]:
    """Where and when: this run's stamp, and which trained runs it took from earlier ones."""
    p = res.get("provenance")
    if not p:
        return ["Provenance: not recorded (written before runs kept their provenance)."]
    m = p["machine"]
    trained = [r for r in res["rows"] if r["rule"] != "random"]
    reused = res.get("reused_runs", [])
    line = (f"Run {p['run']}: {p['measured']}, {m['processor']}, {m['cpus']} CPUs, torch "
            f"{m['torch']}, commit {(p['commit'] or '?')[:10]}"
            f"{' (tree modified)' if p['tree_modified'] else ''}, {p['seconds'] / 60:.0f} min. ")
    line += (f"{len(trained) - len(reused)} of {len(trained)} runs trained in this run"
             + (f"; reused from earlier runs: {', '.join(reused)}." if reused else "."))
    return [line]


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["summary"]
    local = {k: v for k, v in s.items() if "alignment_mean" in v}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, e in local.items():
        ax1.plot(range(1, len(e["alignment"]) + 1), e["alignment"], marker="o", label=name)
        gain = e["gain_over_random"]
        ax2.errorbar(e["alignment_mean"], 100 * gain["mean"],
                     yerr=[[100 * (gain["mean"] - gain["min"])],
                           [100 * (gain["max"] - gain["mean"])]], fmt="o", capsize=3)
        ax2.annotate(name, (e["alignment_mean"], 100 * gain["mean"]), fontsize=8)
    ax1.axhline(0, color="grey", lw=0.5)
    ax1.set(xlabel="layer", ylabel="cosine with BP-InfoNCE gradient", title="alignment")
    ax1.legend(fontsize=8)
    ax2.axhline(0, color="grey", lw=0.5)
    ax2.set(xlabel="mean alignment", ylabel="probe gain over random (points)",
            title="alignment vs accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rules", nargs="+", default=RULES)
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None, help="default: each rule's default_lr")
    ap.add_argument("--data-dir", default=None, help="data root (else $EDGE_DATA)")
    ap.add_argument("--reuse", default="same-code", choices=REUSE,
                    help="cached runs that may stand in: made by the same code (default), "
                    "any, none")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mnist_rules"))
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = TrainConfig(data="mnist", net="mnist", subset=a.subset, epochs=a.epochs,
                       batch_size=a.batch_size, lr=a.lr)
    t0 = time.perf_counter()
    res = run(a.rules, a.seeds, base, out, a.data_dir, a.reuse)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["provenance"] = provenance(t0)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    plot(res, out / "alignment.png")
    sys.stdout.write((out / "results.md").read_text())


if __name__ == "__main__":
    main()
