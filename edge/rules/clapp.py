"""CLAPP (Illing et al., NeurIPS 2021): the contrastive hinge per layer on globally pooled codes.

For layer l with output y (after ReLU and the layer's own max-pool, if any), both views:
  z = mean of y over its H x W positions: a C-vector (a linear layer's output is used as is)
  c = the other view's z, detached                     (context)
  L = bilinear hinge of z against c (see `edge.rules.hinge`), B: C x C, full.
Closed-form update: dL/dz from the hinge, spread evenly back over the H x W positions
(dL/dy = dL/dz / (H W) at every position), then through this layer's max-pool and ReLU to the
Hebbian product with the layer's own input (`edge.nets.layer_backward`).

The global average pool throws away where things are: CLAPP++ (`edge.rules.clapp_pp`) keeps a
coarse spatial grid instead, which is what the paper's theory asks for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from edge.nets import LayerOut, LayerSpec, NetSpec, layer_backward
from edge.rules import hinge
from edge.rules.base import LocalRule


def gap(y: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C) by the mean over positions; (N, F) stays."""
    return y.mean((2, 3)) if y.dim() == 4 else y


def gap_backward(gz: Tensor, y_shape: torch.Size) -> Tensor:
    """Adjoint of `gap`: every position gets dL/dz / (H W)."""
    if len(y_shape) == 2:
        return gz
    n, c, h, w = y_shape
    return (gz / (h * w))[:, :, None, None].expand(n, c, h, w)


class Clapp(LocalRule):
    name = "clapp"
    description = "CLAPP (2021): per-layer contrastive hinge on globally average-pooled channels"
    memory = "layer input and output of both views, two C-vectors, B (C x C)"

    def init(self, net: NetSpec, gen: torch.Generator) -> dict[str, Tensor]:
        params = {}
        for i, shape in enumerate(net.shapes()):
            c = shape[0]
            params[f"rule.{i}.B"] = hinge.init_predictor("full", c, c, 1, gen)["B"]
        return params

    def layer_grads(
        self,
        i: int,
        layer: LayerSpec,
        o1: LayerOut,
        o2: LayerOut,
        params: dict[str, Tensor],
        ctx: Any,
    ) -> tuple[dict[str, Tensor], Tensor]:
        z1, z2 = gap(o1.y), gap(o2.y)
        P = {"B": params[f"rule.{i}.B"]}
        loss, gz1, gz2, gP = hinge.hinge_grads(z1, z2, z1, z2, P)
        gw1, gb1 = layer_backward(layer, o1, gap_backward(gz1, o1.y.shape))
        gw2, gb2 = layer_backward(layer, o2, gap_backward(gz2, o2.y.shape))
        return {f"enc.{i}.w": gw1 + gw2, f"enc.{i}.b": gb1 + gb2, f"rule.{i}.B": gP["B"]}, loss

    def layer_loss(
        self, i: int, y1: Tensor, y2: Tensor, params: dict[str, Tensor], ctx: Any
    ) -> Tensor:
        z1, z2 = gap(y1), gap(y2)
        return hinge.hinge_loss(z1, z2, z1.detach(), z2.detach(), {"B": params[f"rule.{i}.B"]})
