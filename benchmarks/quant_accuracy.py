"""Probe accuracy of quantized CLAPP++ training against fp32, same budget (not a test).

Every configuration is one `edge.app.train.train` run from the same `TrainConfig` but for its
quantization: the same float initialisation (seed), the same batches and views (the epoch
generators), the same calibration batches; each is probed the same way (`edge.probe` on
2x2-pooled features of every layer, "all", and of the last layer, "last"), quantized runs on
the quantized network's own forward (the engine's encoder).

Configurations:
  fp32        the rule's default: AdamW at the rule's default lr (what `edge train` does)
  fp32-sgdn   fp32 with the integer mode's kind of optimizer: SGD with per-tensor power-of-two
              rates, each fixed once so that the rms step on the calibration batches is
              `integer_lr` (isolates the cost of the integers from that of the optimizer)
  qat         int8 weights and activations in the forward, fp32 latent weights, AdamW
  int8-w16    integer mode, int16 weights whose top 8 bits feed the forward
  int8        integer mode, int8 weights

    python -m benchmarks.quant_accuracy --data mnist --subset 10000 --epochs 1 \
        --data-dir ../shared/data --out benchmarks/results/quant/mnist.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks import provenance
from edge import rules
from edge.app.config import TrainConfig
from edge.app.train import FloatEngine, build, calibration, make_engine, train
from edge.data import load
from edge.nets import encode
from edge.probe import extract, fit_linear
from edge.step import local_step

CONFIGS = ("fp32", "fp32-sgdn", "qat", "int8-w16", "int8")


def probe(encode_fn, ds) -> dict[str, float]:
    out = {}
    for layers in ("all", "last"):
        f_tr = extract(None, {}, ds.x_train, ds, layers, encode_fn=encode_fn)
        f_te = extract(None, {}, ds.x_test, ds, layers, encode_fn=encode_fn)
        out[layers] = round(100 * fit_linear(f_tr, ds.y_train, f_te, ds.y_test, ds.num_classes), 2)
    return out


class _GradRms:
    """An optimizer that changes nothing and records each gradient's mean square."""

    name = "record"

    def __init__(self) -> None:
        self.sq: dict[str, float] = {}

    def init_state(self, params):
        return {"step": torch.zeros(())}

    def update(self, name, p, g, state, step, noise=None):
        self.sq[name] = self.sq.get(name, 0.0) + float(g.double().pow(2).mean())
        return p, {}


class PowerOfTwoSGD:
    """SGD with a fixed power-of-two rate per tensor (integer mode's kind of update, in fp32)."""

    name = "sgd-pow2"

    def __init__(self, lrs: dict[str, float]):
        self.lrs = lrs
        self.lr, self.weight_decay = min(lrs.values()), 0.0

    def init_state(self, params):
        return {"step": torch.zeros(())}

    def update(self, name, p, g, state, step, noise=None):
        return p - self.lrs[name] * g, {}


def sgdn_rates(net, rule, params, calib, lr: float) -> dict[str, float]:
    """Per tensor 2^round(log2(lr / rms(g))), g the rule's gradient on the calibration
    batches at the initial parameters."""
    rec = _GradRms()
    state = {"step": torch.zeros(()), **rule.init_state(net)}
    with torch.no_grad():
        for v1, v2 in calib:
            local_step(net, rule, rec, params, state, v1, v2)
    return {k: 2.0 ** round(math.log2(lr / math.sqrt(max(v / len(calib), 1e-30))))
            for k, v in rec.sq.items()}


def config_for(config: str, args) -> TrainConfig:
    quant, mode, lr = "fp32", "integer", args.lr
    if config == "qat":
        quant, mode = "int8", "qat"
    elif config in ("int8-w16", "int8"):
        quant, lr = config, args.integer_lr
    return TrainConfig(rule=args.rule, data=args.data, seed=args.seed, net=args.net,
                       width=args.width, batch_size=args.batch_size, subset=args.subset,
                       epochs=args.epochs, lr=lr, quant=quant, mode=mode, probe_layers="all")


def saturated(engine) -> int | None:
    """Integer stores at their plan's clip limits at the end (None for float engines)."""
    plan = getattr(engine, "plan", None)
    if plan is None or getattr(engine, "mode", None) != "integer":
        return None
    return sum(int(((engine.params[k] == pp.lo) | (engine.params[k] == pp.hi)).sum())
               for k, pp in plan.params.items())


def run(config: str, args, ds, runs: Path) -> dict:
    """One configuration trained and probed both ways."""
    t0 = time.perf_counter()
    cfg = config_for(config, args)
    engine, info = make_engine(cfg), {}
    if config == "fp32-sgdn":
        net, rule, params = build(cfg, ds.in_shape)
        lrs = sgdn_rates(net, rule, params, calibration(cfg, ds), args.integer_lr)
        info = {"lr_per_tensor": lrs}

        class SGDNEngine(FloatEngine):
            def bind(self, net, rule, opt):
                super().bind(net, rule, PowerOfTwoSGD(lrs))

        engine = SGDNEngine()
    r = train(cfg, runs / config, data_dir=args.data_dir, overwrite=True, progress=False,
              engine=engine, probe=False)
    acc = probe(engine.encoder(), ds)
    return {
        "config": config,
        "probe": acc,
        "loss_history": [round(h["loss"], 4) for h in r["history"]],
        "saturated_stores": saturated(engine),
        "train_seconds": r["seconds"],
        "quantization": r["quantization"],
        "optimizer": r["optimizer"] if config != "fp32-sgdn" else {"name": "sgd-pow2", **info},
        "provenance": provenance(t0),
    }


def defaults(args) -> None:
    if args.lr is None:
        args.lr = rules.default_lr(args.rule)
    if args.integer_lr is None:
        from quant.engine import integer_default_lr

        args.integer_lr = integer_default_lr(args.rule)


def random_probe(args, ds) -> dict[str, float]:
    net, _, params = build(config_for("fp32", args), ds.in_shape)
    return probe(lambda x: encode(net, params, x), ds)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--data-dir", default=None, help="data root (else $EDGE_DATA)")
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None, help="default: the rule's default_lr")
    ap.add_argument("--integer-lr", type=float, default=None,
                    help="integer mode and fp32-sgdn (default: quant.engine.integer_default_lr)")
    ap.add_argument("--rule", default="clapp++")
    ap.add_argument("--net", default=None)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--runs", type=Path, default=None,
                    help="run directories (default: a runs/ folder beside --out, else ./runs)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--skip-random", action="store_true", help="no random-encoder probe")
    args = ap.parse_args(argv)
    defaults(args)
    torch.manual_seed(args.seed)
    ds = load(args.data, args.data_dir, args.subset)
    runs = args.runs or (Path(args.out).parent / "runs" / args.data if args.out else
                         Path("runs"))
    t0 = time.perf_counter()
    results = {"data": args.data, "subset": args.subset, "epochs": args.epochs,
               "net": args.net, "width": args.width, "batch_size": args.batch_size,
               "rule": args.rule, "lr": args.lr, "integer_lr": args.integer_lr, "runs": []}
    if not args.skip_random:
        results["random_probe"] = random_probe(args, ds)
        print(f"random encoder: {results['random_probe']}", flush=True)
    for config in args.configs.split(","):
        r = run(config, args, ds, runs)
        print(f"{config}: probe {r['probe']} ({r['train_seconds']} s)", flush=True)
        results["runs"].append(r)
        results["provenance"] = provenance(t0)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
