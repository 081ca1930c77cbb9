"""The on-device head: nearest class means, learned in the training step from few labels.

Beside the local encoder, a device can learn to classify from the labels it sees: the step
takes `labels` (int64, one per image of view 1; -1 where there is none) and keeps, per class,
a decaying sum of the features of its labelled images and a decaying count:

    f_i      = the top block's output of view 1, averaged over a 2 x 2 grid of cells (as the
               linear probe pools it) and flattened
    r_c      = 2^-decay if class c has a labelled image in this step, else 0
    sum_c    = sum_c (1 - r_c) + sum over labelled i of class c of f_i
    count_c  = count_c (1 - r_c) + their number
    predict  = argmin_c || f - sum_c / count_c ||^2            (classes with count_c > 0)

so a class mean follows its last ~2^decay labelled images: the encoder trains in the same
steps, and features from its early states fade instead of staying in the mean.

Why this head: it needs no gradient and no learning rate, one labelled image is enough to
start a class, its state is small (classes x C), and in integer mode it is exact: the features
are the 8-bit codes of the top block's cell averages (`AvgPool`'s integer form); sums and
counts are int32 with FRAC fractional bits, the decay a round-half-even shift (bounded:
sum < 2^(decay + FRAC + 8) x the labelled images a step). The class means and the argmin
are computed where a prediction is asked for (`predict`), not in the step. The state is step
state (`head.sum`, `head.count`), bound in the exported step like the optimizer's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.layers import AvgPool, intops

FRAC = 8  # fractional bits of the integer sums and counts


class PrototypeHead:
    def __init__(self, classes: int, top_shape: tuple[int, ...], decay: int = 3):
        if not 1 <= decay <= 16:
            raise EdgeError(f"head decay must be 1..16 (a rate of 2^-decay), got {decay}")
        self.classes, self.decay = classes, decay
        self.pool = None
        if len(top_shape) == 3 and max(top_shape[1:]) > 1:
            self.pool = AvgPool((max(1, top_shape[1] // 2), max(1, top_shape[2] // 2)))
        shape = top_shape if self.pool is None else self.pool.out_shape(top_shape)
        self.dim = 1
        for d in shape:
            self.dim *= d

    def init_state(self, integer: bool = False) -> dict[str, Tensor]:
        dtype = torch.int32 if integer else torch.float32
        return {"head.sum": torch.zeros(self.classes, self.dim, dtype=dtype),
                "head.count": torch.zeros(self.classes, dtype=dtype)}

    def features(self, ex, y) -> Tensor:
        """Per image: the top block's output on its 2 x 2 cells, flattened (float), or its
        8-bit codes (integer: int32 values)."""
        if ex.integer:
            f = y if self.pool is None else self.pool.int_forward(ex, "", {}, y)[0]
            return f.t.flatten(1).to(torch.int32)
        return (y if self.pool is None else self.pool.forward(ex, {}, y)[0]).flatten(1)

    def update(self, ex, y, labels: Tensor, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The head's state after one step; `y` is the top block's output (stacked streams:
        view 1 is the first len(labels) rows)."""
        n = int(labels.shape[0])
        f = self.features(ex, y)[:n]
        dtype = state["head.sum"].dtype
        onehot = (labels[:, None] == torch.arange(self.classes)[None, :]).to(dtype)
        seen = onehot.sum(0)
        hit = (seen > 0).to(dtype)
        s, c = state["head.sum"], state["head.count"]
        if ex.integer:  # int32 fixed point: exact sums, a rounded decay
            add = (onehot[:, :, None] * f[:, None, :]).sum(0).to(dtype) * (1 << FRAC)
            s = s - hit[:, None] * intops.round_shift(s, self.decay) + add
            c = c - hit * intops.round_shift(c, self.decay) + seen.to(dtype) * (1 << FRAC)
            return {"head.sum": s.to(dtype), "head.count": c.to(dtype)}
        keep = 1 - hit * 2.0**-self.decay
        return {"head.sum": s * keep[:, None] + onehot.t() @ f,
                "head.count": c * keep + seen}

    def predict(self, state: dict[str, Tensor], f: Tensor) -> Tensor:
        """Nearest class mean of float features f (N, C); classes never seen never win."""
        count = state["head.count"].double()
        means = state["head.sum"].double() / count.clamp_min(1)[:, None]
        d = torch.cdist(f.double(), means).pow(2)
        d[:, count == 0] = float("inf")
        return d.argmin(1)

    def accuracy(self, state: dict[str, Tensor], f: Tensor, y: Tensor) -> float:
        if not bool((state["head.count"] > 0).any()):
            return 0.0
        return float((self.predict(state, f) == y).double().mean())

