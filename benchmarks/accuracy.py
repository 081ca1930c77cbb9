"""Linear-probe accuracy of each rule beside BP-InfoNCE and the random encoder.

Every run trains the same network on the same images for the same epochs with `edge.app.train`
(one run directory each, so an interrupted profile resumes where it stopped), then probes
the checkpoint: pooled features of all layers (edge's L-BFGS probe and the paper's kind, a
linear layer trained with Adam for fixed epochs: `all_adam`; see `edge.probe`) and of the last
layer only (which separates methods more). The random encoder is the same network at its
initialisation, probed the same way. Seeds give the spread.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from benchmarks import code_digest, provenance
from edge import checkpoint
from edge.app.config import TrainConfig
from edge.app.train import build, train
from edge.data import load
from edge.nets import NetSpec
from edge.probe import probe_accuracies, probe_accuracy

PROBES = ("all", "last", "all_adam")


def _probes(net: NetSpec, params: dict, ds) -> dict[str, float]:
    params = {k: v.cpu() for k, v in params.items()}
    both = probe_accuracies(net, params, ds, "all")
    return {"all": both["lbfgs"], "last": probe_accuracy(net, params, ds, "last"),
            "all_adam": both["adam"]}


REUSE = ("same-code", "any", "none")


def reusable(prov: dict | None, reuse: str) -> bool:
    """Whether a cached figure may stand in for a new one under the `reuse` policy:
    same-code (the code digest it was made with equals this code's), any, none."""
    if reuse == "any":
        return True
    return reuse == "same-code" and bool(prov) and prov.get("code_digest") == code_digest()


def run_one(cfg: TrainConfig, out: Path, data_dir: str | None, progress: bool,
            reuse: str = "same-code") -> dict:
    """Train (or resume) one run and probe it both ways; cached in out/bench.json with its
    provenance. A cached row is returned (marked `"reused": true`) only if it was made with
    this very config and `reuse` allows it; a checkpoint is resumed only if it was started by
    the same code (else the run is trained afresh over it)."""
    cache, started = out / "bench.json", out / "started.json"
    if cache.exists():
        row = json.loads(cache.read_text())
        if row.get("config") == cfg.to_dict() and reusable(row.get("provenance"), reuse):
            return {**row, "reused": True}
    t0 = time.perf_counter()
    ckpt = out / checkpoint.FILENAME
    begun = json.loads(started.read_text()) if started.exists() else None
    resume = (ckpt.exists() and begun is not None and begun.get("config") == cfg.to_dict()
              and reusable(begun.get("provenance"), "same-code" if reuse != "none" else "none"))
    if not resume:
        out.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps({"config": cfg.to_dict(), "provenance": provenance()},
                                      indent=1))
    # train() skips its own probes: this probes the checkpoint both ways below
    r = train(cfg, out, data_dir=data_dir, resume=resume, overwrite=not resume,
              progress=progress, probe=False)
    ds = load(cfg.data, data_dir, cfg.subset)
    params, _, meta = checkpoint.load(out)
    net = NetSpec.from_dict(meta["net"])
    row = {
        "rule": cfg.rule,
        "seed": cfg.seed,
        "probe": _probes(net, params, ds),
        "seconds": r["seconds"],
        "final_loss": r["final_loss"],
        "parameters": r["parameters"],
        "alignment": r["alignment"],  # per layer, mean over the measured batches (or None)
        "config": cfg.to_dict(),
        "resumed": resume,
        "provenance": provenance(t0),
    }
    cache.write_text(json.dumps(row, indent=1))
    return {**row, "reused": False}


def random_encoder(cfg: TrainConfig, data_dir: str | None) -> dict:
    """The network at its initialisation (the parameters `train` starts from), probed."""
    ds = load(cfg.data, data_dir, cfg.subset)
    net, _, params = build(cfg, ds.in_shape)
    return {"rule": "random", "seed": cfg.seed, "probe": _probes(net, params, ds)}


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Mean, min, max over seeds of each probe, per rule."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["rule"] for r in rows):
        mine = [r for r in rows if r["rule"] == name]
        entry: dict = {"seeds": [r["seed"] for r in mine]}
        for layers in PROBES:
            if any(layers not in r["probe"] for r in mine):
                continue  # rows probed before the Adam protocol existed
            vals = [r["probe"][layers] for r in mine]
            entry[layers] = {
                "mean": statistics.mean(vals),
                "min": min(vals),
                "max": max(vals),
                "values": vals,
            }
        if "seconds" in mine[0]:
            entry["seconds_mean"] = statistics.mean(r["seconds"] for r in mine)
        aligned = [r["alignment"] for r in mine if r.get("alignment")]
        if aligned:  # per layer, mean over seeds
            entry["alignment"] = [statistics.mean(v) for v in zip(*aligned, strict=True)]
        out[name] = entry
    return out


def run(
    rules: list[str],
    seeds: list[int],
    base: TrainConfig,
    out: Path,
    data_dir: str | None = None,
    progress: bool = True,
    alignment_every: int | None = None,
    reuse: str = "same-code",
) -> dict:
    """`alignment_every=k` also measures each local rule's gradient alignment with BP-InfoNCE
    on every k-th batch (None: not measured). `reuse`: which cached runs may stand in
    (`reusable`); the result lists the reused ones (`reused_runs`)."""
    rows = []
    for seed in seeds:
        for rule in rules:
            local = not rule.startswith("bp-")
            align = {"alignment": True, "alignment_every": alignment_every} \
                if alignment_every and local else {}
            cfg = TrainConfig(**{**base.to_dict(), "rule": rule, "seed": seed, **align})
            rows.append(run_one(cfg, out / f"{rule}-s{seed}", data_dir, progress, reuse))
        rows.append(random_encoder(TrainConfig(**{**base.to_dict(), "seed": seed}), data_dir))
    reused = [f"{r['rule']}-s{r['seed']} (run {r['provenance']['run']}, "
              f"{r['provenance']['measured']})" for r in rows if r.get("reused")]
    return {"config": base.to_dict(), "seeds": seeds, "rows": rows, "summary": summarise(rows),
            "reused_runs": reused}
