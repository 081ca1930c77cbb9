"""Spiking accuracy of the NIR export (export.nir) against the ANN it came from (not a test).

    python -m benchmarks.spiking --data mnist|cifar10 [--checkpoint PATH] [--subset 10000]
        [--test 1000] [--steps 8 16 32 64] [--resets zero subtract] [--v-init 0 0.5]
        [--backend reference|norse] [--out graph.nir]

The encoder: an edge checkpoint (`--checkpoint`, its network spec read from the checkpoint),
or, without one, a small average-pool conv net trained here by backprop through a temporary
linear classifier for `--epochs` on the first `--subset` training images (a stand-in until the
trained local-rule encoder is wired in). The readout: a softmax regression fitted by
full-batch L-BFGS on the ANN's flattened last-block features of those images, standardised
(per-feature std floored at a tenth of the mean std, so near-constant features get no huge
weight), the standardisation folded into one linear head (W, b). The ANN reference is that
head on the ANN features; the spiking network is `to_nir(..., head=(W, b))` calibrated on
`--calib` training images, run rate-coded (constant input current) for max(steps) steps, its
head's mean output read after each T. Two IF resets: "zero" is NIR's IF (Norse, Lava and
SpiNNaker2 run this), "subtract" is the reset-by-subtraction of Rueckauer et al. (Sinabs);
two initial membrane potentials: 0 (what a NIR file implies) and half the threshold (a state
the reader must set; see export.nir). Prints one JSON object; spiking accuracies are keyed
reset -> "v_init=V" -> T.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from edge.errors import EdgeError
from edge.layers import EAGER
from edge.nets import NetSpec
from export.nir import RESETS, ann_accuracy, ann_features, spiking_accuracies, to_nir, write_nir

SPECS = {
    "mnist": [[16], [32]],
    "cifar10": [[32], [64], [64]],
}
MEAN_STD = {"mnist": ((0.1307,), (0.3081,)),
            "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


def load_data(name: str, data_dir: str, subset: int, test: int) -> tuple[Tensor, ...]:
    """(x_train, y_train, x_test, y_test) as normalised float / int64; edge.data if it loads,
    else the .npz directly."""
    try:
        from edge.data import load, to_float

        ds = load(name, data_dir=data_dir, subset=subset)
        return (to_float(ds.x_train, ds), ds.y_train.long(), to_float(ds.x_test[:test], ds),
                ds.y_test[:test].long())
    except Exception as e:  # noqa: BLE001 - the data module may be mid-rewrite
        print(f"edge.data.load failed ({type(e).__name__}); reading {name}.npz", file=sys.stderr)
    d = np.load(Path(data_dir) / f"{name}.npz")
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in MEAN_STD[name])

    def prep(x: np.ndarray) -> Tensor:
        t = torch.from_numpy(x).float() / 255
        t = t[:, None] if t.dim() == 3 else t.permute(0, 3, 1, 2)
        return (t - mean) / std

    return (prep(d["x_train"][:subset]), torch.from_numpy(d["y_train"][:subset]).long(),
            prep(d["x_test"][:test]), torch.from_numpy(d["y_test"][:test]).long())


def small_net(data: str, in_shape: tuple[int, ...]) -> NetSpec:
    blocks = [{"layers": [{"op": "conv", "cout": c[0], "k": 3, "padding": 1}, {"op": "relu"},
                          {"op": "avgpool", "k": 2}]} for c in SPECS[data]]
    blocks[-1]["layers"].append({"op": "flatten"})
    return NetSpec.from_dict({"name": f"{data}-avgpool", "blocks": blocks}, in_shape)


def forward(net: NetSpec, params: dict[str, Tensor], x: Tensor) -> Tensor:
    for i, b in enumerate(net.blocks):
        x, _ = b.forward(EAGER, i, params, x)
    return x.flatten(1)


def train_backprop(net: NetSpec, x: Tensor, y: Tensor, epochs: int, seed: int
                   ) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = {k: v.requires_grad_() for k, v in net.init_params(gen).items()}
    feat = forward(net, params, x[:2]).shape[1]
    clf = torch.nn.Linear(feat, int(y.max()) + 1)
    opt = torch.optim.Adam([*params.values(), *clf.parameters()], lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for s in range(0, x.shape[0], 64):
            idx = order[s : s + 64]
            loss = F.cross_entropy(clf(forward(net, params, x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach() for k, v in params.items()}


def fit_head(f: Tensor, y: Tensor, classes: int, weight_decay: float = 1e-4
             ) -> tuple[Tensor, Tensor]:
    mu, sd = f.mean(0), f.std(0)
    sd = sd.clamp_min(0.1 * float(sd.mean()) + 1e-8)
    a = (f - mu) / sd
    w = torch.zeros(a.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=150, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return (w / sd[:, None]).T.contiguous(), b - (mu / sd) @ w


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=sorted(SPECS), default="mnist")
    ap.add_argument("--checkpoint", default=None, help="an edge checkpoint (else train here)")
    ap.add_argument("--data-dir", default=None, help="data root (else $EDGE_DATA)")
    ap.add_argument("--subset", type=int, default=10000, help="training images")
    ap.add_argument("--test", type=int, default=1000, help="test images")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--calib", type=int, default=512, help="calibration images")
    ap.add_argument("--percentile", type=float, default=99.9)
    ap.add_argument("--max-rate", type=float, default=1.0)
    ap.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--resets", nargs="+", choices=RESETS, default=list(RESETS))
    ap.add_argument("--v-init", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--backend", choices=("reference", "norse"), default="reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the graph to this .nir file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        xtr, ytr, xte, yte = load_data(args.data, args.data_dir, args.subset, args.test)
        if args.checkpoint:
            from edge import checkpoint

            params, _, meta = checkpoint.load(args.checkpoint)
            net = NetSpec.from_dict(meta["net"], tuple(xtr.shape[1:]))
            source = str(args.checkpoint)
        else:
            net = small_net(args.data, tuple(xtr.shape[1:]))
            params = train_backprop(net, xtr, ytr, args.epochs, args.seed)
            source = f"backprop, {args.epochs} epoch(s) on {xtr.shape[0]} images"
        t_train = time.perf_counter()
        head = fit_head(ann_features(net, params, xtr), ytr, int(ytr.max()) + 1)
        ann = ann_accuracy(net, params, xte, yte, head)
        calib = xtr[: args.calib]
        kw = dict(head=head, percentile=args.percentile, max_rate=args.max_rate)
        graph = (write_nir(args.out, net, params, calib, **kw) if args.out
                 else to_nir(net, params, calib, **kw))
        t_conv = time.perf_counter()
        spiking: dict[str, dict[str, dict[str, float]]] = {}
        for reset in args.resets:
            for v0 in args.v_init:
                acc = spiking_accuracies(graph, xte, yte, args.steps, reset=reset,
                                         v_init=v0, backend=args.backend)
                spiking.setdefault(reset, {})[f"v_init={v0:g}"] = {
                    str(t): round(100 * a, 2) for t, a in acc.items()}
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    t_end = time.perf_counter()
    print(json.dumps({
        "data": args.data, "net": net.name, "encoder": source,
        "train_images": int(xtr.shape[0]), "test_images": int(xte.shape[0]),
        "calib_images": int(calib.shape[0]), "percentile": args.percentile,
        "max_rate": args.max_rate, "encoding": "current", "backend": args.backend,
        "nir_nodes": dict(Counter(type(n).__name__ for n in graph.nodes.values())),
        "ann_accuracy": round(100 * ann, 2), "spiking_accuracy": spiking,
        "seconds": {"train": round(t_train - t0, 1), "convert": round(t_conv - t_train, 1),
                    "simulate": round(t_end - t_conv, 1)},
    }))


if __name__ == "__main__":
    main()
