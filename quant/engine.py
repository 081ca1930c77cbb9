"""The quantized training engine `edge.app.train` runs when `--quant` is int8 or int8-w16.

`edge.app.train` never imports `quant` (lower layers don't reach up): the CLI hands it this
engine, which has the same five verbs as the float engine there: start, step, tensors (what
the checkpoint holds: the integer stores and the scales' exponents), resume, encoder (the
quantized network's forward, which the probe reads).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from edge.nets import NetSpec
from quant.train import (
    QuantState,
    describe_plan,
    init_quant,
    quant_encode,
    quant_meta,
    quant_step,
    restore_quant,
    state_tensors,
)

# Integer mode's update is SGD with per-tensor power-of-two rates whose rms step is `lr` at
# calibration (quant.calibrate), not AdamW: at the rule's AdamW default it trains too fast.
# Measured (CLAPP++, CIFAR-10 10k images, VGG-6 x1/16, 2 epochs, batch 32; fp32 AdamW 3e-4:
# 48.96 %): int8-w16 at lr 1e-3 39.05 %, 3e-4 47.42 %, 1e-4 48.00 %.
INTEGER_LR_FACTOR = 1 / 3


def integer_default_lr(rule_name: str) -> float:
    """Integer mode's default rate for a rule: its AdamW default x INTEGER_LR_FACTOR."""
    from edge import rules

    return rules.default_lr(rule_name) * INTEGER_LR_FACTOR


class QuantEngine:
    def __init__(self, quant: str, mode: str):
        self.quant, self.mode = quant, mode
        self.qs: QuantState | None = None

    def bind(self, net: NetSpec, rule, opt) -> None:
        self.net, self.rule, self.opt = net, rule, opt

    def start(self, params: dict[str, Tensor], calib: list[tuple[Tensor, Tensor]]) -> None:
        self.qs = init_quant(
            self.net, self.rule, params, calib, self.quant, self.mode, self.opt, lr=self.opt.lr
        )

    def step(self, v1: Tensor, v2: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
        self.qs, metrics = quant_step(self.net, self.rule, self.qs, v1, v2, gen, self.opt)
        return metrics

    def tensors(self) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
        return self.qs.params, state_tensors(self.qs), quant_meta(self.qs)

    def resume(self, params: dict[str, Tensor], state: dict[str, Tensor], meta: dict) -> None:
        self.qs = restore_quant(params, state, meta)

    def encoder(self) -> Callable[[Tensor], list[Tensor]]:
        qs, net = self.qs, self.net
        return lambda x: quant_encode(net, qs, x)

    def describe(self) -> dict[str, Any]:
        return describe_plan(self.qs)
