"""The residual add y = a + b that closes a residual block (`edge.nets.block.Block`).

Adjoint: dL/da = dL/db = g (the same tensor goes down both branches).
Integer form: a at 2^-f_a, b at 2^-f_b (8-bit) are aligned to the finer exponent
F = max(f_a, f_b) by exact left shifts and added (int64):
    y = a 2^(F - f_a) + b 2^(F - f_b)        at 2^-F
The requantization that follows (the block's post-activation, or an Identity) brings it back
to 8 bits. The adjoint is the same tensor to both branches, as in float.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edge.layers.base import QT


def add(a: Tensor, b: Tensor) -> Tensor:
    return a + b


def int_add(a: QT, b: QT) -> QT:
    """Exact; int32 holds it while both 8-bit operands are shifted by at most 22 bits."""
    f = max(a.f, b.f)
    wide = torch.int32 if abs(a.f - b.f) <= 22 else torch.int64
    t = a.t.to(wide) * (1 << (f - a.f)) + b.t.to(wide) * (1 << (f - b.f))
    return QT(t, f)
