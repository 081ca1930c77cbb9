"""Linear probe: how linearly separable are the encoder's features?

Features (as in the paper): every layer's output, average-pooled to at most `pool` x `pool`
cells, flattened and concatenated (`layers="all"`), or the last layer only (`layers="last"`,
which separates methods more). Two protocols fit a multinomial logistic regression on them
and score it on the test split:

- `lbfgs` (edge's own): features standardised with the training split's statistics, weight
  decay 1e-4, full-batch L-BFGS to convergence (deterministic, no learning rate to tune);
- `adam` (the kind of probe the paper's tables report): the raw pooled features, a linear
  layer trained with Adam for a fixed number of epochs, no weight decay. Its settings
  (lr 1e-3, mini-batches of 256, 50 epochs, seeded shuffling) are edge's choice: the
  reference code's own were not at hand.

The same probe on a randomly initialised encoder is the floor any rule must beat.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from edge.data import Dataset, to_float
from edge.errors import EdgeError
from edge.nets import NetSpec, encode

LAYER_CHOICES = ("all", "last")


def extract(
    net: NetSpec,
    params: dict[str, Tensor],
    x: Tensor,
    ds: Dataset,
    layers: str = "all",
    pool: int = 2,
    batch_size: int = 500,
    encode_fn: Callable[[Tensor], list[Tensor]] | None = None,
) -> Tensor:
    """Probe features of `x`; `encode_fn` replaces the float encoder (e.g. a quantized one)."""
    if layers not in LAYER_CHOICES:
        raise EdgeError(f"unknown probe layers {layers!r}; valid: {', '.join(LAYER_CHOICES)}")
    chunks = []
    device = next(iter(params.values())).device if encode_fn is None else torch.device("cpu")
    encode_fn = encode_fn or (lambda v: encode(net, params, v))
    for start in range(0, x.shape[0], batch_size):
        outs = encode_fn(to_float(x[start : start + batch_size], ds).to(device))
        if layers == "last":
            outs = outs[-1:]
        feats = []
        for y in outs:
            if y.dim() == 4 and (y.shape[2] > pool or y.shape[3] > pool):
                y = F.adaptive_avg_pool2d(y, pool)
            feats.append(y.flatten(1))
        chunks.append(torch.cat(feats, 1))
    return torch.cat(chunks)


def fit_linear(
    f_train: Tensor,
    y_train: Tensor,
    f_test: Tensor,
    y_test: Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
    max_iter: int = 150,
) -> float:
    """Test accuracy of a softmax regression fit on standardised training features."""
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, b = (f_train - mu) / sd, (f_test - mu) / sd
    w = torch.zeros(a.shape[1], num_classes, device=a.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=a.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, y_train) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = (b @ w + bias).argmax(1)
    return float((pred == y_test).float().mean())


def fit_linear_adam(
    f_train: Tensor,
    y_train: Tensor,
    f_test: Tensor,
    y_test: Tensor,
    num_classes: int,
    epochs: int = 50,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Test accuracy of a linear layer trained with Adam on the raw features for a fixed
    number of epochs (the `adam` protocol)."""
    gen = torch.Generator().manual_seed(seed)
    bound = f_train.shape[1] ** -0.5  # nn.Linear's default init, from our generator only
    w, b = (((torch.rand(shape, generator=gen) * 2 - 1) * bound).to(f_train.device)
            .requires_grad_(True) for shape in ((num_classes, f_train.shape[1]), (num_classes,)))
    opt = torch.optim.Adam([w, b], lr=lr)
    n = f_train.shape[0]
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(f_train.device)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                opt.zero_grad()
                F.cross_entropy(F.linear(f_train[idx], w, b), y_train[idx]).backward()
                opt.step()
    with torch.no_grad():
        pred = F.linear(f_test, w, b).argmax(1)
    return float((pred == y_test).float().mean())


PROTOCOLS = {"lbfgs": fit_linear, "adam": fit_linear_adam}


def probe_accuracies(
    net: NetSpec,
    params: dict[str, Tensor],
    ds: Dataset,
    layers: str = "all",
    pool: int = 2,
    encode_fn: Callable[[Tensor], list[Tensor]] | None = None,
    protocols: tuple[str, ...] = tuple(PROTOCOLS),
) -> dict[str, float]:
    """Protocol name -> test accuracy, from one extraction of the features."""
    f_tr = extract(net, params, ds.x_train, ds, layers, pool, encode_fn=encode_fn)
    f_te = extract(net, params, ds.x_test, ds, layers, pool, encode_fn=encode_fn)
    y_tr, y_te = ds.y_train.to(f_tr.device), ds.y_test.to(f_tr.device)
    return {p: PROTOCOLS[p](f_tr, y_tr, f_te, y_te, ds.num_classes) for p in protocols}


def probe_accuracy(
    net: NetSpec,
    params: dict[str, Tensor],
    ds: Dataset,
    layers: str = "all",
    pool: int = 2,
    encode_fn: Callable[[Tensor], list[Tensor]] | None = None,
) -> float:
    """edge's own protocol (`lbfgs`)."""
    return probe_accuracies(net, params, ds, layers, pool, encode_fn, ("lbfgs",))["lbfgs"]
