"""`python -m benchmarks.full --device cuda`: the paper's configuration, data parallel across
the GPUs present; `--smoke`: the same code path on CPU in about a minute.

Runs: VGG-6 at full width for 300 epochs on CIFAR-10, STL-10 (`edge.data.load` reads its
binary folder and trains on its unlabeled split) and Tiny ImageNet, with every rule of
`edge rules` (the local rules, BP-InfoNCE and bp-clapp++). Each run is `edge train` in its own
run directory, on all GPUs here (`edge.app.distributed.launch`: data parallel, which computes
the one-process run on the same global batch), or in this process when there is one device.
Rerunning the same command resumes an interrupted run from its checkpoint (train() resumes
exactly) and skips a finished one (its result.json matches the configuration).

Probes, on the final checkpoint: edge's (`edge.probe.probe_accuracy`, pooled features of all
layers, as train() reports, and of the last layer) and the reference protocol if this tree
has one (`edge.probe.reference_probe_accuracy`); where it has not, the row says so.

Data (`--data-dir`, else $EDGE_DATA): cifar10 by name; STL-10 from `stl10_binary/`; Tiny
ImageNet from `tiny-imagenet-200/`. `--smoke` builds tiny STL-10 and Tiny ImageNet folders in
the right formats on the fly and uses digits for CIFAR-10, at tiny widths, subsets and
epochs; one run goes through the data-parallel launcher on 2 CPU processes (gloo) and one
is trained for an epoch and resumed for the second. Its numbers mean nothing.

Writes `<out>/results.json` and `<out>/results.md` (default benchmarks/results/full/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import provenance
from edge import checkpoint, rules
from edge.app.config import TrainConfig
from edge.app.train import RESULT, train
from edge.data import load
from edge.nets import NetSpec
from edge.probe import probe_accuracy

OUT = Path(__file__).resolve().parent / "results" / "full"
FULL = dict(net="vgg6", width=1.0, epochs=300, batch_size=64)
FOLDERS = {"cifar10": None, "stl10": "stl10_binary", "tinyimagenet": "tiny-imagenet-200"}


def plan(args: argparse.Namespace, data_root: Path | None) -> list[tuple[TrainConfig, int]]:
    """(config, processes) of every run."""
    if args.smoke:
        smoke = make_smoke_data(args.out / "smoke-data")
        tiny = dict(width=1 / 32, epochs=2, batch_size=16, net="vgg6")
        rows = [(TrainConfig(rule=r, data="digits", net="digits", width=0.25, epochs=2,
                             subset=128, batch_size=32), 1) for r in rules.names()]
        rows = [(c, 2 if c.rule == "clapp++" else n) for c, n in rows]  # data parallel
        for path in smoke:
            rows += [(TrainConfig(rule=r, data=str(path), **tiny), 1)
                     for r in ("clapp++", "bp-infonce")]
        return rows
    nproc = args.nproc or max(1, torch.cuda.device_count() if args.device == "cuda" else 1)
    rows = []
    for name in args.data:
        folder = FOLDERS[name]
        if folder is not None and data_root is None:
            raise SystemExit(f"error: {name} is read from <data dir>/{folder}; pass --data-dir "
                             "or set EDGE_DATA")
        data = name if folder is None else str(data_root / folder)
        for r in args.rules or rules.names():
            rows.append((TrainConfig(rule=r, data=data, device=args.device, seed=args.seed,
                                     **FULL), nproc))
    return rows


def run_dir(args: argparse.Namespace, cfg: TrainConfig) -> Path:
    return args.out / "runs" / f"{Path(cfg.data).name}-{cfg.rule}-s{cfg.seed}"


def train_row(cfg: TrainConfig, out: Path, nproc: int, data_dir: str | None,
              progress: bool) -> tuple[dict, int]:
    """Train (or resume, or reuse) one run -> (its result, the epoch it resumed from)."""
    done = out / RESULT
    if done.exists():
        result = json.loads(done.read_text())
        if result.get("config") == cfg.to_dict():
            return result, cfg.epochs
    ckpt = out / checkpoint.FILENAME
    start = checkpoint.load(ckpt)[2]["epoch"] if ckpt.exists() else 0
    if nproc == 1:
        result = train(cfg, out, data_dir=data_dir, resume=start > 0, overwrite=start == 0,
                       progress=progress)
        return result, start
    from edge.app.distributed import launch

    argv = ["train", "--rule", cfg.rule, "--data", cfg.data, "--net", str(cfg.net),
            "--width", str(cfg.width), "--epochs", str(cfg.epochs), "--batch-size",
            str(cfg.batch_size), "--seed", str(cfg.seed), "--device", cfg.device,
            "--out", str(out), "--json", "--resume" if start else "--overwrite"]
    if cfg.subset:
        argv += ["--subset", str(cfg.subset)]
    if data_dir:
        argv += ["--data-dir", data_dir]
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet  # rank 0's JSON: read from its result.json
        try:
            code = launch(argv, nproc)
        finally:
            sys.stdout = stdout
    if code:
        raise SystemExit(f"error: {cfg.rule} on {cfg.data} failed on {nproc} processes "
                         f"(exit {code})")
    return json.loads(done.read_text()), start


def probes(cfg: TrainConfig, out: Path, result: dict, data_dir: str | None,
           device: str) -> dict:
    import edge.probe

    params, _, meta = checkpoint.load(out)
    net = NetSpec.from_dict(meta["net"])
    ds = load(cfg.data, data_dir, cfg.subset)
    params = {k: v.to(device) for k, v in params.items()}
    ref = getattr(edge.probe, "reference_probe_accuracy", None)
    return {"edge": result["probe_accuracy"],
            "edge_last": probe_accuracy(net, params, ds, "last"),
            "random": result["random_probe_accuracy"],
            "reference": None if ref is None else ref(net, params, ds),
            "reference_protocol": "present" if ref is not None else
            "absent: this tree has no reference probe (edge.probe.reference_probe_accuracy)"}


def make_smoke_data(root: Path) -> list[Path]:
    """Tiny STL-10 binaries and a tiny Tiny ImageNet folder, in their real formats."""
    from PIL import Image

    gen = np.random.default_rng(0)
    stl = root / "stl10_binary"
    stl.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 20), ("test", 20), ("unlabeled", 48)):
        x = gen.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        x.transpose(0, 1, 3, 2).tofile(stl / f"{split}_X.bin")  # column-major channels
        if split != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(stl / f"{split}_y.bin")
    tin = root / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(4)]
    (tin / "val" / "images").mkdir(parents=True, exist_ok=True)
    (tin / "wnids.txt").write_text("\n".join(wnids) + "\n")
    ann = []
    for c, w in enumerate(wnids):
        d = tin / "train" / w / "images"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(8):
            img = gen.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(img).save(d / f"{w}_{j}.JPEG", format="JPEG")
        for j in range(3):
            name = f"val_{c * 3 + j}.JPEG"
            Image.fromarray(gen.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                tin / "val" / "images" / name, format="JPEG")
            ann.append(f"{name}\t{w}\t0\t0\t63\t63")
    (tin / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return [stl, tin]


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    data_dir = args.data_dir or os.environ.get("EDGE_DATA")
    rows_plan = plan(args, Path(data_dir) if data_dir else None)
    rows = []
    for i, (cfg, nproc) in enumerate(rows_plan):
        out = run_dir(args, cfg)
        if args.smoke and i == 0 and not (out / RESULT).exists():  # exercise the resume
            first = TrainConfig.from_dict({**cfg.to_dict(), "epochs": 1})
            train(first, out, data_dir=data_dir, overwrite=True, progress=False, probe=False)
        t = time.perf_counter()
        result, start = train_row(cfg, out, nproc, data_dir, not args.quiet)
        rows.append({"data": result["data"], "rule": cfg.rule, "epochs": cfg.epochs,
                     "processes": nproc, "device": cfg.device,
                     "probe": probes(cfg, out, result, data_dir, cfg.device),
                     "final_loss": result["final_loss"], "train_seconds": result["seconds"],
                     "wall_seconds": round(time.perf_counter() - t, 1),
                     "resumed_from_epoch": start, "weights_digest": result["weights_digest"],
                     "run": str(out), "config": cfg.to_dict()})
        if not args.quiet:
            print(f"{rows[-1]['data']:>20} {cfg.rule:<12} edge probe "
                  f"{rows[-1]['probe']['edge']:.4f}", file=sys.stderr)
    return {"smoke": args.smoke, "rows": rows, "provenance": provenance(t0)}


def markdown(r: dict) -> str:
    lines = ["# The paper's configuration" + (" (smoke: numbers mean nothing)" if r["smoke"]
                                              else ""), "",
             "Written by `python -m benchmarks.full`; method: that file's docstring.", "",
             "| data | rule | epochs | processes | edge probe (all) | edge probe (last) | "
             "random | reference probe | final loss | resumed from |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        p = row["probe"]
        ref = "absent" if p["reference"] is None else f"{p['reference']:.4f}"
        lines.append(f"| {row['data']} | {row['rule']} | {row['epochs']} | {row['processes']} "
                     f"| {p['edge']:.4f} | {p['edge_last']:.4f} | {p['random']:.4f} | {ref} | "
                     f"{row['final_loss']:.4f} | {row['resumed_from_epoch']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny, on CPU, about a minute")
    ap.add_argument("--data", nargs="+", default=list(FOLDERS), choices=list(FOLDERS))
    ap.add_argument("--rules", nargs="+", default=None)
    ap.add_argument("--nproc", type=int, default=None, help="default: the GPUs present")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"default: {OUT} (--smoke: a temporary folder)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
    if args.out is None:
        import tempfile

        args.out = Path(tempfile.mkdtemp(prefix="edge-full-smoke-")) if args.smoke else OUT
    args.out.mkdir(parents=True, exist_ok=True)
    r = run(args)
    (args.out / "results.json").write_text(json.dumps(r, indent=1))
    (args.out / "results.md").write_text(markdown(r))
    print(markdown(r) + f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()

