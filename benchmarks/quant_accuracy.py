"""Probe accuracy of quantized CLAPP++ training against fp32, same budget (not a test).

Every configuration starts from the same float initialisation (seed), sees the same batches
and the same views (epoch generators as in `edge.app.train`), and is probed the same way
(`edge.probe.fit_linear` on 2x2-pooled features of every layer, "all", and of the last layer,
"last"); quantized runs are probed on the quantized network's own (integer) forward.

Configurations:
  fp32        the rule's default: AdamW at the rule's default lr (what `edge train` does)
  fp32-sgdn   fp32 with the integer mode's optimizer: SGD with per-tensor power-of-two
              learning rates normalised at calibration (isolates the cost of the integers)
  qat         int8 weights and activations in the forward, fp32 latent weights, AdamW
  int8-w16    integer mode, int16 weights whose top 8 bits feed the forward
  int8        integer mode, int8 weights

    python benchmarks/quant_accuracy.py --data mnist --subset 10000 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from edge import rules
from edge.data import default_views, load, two_views
from edge.nets import default_preset, encode, layer_forward, layer_params, preset
from edge.optim import OptimConfig
from edge.probe import extract, fit_linear
from edge.step import train_step
from edge.app.train import epoch_generator, initial_params
from quant.train import describe_plan, init_quant, quant_encode, quant_step

CONFIGS = ("fp32", "fp32-sgdn", "qat", "int8-w16", "int8")


def probe(encode_fn, ds) -> dict[str, float]:
    out = {}
    for layers in ("all", "last"):
        f_tr = extract(None, {}, ds.x_train, ds, layers, encode_fn=encode_fn)
        f_te = extract(None, {}, ds.x_test, ds, layers, encode_fn=encode_fn)
        out[layers] = round(100 * fit_linear(f_tr, ds.y_train, f_te, ds.y_test, ds.num_classes), 2)
    return out


def calibration_views(ds, views, n_batches: int, bs: int, seed: int):
    gen = torch.Generator().manual_seed(seed + 99_991)
    idx = torch.randperm(ds.x_train.shape[0], generator=gen)[: n_batches * bs]
    return [
        two_views(ds.x_train[idx[i * bs : (i + 1) * bs]], gen, views, ds.mean, ds.std)
        for i in range(n_batches)
    ]


def sgdn_lrs(net, rule, params, calib, lr):
    """Per-tensor power-of-two SGD rates giving an rms step of `lr` on the calibration batches."""
    sums = {}
    for v1, v2 in calib:
        for i, layer in enumerate(net.layers):
            w, b = layer_params(params, i)
            o1, o2 = layer_forward(layer, w, b, v1), layer_forward(layer, w, b, v2)
            grads, _ = rule.layer_grads(i, layer, o1, o2, params, None)
            for k, g in grads.items():
                sums[k] = sums.get(k, 0.0) + float(g.pow(2).mean()) / len(calib)
            v1, v2 = o1.y, o2.y
    return {k: 2.0 ** round(math.log2(lr / math.sqrt(max(v, 1e-30)))) for k, v in sums.items()}


def sgdn_step(net, rule, lrs, params, v1, v2):
    new, losses = dict(params), []
    for i, layer in enumerate(net.layers):
        w, b = layer_params(params, i)
        o1, o2 = layer_forward(layer, w, b, v1), layer_forward(layer, w, b, v2)
        grads, loss = rule.layer_grads(i, layer, o1, o2, params, None)
        for k, g in grads.items():
            new[k] = params[k] - lrs[k] * g
        losses.append(loss)
        v1, v2 = o1.y, o2.y
    return new, {"loss": torch.stack(losses).sum()}


def run(config: str, args, ds, net, rule) -> dict:
    t0 = time.perf_counter()
    params = initial_params(_cfg(args), net, rule)
    views = default_views(args.data)
    calib = calibration_views(ds, views, args.calib_batches, args.batch_size, args.seed)
    opt = OptimConfig("adamw", lr=args.lr)
    state, qs, lrs, info = opt.init_state(params), None, None, {}
    if config in ("qat", "int8-w16", "int8"):
        quant = "int8" if config == "qat" else config
        mode = "qat" if config == "qat" else "integer"
        qs = init_quant(net, rule, params, calib, quant, mode, opt,
                        lr=args.lr if mode == "qat" else args.integer_lr)
        info = describe_plan(qs)
    elif config == "fp32-sgdn":
        lrs = sgdn_lrs(net, rule, params, calib, args.integer_lr)
    n, bs = ds.x_train.shape[0], args.batch_size
    history, clipped = [], 0
    for epoch in range(args.epochs):
        gen = epoch_generator(args.seed, epoch)
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(n // bs):
            v1, v2 = two_views(ds.x_train[perm[s * bs : (s + 1) * bs]], gen, views, ds.mean, ds.std)
            if qs is not None:
                qs, m = quant_step(net, rule, qs, v1, v2, gen, opt)
            elif lrs is not None:
                params, m = sgdn_step(net, rule, lrs, params, v1, v2)
            else:
                params, state, m = train_step(net, rule, opt, params, state, v1, v2)
            total += float(m["loss"])
            clipped += int(m.get("clipped", 0))
        history.append(round(total / (n // bs), 4))
        print(f"  {config} epoch {epoch + 1}: loss {history[-1]}", flush=True)
    train_s = time.perf_counter() - t0
    if qs is not None:
        acc = probe(lambda x: quant_encode(net, qs, x), ds)
    else:
        acc = probe(lambda x: encode(net, params, x), ds)
    return {
        "config": config,
        "probe": acc,
        "loss_history": history,
        "clipped": clipped,
        "train_seconds": round(train_s, 1),
        "plan": info,
    }


def _cfg(args):
    from edge.app.train import TrainConfig

    return TrainConfig(
        rule=args.rule,
        data=args.data,
        seed=args.seed,
        net=args.net,
        width=args.width,
        batch_size=args.batch_size,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--data-dir", default=None, help="data root (else $EDGE_DATA, ../shared/data)")
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
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--skip-random", action="store_true", help="no random-encoder probe")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    ds = load(args.data, args.data_dir, args.subset)
    net = preset(args.net or default_preset(args.data), ds.in_shape, args.width)
    rule = rules.get(args.rule)
    rule.check(net)
    if args.lr is None:
        args.lr = rules.default_lr(args.rule)
    if args.integer_lr is None:
        from quant.engine import integer_default_lr

        args.integer_lr = integer_default_lr(args.rule)
    results = {
        "data": args.data,
        "subset": args.subset,
        "epochs": args.epochs,
        "net": net.to_dict(),
        "rule": args.rule,
        "lr": args.lr,
        "integer_lr": args.integer_lr,
        "runs": [],
    }
    if not args.skip_random:
        init = initial_params(_cfg(args), net, rule)
        results["random_probe"] = probe(lambda x: encode(net, init, x), ds)
        print(f"random encoder: {results['random_probe']}", flush=True)
    for config in args.configs.split(","):
        r = run(config, args, ds, net, rule)
        print(f"{config}: probe {r['probe']} ({r['train_seconds']} s)", flush=True)
        results["runs"].append(r)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
