"""CLAPP++ with direct feedback (arXiv 2601.21683): every layer predicts the top layer.

Before the step, `context` runs both views forward to the top layer with the current weights
(a forward pass only, nothing flows backward) and keeps the top layer's pooled code:
  c_top = avgpool_k(top-layer output) flattened to Dc        (detached)
Layer l, with its own pooled code z (as in CLAPP++, D = C * H' * W'), scores its anchor
against the OTHER view's top-layer code through its own feedback predictor B^l (D x Dc):
  u = z_l^T B^l c_top,      L = bilinear hinge of z_l against c_top (see `edge.rules.hinge`)
The three factors of the update are unchanged (modulator x prediction B^l c_top x Hebbian
term), only the prediction now comes from the top of the network: in a deep linear network
with an orthogonal downstream product and B^l at its optimum it is exactly the backprop
update of the top-layer loss (`edge.theory`). B^l is full or low rank as in CLAPP++.

The context is computed once per step from the incoming weights; the layer-by-layer loop then
updates the lower layers before the upper ones run, so the top layer scores its fresh code
against the slightly older context (on the top layer this is CLAPP++ with a feedback B).
Needs >= 2 layers: with one layer the feedback is the layer itself, i.e. plain clapp++.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.nets import LayerOut, LayerSpec, NetSpec, layer_backward, layer_forward, layer_params
from edge.rules import hinge
from edge.rules.base import avg_pool, avg_pool_backward
from edge.rules.clapp_pp import ClappPP

Context = tuple[Tensor, Tensor]  # pooled top-layer codes of view 1 and view 2, detached
Grads = dict[str, Tensor]


class ClappDFB(ClappPP):
    name = "clapp++dfb"
    description = "CLAPP++ with direct feedback: each layer predicts the top layer's pooled code"
    memory = (
        "layer input and output of both views, the pooled D-vectors, both views' pooled top "
        "codes (Dc), feedback B (D x Dc or rank r)"
    )

    def check(self, net: NetSpec) -> None:
        if len(net.layers) < 2:
            raise EdgeError(
                f"{self.name} needs at least 2 layers (each layer predicts the top one), got 1; "
                "use clapp++ or clapp, or a deeper --net"
            )
        super().check(net)

    def predictor_shapes(self, i: int, dims: list[int]) -> dict[str, tuple[int, int]]:
        """Key prefix -> (D, Dc) of every predictor of layer i."""
        return {"fb.": (dims[i], dims[-1])}

    def init(self, net: NetSpec, gen: torch.Generator) -> dict[str, Tensor]:
        self.check(net)
        dims = [self.pooled_dim(s, k) for s, k in zip(net.shapes(), self.kernels, strict=True)]
        params = {}
        for i in range(len(dims)):
            for prefix, (d, dc) in self.predictor_shapes(i, dims).items():
                kind = hinge.choose_kind(self.predictor, d, dc, self.rank)
                for key, t in hinge.init_predictor(kind, d, dc, self.rank, gen).items():
                    params[f"rule.{i}.{prefix}{key}"] = t
        return params

    def _pred(self, i: int, prefix: str, params: dict[str, Tensor]) -> dict[str, Tensor]:
        keys = (f"rule.{i}.{prefix}{k}" for k in ("B", "U", "V"))
        return {key.rsplit(".", 1)[1]: params[key] for key in keys if key in params}

    def context(self, net: NetSpec, params: dict[str, Tensor], x1: Tensor, x2: Tensor) -> Context:
        """Both views' pooled top-layer codes from a forward pass with the current weights."""

        def top(x: Tensor) -> Tensor:
            for i, layer in enumerate(net.layers):
                w, b = layer_params(params, i)
                x = layer_forward(layer, w.detach(), b.detach(), x).y
            return avg_pool(x, self.kernels[-1])

        return top(x1), top(x2)

    def hinge_terms(
        self, i: int, z1: Tensor, z2: Tensor, params: dict[str, Tensor], ctx: Context
    ) -> tuple[Tensor, Tensor, Tensor, Grads]:
        """Loss, dL/dz1, dL/dz2 and the predictor gradients of layer i's pooled codes."""
        c1, c2 = ctx
        loss, gz1, gz2, gP = hinge.hinge_grads(z1, z2, c1, c2, self._pred(i, "fb.", params))
        return loss, gz1, gz2, {f"rule.{i}.fb.{k}": g for k, g in gP.items()}

    def hinge_expr(
        self, i: int, z1: Tensor, z2: Tensor, params: dict[str, Tensor], ctx: Context
    ) -> Tensor:
        """The same loss as a differentiable expression (the reference for `hinge_terms`)."""
        c1, c2 = ctx
        return hinge.hinge_loss(z1, z2, c1, c2, self._pred(i, "fb.", params))

    def layer_grads(
        self,
        i: int,
        layer: LayerSpec,
        o1: LayerOut,
        o2: LayerOut,
        params: dict[str, Tensor],
        ctx: Context,
    ) -> tuple[Grads, Tensor]:
        k = self.kernels[i]
        z1, z2 = avg_pool(o1.y, k), avg_pool(o2.y, k)
        loss, gz1, gz2, grads = self.hinge_terms(i, z1, z2, params, ctx)
        gw1, gb1 = layer_backward(layer, o1, avg_pool_backward(gz1, o1.y.shape, k))
        gw2, gb2 = layer_backward(layer, o2, avg_pool_backward(gz2, o2.y.shape, k))
        return {f"enc.{i}.w": gw1 + gw2, f"enc.{i}.b": gb1 + gb2, **grads}, loss

    def layer_loss(
        self, i: int, y1: Tensor, y2: Tensor, params: dict[str, Tensor], ctx: Any
    ) -> Tensor:
        k = self.kernels[i]
        return self.hinge_expr(i, avg_pool(y1, k), avg_pool(y2, k), params, ctx)
