"""Quantization-aware training of any local rule: fp32 latent weights, quantized forward.

QAT is an executor of the one step loop (`edge.step.local_step`), not a loop of its own:
`QATExecutor` fake-quantizes what the integer step would hold in 8 bits, through the hooks
every primitive and block already calls,
    weight(key, name, w)   conv / linear weights and the rule's predictors: int8 at the
                           plan's exponent, narrow range [-127, 127]
    act(key, y, signed)    every requantization point (activations, and the Identity after
                           a conv, linear or residual add no activation follows): uint8
                           [0, 255] or int8 [-128, 127] at the plan's exponent
and the views are fake-quantized to int8 at f_in before the step. The rule's closed-form
update then runs in floating point on these quantized values, and the optimizer applies it
to the latent fp32 weights: the straight-through estimator, written out (no autograd).
Biases stay float (int32 at the accumulator's scale is below float32's own resolution).

This is the accuracy upper bound of integer mode: the same quantization points and scales,
but float update arithmetic and the rule's own optimizer. It works for every local rule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from edge.layers import Executor
from edge.nets import NetSpec
from edge.step import local_step
from quant.plan import QuantPlan


def fake_quant(x: Tensor, f: int, lo: int, hi: int) -> Tensor:
    """dequantize(clamp(round_half_even(x 2^f), lo, hi)) at 2^-f."""
    s = math.ldexp(1.0, f)
    return torch.clamp(torch.round(x * s), lo, hi) / s


class QATExecutor(Executor):
    def __init__(self, plan: QuantPlan, traced: bool = False):
        super().__init__("qat", traced=traced, quantized=True)
        self.plan = plan

    def weight(self, key: str, name: str, w: Tensor) -> Tensor:
        pp = self.plan.params.get(f"{key}.{name}")
        return w if pp is None else fake_quant(w, pp.forward_exponent, -127, 127)

    def act(self, key: str, y: Tensor, signed: bool) -> Tensor:
        lo, hi = (-128, 127) if signed else (0, 255)
        return fake_quant(y, self.plan.exp(key), lo, hi)


def qat_step(net: NetSpec, rule, opt, plan: QuantPlan, params: dict[str, Tensor],
             state: dict[str, Tensor], x1: Tensor, x2: Tensor, traced: bool = False,
             donate: bool = False, head=None, labels: Tensor | None = None):
    """One QAT step: (latent params, optimizer state, float views) -> (params', state',
    metrics); `opt` is the rule's `edge.optim.OptimConfig`."""
    q1, q2 = (fake_quant(x, plan.f_in, -128, 127) for x in (x1, x2))
    return local_step(net, rule, opt, params, state, q1, q2, ex=QATExecutor(plan, traced),
                      donate=donate, head=head, labels=labels)
