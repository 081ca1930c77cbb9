"""Global backprop SSL baseline: SimCLR-style InfoNCE, trained end to end with autograd.

Encoder (the same `NetSpec`, its blocks' eager forward) -> global average pool of the last
block -> projection head (Linear-ReLU-Linear to 128) -> cosine similarity / temperature 0.1
-> NT-Xent over the 2N views of a batch. Not a local rule: every layer's activations stay
alive until the backward pass, which is exactly the memory a local rule saves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from edge.layers import EAGER
from edge.nets import NetSpec


def _linear_init(n_out: int, n_in: int, gen: torch.Generator) -> Tensor:
    return torch.randn(n_out, n_in, generator=gen) * math.sqrt(2.0 / n_in)


def feature_dim(net: NetSpec) -> int:
    return net.shapes()[-1][0]


def gap(y: Tensor) -> Tensor:
    return y.mean((2, 3)) if y.dim() == 4 else y


class BPInfoNCE:
    name = "bp-infonce"
    description = "Global backprop SimCLR: InfoNCE (cosine, T=0.1) on a projection head"
    memory = "every layer's activations of both views until the backward pass, plus the head"
    is_local = False
    default_lr = 1e-3  # AdamW; the SimCLR-style default

    def __init__(self, temperature: float = 0.1, proj_dim: int = 128, hidden: int = 512):
        self.temperature, self.proj_dim, self.hidden = temperature, proj_dim, hidden

    def hparams(self) -> dict:
        return {"temperature": self.temperature, "proj_dim": self.proj_dim, "hidden": self.hidden}

    def check(self, net: NetSpec) -> None:
        pass

    def init(self, net: NetSpec, gen: torch.Generator) -> dict[str, Tensor]:
        d = feature_dim(net)
        h = min(self.hidden, max(d, self.proj_dim))
        return {
            "head.0.w": _linear_init(h, d, gen),
            "head.0.b": torch.zeros(h),
            "head.1.w": _linear_init(self.proj_dim, h, gen),
            "head.1.b": torch.zeros(self.proj_dim),
        }

    def loss(self, net: NetSpec, params: dict[str, Tensor], x1: Tensor, x2: Tensor) -> Tensor:
        x = torch.cat([x1, x2])
        for i, block in enumerate(net.blocks):
            x, _ = block.forward(EAGER, i, params, x)
        h = F.relu(F.linear(gap(x), params["head.0.w"], params["head.0.b"]))
        z = F.normalize(F.linear(h, params["head.1.w"], params["head.1.b"]), dim=1)
        n = x1.shape[0]
        sim = z @ z.t() / self.temperature
        sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=sim.device), float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(sim.device)
        return F.cross_entropy(sim, target)
