"""CLAPP++ with both targets (arXiv 2601.21683): same-layer prediction plus direct feedback.

Layer l carries two predictors and sums two bilinear hinges of its pooled code z_l:
  L = hinge(z_l against the other view's z_l, B^l)          (CLAPP++, D x D)
    + hinge(z_l against the other view's c_top, F^l)        (direct feedback, D x Dc)
The modulators, predictions and Hebbian terms simply add up: dL/dz = dL_same/dz + dL_fb/dz,
then one pass back through this layer's pooling, max-pool and ReLU to dW. The context is
the top-layer forward pass of `edge.rules.clapp_dfb`; like it, needs >= 2 layers.
"""

from __future__ import annotations

from torch import Tensor

from edge.rules import hinge
from edge.rules.clapp_dfb import ClappDFB, Context, Grads


class ClappBoth(ClappDFB):
    name = "clapp++both"
    description = "CLAPP++ same-layer hinge plus the direct-feedback hinge (two predictors a layer)"
    memory = (
        "layer input and output of both views, the pooled D-vectors, both views' pooled top "
        "codes (Dc), B (D x D) and feedback B (D x Dc), each full or rank r"
    )

    def predictor_shapes(self, i: int, dims: list[int]) -> dict[str, tuple[int, int]]:
        return {"": (dims[i], dims[i]), **super().predictor_shapes(i, dims)}

    def hinge_terms(
        self, i: int, z1: Tensor, z2: Tensor, params: dict[str, Tensor], ctx: Context
    ) -> tuple[Tensor, Tensor, Tensor, Grads]:
        loss, gz1, gz2, grads = super().hinge_terms(i, z1, z2, params, ctx)
        same, hz1, hz2, gP = hinge.hinge_grads(z1, z2, z1, z2, self._pred(i, "", params))
        grads.update({f"rule.{i}.{k}": g for k, g in gP.items()})
        return loss + same, gz1 + hz1, gz2 + hz2, grads

    def hinge_expr(
        self, i: int, z1: Tensor, z2: Tensor, params: dict[str, Tensor], ctx: Context
    ) -> Tensor:
        same = hinge.hinge_loss(z1, z2, z1.detach(), z2.detach(), self._pred(i, "", params))
        return super().hinge_expr(i, z1, z2, params, ctx) + same
