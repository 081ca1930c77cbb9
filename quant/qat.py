"""Quantization-aware training of any local rule: fp32 latent weights, quantized forward.

The step is `edge.step.local_step` with the forward pass quantized: the input is int8 at the
plan's input exponent, each layer multiplies by its fake-quantized weight (int8 at f_w) and
bias (int32 at f_x + f_w), its output is fake-quantized to uint8 at f_y, and the rule sees
fake-quantized predictors. The rule's closed-form update then runs, in floating point, on
these quantized activations and weights, and the optimizer applies it to the latent fp32
weights: the straight-through estimator, written out (no autograd involved).

Rule hooks, where a rule has them, are honoured as in `edge.step`: `context` and
`next_context` (direct-feedback top codes, Forward-Forward negatives) run with the
fake-quantized weights on their own (float) activations; `next_input` (Forward-Forward's
length normalisation) rescales the uint8 output per sample, which the next layer's linear
accumulation absorbs as a per-sample scale.

This is the accuracy upper bound of the integer mode: same scales, same quantized forward,
but float update arithmetic and the rule's own optimizer. The int8 / int8-w16 distinction
does not apply (the latent weights are fp32).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from edge.nets import NetSpec, layer_forward
from quant.calibrate import quantize_input
from quant.plan import A_MAX, QuantPlan, dequantize_param, quantize_param
from quant.spec import dequantize, pow2_scale, quantize

Metrics = dict[str, Tensor]


def fake_quant_params(plan: QuantPlan, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every planned parameter as the forward pass sees it (dequantized int8 / int32 values);
    parameters the plan does not cover pass through unchanged."""
    out = dict(params)
    for k, pp in plan.params.items():
        out[k] = dequantize_param(quantize_param(params[k], pp), pp)
    return out


def fake_quant_input(plan: QuantPlan, x: Tensor) -> Tensor:
    s = pow2_scale(plan.f_in)
    return dequantize(quantize_input(x, plan.f_in), s)


def fake_quant_output(y: Tensor, f_y: int) -> Tensor:
    """uint8 at 2^-f_y (the ReLU output is already >= 0; the clamp saturates at 255)."""
    s = pow2_scale(f_y)
    return dequantize(quantize(y, s, 0, 8, False, False), s).clamp(max=A_MAX * s)


def qat_step(
    net: NetSpec,
    rule,
    opt,
    plan: QuantPlan,
    params: dict[str, Tensor],
    state: dict[str, Tensor],
    x1: Tensor,
    x2: Tensor,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Metrics]:
    """One QAT step: (latent params, optimizer state, float views) -> (params', state', metrics).

    `opt` is the rule's `edge.optim.OptimConfig`; metrics as `edge.step.local_step`.
    """
    step = state["step"] + 1
    new_params, new_state = dict(params), dict(state)
    fq = fake_quant_params(plan, params)
    x1, x2 = fake_quant_input(plan, x1), fake_quant_input(plan, x2)
    ctx = rule.context(net, fq, x1, x2)
    next_input = getattr(rule, "next_input", None)
    next_context = getattr(rule, "next_context", None)
    losses = []
    for i, layer in enumerate(net.layers):
        w, b = fq[f"enc.{i}.w"], fq[f"enc.{i}.b"]
        o1, o2 = layer_forward(layer, w, b, x1), layer_forward(layer, w, b, x2)
        f_y = plan.layers[i].f_y
        o1 = dataclasses.replace(o1, y=fake_quant_output(o1.y, f_y))
        o2 = dataclasses.replace(o2, y=fake_quant_output(o2.y, f_y))
        grads, loss = rule.layer_grads(i, layer, o1, o2, fq, ctx)
        for name, g in grads.items():  # straight through: the latent weight takes the update
            new_params[name], upd = opt.update(name, params[name], g, state, step)
            new_state.update(upd)
        losses.append(loss)
        x1, x2 = o1.y, o2.y
        if next_input is not None:
            x1, x2 = next_input(i, x1), next_input(i, x2)
        if next_context is not None:
            ctx = next_context(i, fq, ctx)
        del o1, o2, grads
    new_state["step"] = step
    layer_loss = torch.stack(losses)
    return new_params, new_state, {"loss": layer_loss.sum(), "layer_loss": layer_loss}
