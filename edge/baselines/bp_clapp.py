"""Global backprop with the CLAPP++ hinge on the last layer only: gradients through all layers.

The same loss a local rule puts on every layer, but once, on the top, and backpropagated:
it isolates "local vs global credit assignment" from "which loss".
"""

from __future__ import annotations

import torch
from torch import Tensor

from edge.layers import EAGER
from edge.nets import NetSpec
from edge.rules.clapp_pp import ClappPP


class BPClappPP:
    name = "bp-clapp++"
    description = "Global backprop of the CLAPP++ hinge placed on the last layer only"
    memory = "every layer's activations of both views until the backward pass"
    is_local = False
    default_lr = 1e-4  # AdamW

    def __init__(self, **clapp_hparams):
        self.top = ClappPP(**clapp_hparams)

    def hparams(self) -> dict:
        return self.top.hparams()

    def check(self, net: NetSpec) -> None:
        self.top.check(net)

    def init(self, net: NetSpec, gen: torch.Generator) -> dict[str, Tensor]:
        last = len(net.blocks) - 1
        return {k: v for k, v in self.top.init(net, gen).items() if k.startswith(f"rule.{last}.")}

    def loss(self, net: NetSpec, params: dict[str, Tensor], x1: Tensor, x2: Tensor) -> Tensor:
        x = torch.cat((x1, x2))
        for i, block in enumerate(net.blocks):
            x, _ = block.forward(EAGER, i, params, x)
        return self.top.layer_loss(len(net.blocks) - 1, x, params, None)
