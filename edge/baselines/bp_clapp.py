"""Global backprop with the CLAPP++ hinge on the last layer only: gradients through all layers.

The same loss a local rule puts on every layer, but once, on the top, and backpropagated:
it isolates "local vs global credit assignment" from "which loss".
"""

from __future__ import annotations

import torch
from torch import Tensor

from edge.nets import NetSpec, layer_forward, layer_params
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
        last = len(net.layers) - 1
        return {k: v for k, v in self.top.init(net, gen).items() if k.startswith(f"rule.{last}.")}

    def loss(self, net: NetSpec, params: dict[str, Tensor], x1: Tensor, x2: Tensor) -> Tensor:
        for i, layer in enumerate(net.layers):
            w, b = layer_params(params, i)
            x1 = layer_forward(layer, w, b, x1).y
            x2 = layer_forward(layer, w, b, x2).y
        return self.top.layer_loss(len(net.layers) - 1, x1, x2, params, None)
