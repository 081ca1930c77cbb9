"""Integer mode as a `StepProgram`: `quant.integer.integer_step` behind the exporter's contract.

    integer_program(net, rule, plan, qparams) -> StepProgram
    integer_start(net, rule, opt, params, calib, quant) -> (program, qparams, state)

Graph inputs: the integer stores `params/<name>` (int8/int16/int32, from the plan), the step
counter `state/step` (integer mode keeps no optimizer moments), int8 views `x1`, `x2` at the
plan's input exponent, and `noise/<name>`: int32 random bits in [0, 2^16) for the stochastic
rounding of each parameter's update and of each layer's error (`quant.integer.make_noise`).
Outputs as for fp32, plus the `clipped` metric. The integer arithmetic traces to standard
integer ONNX ops (`quant.intops`: ConvInteger, MatMulInteger, Mod/Div floors, Clip before
every narrowing Cast).

Per-layer graphs (`program.layer`) exist for rules whose hinge scores against the layer's own
other view (clapp, clapp++); the direct-feedback rules need the top layer's code from a whole
forward pass, as in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from edge.nets import NetSpec
from export.manifest import NOISE, TensorSpec
from export.program import StepProgram, require_local

NOISE_BITS = 16


def integer_program(net: NetSpec, rule: Any, plan: Any, qparams: dict[str, Tensor]) -> StepProgram:
    from quant.clapp_int import integer_form
    from quant.integer import integer_layer_step, integer_step, noise_shapes

    require_local(rule)
    form = integer_form(rule)
    noise = tuple(  # the step's own layout of random bits: one source of truth
        TensorSpec(NOISE + k, shape, "int32") for k, shape in noise_shapes(plan, qparams).items()
    )

    def step(params, state, x1, x2, bits):
        new, metrics = integer_step(net, rule, plan, params, x1, x2, bits)
        return new, {"step": state["step"] + 1}, metrics

    def layer(i, params_i, state_i, x1, x2, step_count, bits):
        x = torch.cat((x1, x2))
        y, new, loss, _ = integer_layer_step(net, form, plan, i, params_i, x, None, bits)
        n = plan.batch
        return y[:n], y[n:], {**params_i, **new}, dict(state_i), loss

    whole_net = any(kind == "top" for lp in plan.layers for _, kind in lp.terms)
    return StepProgram(
        name=plan.quant, step=step, layer=None if whole_net else layer, noise=noise,
        noise_range=(0, 1 << NOISE_BITS), view_dtype="int8",
        quant={"mode": "integer", "plan": plan.to_dict()},
    )


def integer_state() -> dict[str, Tensor]:
    """Integer mode's optimizer state: only the step counter."""
    return {"step": torch.zeros((), dtype=torch.float32)}


def integer_start(
    net: NetSpec,
    rule: Any,
    opt: Any,
    params: dict[str, Tensor],
    calib: list[tuple[Tensor, Tensor]],
    quant: str,
) -> tuple[StepProgram, dict[str, Tensor], dict[str, Tensor]]:
    """What `edge train --quant QUANT --mode integer` starts from, as an exportable program:
    calibrate on `calib` (float view pairs), quantize `params` (`quant.train.init_quant`,
    learning rate `opt.lr`). Returns (program, integer stores, state)."""
    from quant.train import init_quant

    require_local(rule)
    qs = init_quant(net, rule, params, calib, quant, "integer", opt, lr=opt.lr)
    return integer_program(net, rule, qs.plan, qs.params), qs.params, integer_state()
