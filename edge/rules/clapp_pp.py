"""CLAPP++ (arXiv 2601.21683): the contrastive hinge per layer, with 2D spatial dependence.

For layer l with output y (after ReLU and max-pool), both views:
  z = avgpool_k(y) flattened to D = C * H' * W'     (k configurable; default gives ~2x2)
  c = the other view's z, detached                  (context)
  L = bilinear hinge of z against c (see `edge.rules.hinge`), B: D x D, full or low rank.
Closed-form update: dL/dz from the hinge -> spread back over the k x k windows -> through the
max-pool and ReLU of this layer only -> dW as the Hebbian product of that error with the
layer's own input (`edge.nets.layer_backward`). Nothing reaches the previous layer.

With spatial dependence a full B is (C H' W')^2 per layer, about 201M parameters for the
paper's full-width VGG-6: `predictor="auto"` (the default) takes a rank-r factorisation
B = U V^T whenever that is smaller; `predictor="full"` keeps the paper's exact B.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.nets import LayerOut, LayerSpec, NetSpec, layer_backward
from edge.rules import hinge
from edge.rules.base import LocalRule, avg_pool, avg_pool_backward, pool_kernel

PREDICTORS = ("auto", "full", "lowrank")


class ClappPP(LocalRule):
    name = "clapp++"
    description = (
        "CLAPP++: per-layer contrastive hinge with 2D spatial dependence (the paper's best)"
    )
    memory = "layer input and output of both views, the pooled D-vectors, B (D x D or rank r)"

    def __init__(
        self, pool: int | list[int] | None = None, predictor: str = "auto", rank: int = 64
    ):
        if predictor not in PREDICTORS:
            raise EdgeError(f"unknown predictor {predictor!r}; valid: {', '.join(PREDICTORS)}")
        if rank < 1:
            raise EdgeError(f"predictor rank must be positive, got {rank}")
        self.pool, self.predictor, self.rank = pool, predictor, rank
        self.kernels: list[int] = []

    def hparams(self) -> dict[str, Any]:
        return {"pool": self.pool, "predictor": self.predictor, "rank": self.rank}

    def _kernel_arg(self, i: int, n: int) -> int | None:
        if isinstance(self.pool, list):
            if len(self.pool) != n:
                raise EdgeError(f"--pool lists {len(self.pool)} kernels for {n} layers")
            return self.pool[i]
        return self.pool

    def check(self, net: NetSpec) -> None:
        shapes = net.shapes()
        self.kernels = [
            pool_kernel(self._kernel_arg(i, len(shapes)), s, i) for i, s in enumerate(shapes)
        ]

    def pooled_dim(self, shape: tuple[int, ...], k: int) -> int:
        if len(shape) == 1:
            return shape[0]
        return shape[0] * (shape[1] // k) * (shape[2] // k)

    def init(self, net: NetSpec, gen: torch.Generator) -> dict[str, Tensor]:
        self.check(net)
        params = {}
        for i, (shape, k) in enumerate(zip(net.shapes(), self.kernels, strict=True)):
            d = self.pooled_dim(shape, k)
            kind = hinge.choose_kind(self.predictor, d, d, self.rank)
            for key, t in hinge.init_predictor(kind, d, d, self.rank, gen).items():
                params[f"rule.{i}.{key}"] = t
        return params

    def _predictor(self, i: int, params: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: params[f"rule.{i}.{k}"] for k in ("B", "U", "V") if f"rule.{i}.{k}" in params}

    def layer_grads(
        self,
        i: int,
        layer: LayerSpec,
        o1: LayerOut,
        o2: LayerOut,
        params: dict[str, Tensor],
        ctx: Any,
    ) -> tuple[dict[str, Tensor], Tensor]:
        k = self.kernels[i]
        z1, z2 = avg_pool(o1.y, k), avg_pool(o2.y, k)
        P = self._predictor(i, params)
        loss, gz1, gz2, gP = hinge.hinge_grads(z1, z2, z1, z2, P)
        gw1, gb1 = layer_backward(layer, o1, avg_pool_backward(gz1, o1.y.shape, k))
        gw2, gb2 = layer_backward(layer, o2, avg_pool_backward(gz2, o2.y.shape, k))
        grads = {f"enc.{i}.w": gw1 + gw2, f"enc.{i}.b": gb1 + gb2}
        grads.update({f"rule.{i}.{key}": g for key, g in gP.items()})
        return grads, loss

    def layer_loss(
        self, i: int, y1: Tensor, y2: Tensor, params: dict[str, Tensor], ctx: Any
    ) -> Tensor:
        k = self.kernels[i]
        z1, z2 = avg_pool(y1, k), avg_pool(y2, k)
        return hinge.hinge_loss(z1, z2, z1.detach(), z2.detach(), self._predictor(i, params))
