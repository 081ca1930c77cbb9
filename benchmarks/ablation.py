"""`python -m benchmarks.ablation`: what costs CLAPP++ its gain on CIFAR-10, one factor at a time.

The budget is the paper's reference code's small configuration: CIFAR-10, the first 10,000
training images, 5 epochs, VGG-6 at 1/8 width, batch 32, AdamW at 2e-4 unless the row
changes it. Every row is one `edge train ... --json` run (the CLI a user runs), for each
seed; its gain is the probe accuracy (all layers, edge's probe) minus the same run's probe of
the untrained encoder (same seed, same initialisation). BP-InfoNCE runs with the same views
as the local rows it is compared with. Runs already in `--out/runs` are reused (say so:
`reused`), so an interrupted ablation resumes where it stopped.

Rows (`CONFIGS`): edge's defaults (the reference's pooling grid, 4-4-4-2-2-1 on this net,
and a rank-32 predictor where that is smaller than the full one); edge's first default grid
(about 2x2 codes); predictor rank 16, 24 and 64; a 4x4 first-layer code (a smaller
predictor); the reference's views (`--views paper`); the
full predictor; the reference's views and predictor together; the learning rate at 3e-4.
Every run reports both probes (`edge.probe`: edge's L-BFGS probe and the paper's kind, Adam
for a fixed number of epochs); the ratio is taken on each.

Writes OUT/results.json and OUT/results.md (config -> clapp++ gain, BP gain, their ratio,
predictor bytes).

    python -m benchmarks.ablation --data-dir ../shared/data [--seeds 2 3 --configs a,b]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "ablation"
BASE = ["--data", "cifar10", "--subset", "10000", "--epochs", "5", "--net", "vgg6",
        "--width", "0.125", "--batch-size", "32", "--lr", "2e-4"]
FIRST_POOL = ["--hp", "pool=16,8,8,4,2,1"]  # edge's first default (~2x2 codes) on this net
# name -> (clapp++ extra flags, the BP-InfoNCE run it is compared with)
CONFIGS: dict[str, tuple[list[str], str]] = {
    "defaults": ([], "bp"),
    "first default grid 16-8-8-4-2-1": (FIRST_POOL, "bp"),
    "rank 16": (["--hp", "rank=16"], "bp"),
    "rank 24": (["--hp", "rank=24"], "bp"),
    "rank 64": (["--hp", "rank=64"], "bp"),
    "grid 8-4-4-2-2-1": (["--hp", "pool=8,4,4,2,2,1"], "bp"),
    "views paper": (["--views", "paper"], "bp views paper"),
    "predictor full": (["--hp", "predictor=full"], "bp"),
    "views + full predictor (reference)": (["--views", "paper", "--hp", "predictor=full"],
                                           "bp views paper"),
    "lr 3e-4": (["--lr", "3e-4"], "bp"),
}
BP_RUNS = {"bp": [], "bp views paper": ["--views", "paper"]}


def _train(flags: list[str], data_dir: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "edge", "train", *flags, "--data-dir", data_dir,
           "--out", str(out), "--overwrite", "--json"]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"ablation run failed: {' '.join(cmd)}: {p.stderr.strip()[-300:]}")
    r = json.loads(p.stdout)
    return {"command": "edge train " + " ".join(flags), "probe": r["probe_accuracy"],
            "random": r["random_probe_accuracy"], "gain": r["probe_accuracy"] -
            r["random_probe_accuracy"], "adam_probe": r["probe_adam_accuracy"],
            "adam_random": r["random_probe_adam_accuracy"],
            "adam_gain": r["probe_adam_accuracy"] - r["random_probe_adam_accuracy"],
            "seconds": round(time.time() - t0, 1),
            "predictor_bytes": 4 * int(r["parameters"].get("rule", 0))}


def run_one(name: str, flags: list[str], seed: int, data_dir: str, out: Path) -> dict:
    f = out / "runs" / f"{name.replace(' ', '_').replace('+', 'and')}_seed{seed}.json"
    if f.exists():
        return json.loads(f.read_text()) | {"reused": True}
    f.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # the run's checkpoint is not a result
        res = _train([*BASE, *flags, "--seed", str(seed)], data_dir, Path(tmp) / "run")
    res |= {"date": datetime.date.today().isoformat(), "seed": seed}
    f.write_text(json.dumps(res, indent=1) + "\n")
    return res | {"reused": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    names = [c for c in a.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: unknown config {unknown[0]!r}; valid: {', '.join(CONFIGS)}")
    rows, bp = {}, {}
    for seed in a.seeds:
        for b in dict.fromkeys(CONFIGS[c][1] for c in names):
            bp.setdefault(b, []).append(run_one(b, ["--rule", "bp-infonce", *BP_RUNS[b]], seed,
                                                a.data_dir, a.out))
        for c in names:
            rows.setdefault(c, []).append(run_one(c, ["--rule", "clapp++", *CONFIGS[c][0]],
                                                  seed, a.data_dir, a.out))
            print(f"{c} seed {seed}: gain {rows[c][-1]['gain'] * 100:+.2f}", file=sys.stderr)
    table = []
    for c in names:
        row = {"config": c, "bp_run": CONFIGS[c][1],
               "predictor_bytes": rows[c][0]["predictor_bytes"],
               "reused": [r["reused"] for r in rows[c] + bp[CONFIGS[c][1]]]}
        for probe, key in (("lbfgs", "gain"), ("adam", "adam_gain")):
            g = [r.get(key) for r in rows[c]]
            gb = [r.get(key) for r in bp[CONFIGS[c][1]]]
            ok = None not in g + gb  # runs from before the Adam probe have none
            row[probe] = {"clapp++_gain": g, "bp_gain": gb,
                          "ratio": statistics.mean(g) / statistics.mean(gb) if ok else None}
        row["probe"] = [r["probe"] for r in rows[c]]
        row["random"] = [r["random"] for r in rows[c]]
        table.append(row)
    res = {"base": "edge train " + " ".join(BASE), "seeds": a.seeds, "rows": table,
           "runs": {"clapp++": rows, "bp-infonce": bp}}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["# CLAPP++ ablation on CIFAR-10 (the reference code's small configuration)", "",
          f"Written by `python -m benchmarks.ablation`; method in its docstring. Base: "
          f"`{res['base']}`, seeds {', '.join(map(str, a.seeds))}. Gains in points of probe "
          "accuracy (all layers) over the same run's untrained encoder, per seed, then the "
          "ratio of the means; for edge's L-BFGS probe and for the Adam probe (the paper's "
          "kind; n/m: a run from before it existed).", "",
          "| config | clapp++ gain | BP-InfoNCE gain (its views) | ratio | Adam probe: clapp++ "
          "gain | BP gain | ratio | clapp++ probe | random | predictor bytes (fp32) |",
          "|---|---|---|---|---|---|---|---|---|---|"]

    def pts(v):
        return ", ".join("n/m" if x is None else f"{x * 100:+.2f}" for x in v)

    def ratio(x):
        return "n/m" if x is None else f"{x:.2f}"

    for t in table:
        lb, ad = t["lbfgs"], t["adam"]
        md.append(f"| {t['config']} | {pts(lb['clapp++_gain'])} | {pts(lb['bp_gain'])} "
                  f"({t['bp_run']}) | {ratio(lb['ratio'])} | {pts(ad['clapp++_gain'])} | "
                  f"{pts(ad['bp_gain'])} | {ratio(ad['ratio'])} | "
                  f"{', '.join(f'{x * 100:.2f}' for x in t['probe'])} | "
                  f"{', '.join(f'{x * 100:.2f}' for x in t['random'])} | "
                  f"{t['predictor_bytes']:,} |")
    (a.out / "results.md").write_text("\n".join(md) + "\n")
    print(json.dumps(res["rows"]))


if __name__ == "__main__":
    main()
