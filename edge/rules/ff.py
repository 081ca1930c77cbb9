"""Forward-Forward (Hinton 2022), unsupervised: real images score high goodness, hybrids low.

Goodness of one sample's block output y, F = its number of units:
  g(y) = mean_f y_f^2          (the mean, not Hinton's sum, so one scale fits every width)
Per layer, both views as positives and one negative per image (n_i, built from image i).
The default loss is SymBa's (Lee & Song 2023, arXiv 2303.08418): each positive against its
own negative, no threshold,
  L = 1/2 mean_i softplus(alpha (g(yn_i) - g(y1_i)))
    + 1/2 mean_i softplus(alpha (g(yn_i) - g(y2_i)))
Hinton's thresholded loss is `loss=threshold` (`threshold` is read only by it, `alpha` only
by SymBa):
  L = 1/2 mean_i softplus(theta - g(y1_i)) + 1/2 mean_i softplus(theta - g(y2_i))
    + mean_i softplus(g(yn_i) - theta)
At initialisation here the hybrids' goodness is above the views' and both are above theta=1,
so the threshold loss spends its first updates pushing every unit's activity down (and the
features degrade as it trains); SymBa only asks for the gap, whatever the level.
Closed form: per sample, dL/dg of each stream (`_loss_and_dg`; for SymBa the negative's is
minus the two views' together), dL/dy = dL/dg * 2 y / F, then the block's own adjoint (one
call over all three streams: the weight gradient sums over their rows).

Negatives (a third stream, built in `inputs`): the hybrid xn_i = m_i * x1_i + (1 - m_i) *
x2_{i-1} of image i's first view and image i-1's second view (the batch rolled by one),
through a smooth mask as in Hinton's paper: a random binary image blurred `blur` times by
[1/4, 1/2, 1/4] along both axes, thresholded at 0.5. The masks are a fixed bank of `masks`
drawn once per input size from `seed`; sample i of a batch takes mask i mod `masks`. So a
step stays a pure function of its inputs (no generator state to checkpoint, a constant in an
exported graph), and the shuffled batches still pair every mask with ever new images.

Each block hands on its output length-normalised, y / sqrt(mean_f y_f^2 + eps) (`next_input`),
so the next block sees the direction of the activity but not its goodness. The negatives go up
the same way: they are rows of the same stacked batch, forwarded with the same weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from edge.errors import EdgeError
from edge.nets import NetSpec
from edge.rules.base import LocalRule

EPS = 1e-6
LOSSES = ("symba", "threshold")


def goodness(y: Tensor) -> Tensor:
    return y.flatten(1).pow(2).mean(1)


def blur_masks(k: int, h: int, w: int, blur: int, gen: torch.Generator) -> Tensor:
    """k smooth binary masks (k, 1, h, w): random bits, blurred `blur` times, thresholded."""
    m = torch.randint(0, 2, (k, 1, h, w), generator=gen).float()
    f = torch.tensor([0.25, 0.5, 0.25])
    for _ in range(blur):
        m = F.conv2d(F.pad(m, (1, 1, 0, 0), mode="replicate"), f.view(1, 1, 1, 3))
        m = F.conv2d(F.pad(m, (0, 0, 1, 1), mode="replicate"), f.view(1, 1, 3, 1))
    return (m > 0.5).float()


class ForwardForward(LocalRule):
    name = "ff"
    description = "Forward-Forward (unsupervised): real views out-score hybrid negatives"
    memory = "block input and output of both views and of the negatives (3 streams); no predictor"
    streams = 3
    # AdamW at the base rate (3e-4). With Hinton's threshold loss the features degraded the
    # longer it trained (MNIST, 1 epoch of 10k, batch 16); with SymBa they improve at 3e-4,
    # and degrade at 1e-3 (benchmarks/mnist_rules.py).

    def __init__(
        self,
        threshold: float = 1.0,
        masks: int = 64,
        blur: int | None = None,
        seed: int = 0,
        loss: str = "symba",
        alpha: float = 4.0,
    ):
        if loss not in LOSSES:
            raise EdgeError(f"ff loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if alpha <= 0:
            raise EdgeError(f"ff alpha must be > 0, got {alpha}")
        if masks < 1:
            raise EdgeError(f"ff needs at least 1 mask, got {masks}")
        if blur is not None and blur < 0:
            raise EdgeError(f"ff blur must be >= 0 passes, got {blur}")
        self.threshold, self.masks, self.blur, self.seed = threshold, masks, blur, seed
        self.loss, self.alpha = loss, alpha
        self._bank: dict[tuple[int, int], Tensor] = {}

    def hparams(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "masks": self.masks, "blur": self.blur,
                "seed": self.seed, "loss": self.loss, "alpha": self.alpha}

    def check(self, net: NetSpec) -> None:
        # Draw the mask bank now, outside any trace: built lazily inside an exported step,
        # its private generator would be traced as a constant the exporter cannot express.
        if len(net.in_shape) == 3:
            self.mask_bank(net.in_shape[1], net.in_shape[2])

    def init(self, net: NetSpec, gen: torch.Generator) -> dict[str, Tensor]:
        self.check(net)
        return {}

    def mask_bank(self, h: int, w: int) -> Tensor:
        """The fixed masks for h x w inputs; `blur` defaults to min(h, w) // 5 (>= 1) passes."""
        if (h, w) not in self._bank:
            blur = self.blur if self.blur is not None else max(1, min(h, w) // 5)
            gen = torch.Generator().manual_seed(self.seed)
            self._bank[(h, w)] = blur_masks(self.masks, h, w, blur, gen)
        return self._bank[(h, w)]

    def negatives(self, x1: Tensor, x2: Tensor) -> Tensor:
        if x1.dim() != 4:
            raise EdgeError("ff builds its negatives from image inputs (N, C, H, W)")
        n, _, h, w = x1.shape
        m = self.mask_bank(int(h), int(w))  # plain ints: traced shapes would miss the cache
        m = m[torch.arange(n) % self.masks].to(x1.dtype)
        return m * x1 + (1 - m) * torch.roll(x2, 1, 0)

    def inputs(self, x1: Tensor, x2: Tensor) -> Tensor:
        return torch.cat((x1, x2, self.negatives(x1, x2)))

    def next_input(self, i: int, y: Tensor) -> Tensor:
        dims = tuple(range(1, y.dim()))
        return y / (y.pow(2).mean(dims, keepdim=True) + EPS).sqrt()

    def output_grads(self, i, ex, y, params, ctx, state=None):
        n = y.shape[0] // 3
        loss, dgs = self._loss_and_dg(list(goodness(y).split(n)))
        dg = torch.cat(dgs) / n
        gy = dg.view(-1, *([1] * (y.dim() - 1))) * (2 / y[0].numel()) * y
        return loss, gy, {}, {}

    def _loss_and_dg(self, g: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The loss from the goodness of the three streams (views 1, 2, negatives) and, per
        stream and sample, N * dL/dg."""
        g1, g2, gn = g
        if self.loss == "threshold":
            m1, m2, mn = self.threshold - g1, self.threshold - g2, gn - self.threshold
            loss = 0.5 * (F.softplus(m1).mean() + F.softplus(m2).mean()) + F.softplus(mn).mean()
            return loss, [-0.5 * torch.sigmoid(m1), -0.5 * torch.sigmoid(m2), torch.sigmoid(mn)]
        a = self.alpha  # symba: each view against its own image's negative, no threshold
        m1, m2 = a * (gn - g1), a * (gn - g2)
        loss = 0.5 * (F.softplus(m1).mean() + F.softplus(m2).mean())
        d1, d2 = 0.5 * a * torch.sigmoid(m1), 0.5 * a * torch.sigmoid(m2)
        return loss, [-d1, -d2, d1 + d2]

    def layer_loss(self, i, y, params, ctx, state=None):
        n = y.shape[0] // 3
        return self._loss_and_dg(list(goodness(y).split(n)))[0]
