"""Integer mode as a `StepProgram`: `quant.integer.integer_step` behind the exporter's contract.

    integer_program(net, rule, plan, qparams) -> StepProgram

Graph inputs: the integer stores `params/<name>` (int8/int16/int32, from the plan), the step
counter `state/step` (integer mode keeps no optimizer moments), int8 views `x1`, `x2` at the
plan's input exponent, and `noise/<name>`: int32 random bits in [0, 2^16) for the stochastic
rounding of each parameter's update (`quant.integer.make_noise`). Outputs as for fp32, plus
the `clipped` metric. Whether the graph exports is up to `quant.intops` (integer ops emitted
explicitly, see `tests/test_export_step.py::test_integer_program`).
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
    from quant.integer import integer_step, noise_shapes

    require_local(rule)
    noise = tuple(  # the step's own layout of random bits: one source of truth
        TensorSpec(NOISE + k, shape, "int32") for k, shape in noise_shapes(plan, qparams).items()
    )

    def step(params, state, x1, x2, bits):
        new, metrics = integer_step(net, rule, plan, params, x1, x2, bits)
        return new, {"step": state["step"] + 1}, metrics

    return StepProgram(
        name=plan.quant, step=step, layer=None, noise=noise, noise_range=(0, 1 << NOISE_BITS),
        view_dtype="int8", quant={"mode": plan.quant, "plan": plan.to_dict()},
    )


def integer_state() -> dict[str, Tensor]:
    """Integer mode's optimizer state: only the step counter."""
    return {"step": torch.zeros((), dtype=torch.float32)}
