"""Flatten: (N, C, H, W) -> (N, C H W) in (C, H, W) order; its adjoint reshapes back.
The same in every form (integer values keep their dtype and scale)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from edge.layers import intops
from edge.layers.base import QT, Primitive, Shape


@dataclass(frozen=True)
class Flatten(Primitive):
    op = "flatten"

    def out_shape(self, shape: Shape) -> Shape:
        return (math.prod(shape),)

    def forward(self, ex, p, x):
        return x.flatten(1), intops.dims(x)[1:]

    def adjoint(self, ex, p, shape, g, need_gx):
        return {}, g.reshape(-1, *shape)

    def int_forward(self, ex, key, p, x):
        return QT(x.t.flatten(1), x.f), intops.dims(x.t)[1:]

    def int_adjoint(self, ex, key, p, shape, g, need_gx):
        return {}, QT(g.t.reshape(-1, *shape), g.f, g.c)
