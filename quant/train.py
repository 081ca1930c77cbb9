"""What the training loop calls for `edge train --quant int8|int8-w16 --mode qat|integer`.

    qs = init_quant(net, rule, params, calib, quant="int8-w16", mode="integer", opt=opt)
    for each batch:  v1, v2 = two_views(...)            (float, normalised, N images each)
                     qs, metrics = quant_step(net, rule, qs, v1, v2, gen, opt)
    checkpoint.save(path, qs.params, state_tensors(qs), {..., "quant": quant_meta(qs)})
    resume:          qs = restore_quant(params, state, meta["quant"])
    probe features:  quant_encode(net, qs, x)           (the quantized network's outputs)
                     or dequantized_params(qs) with the float encoder (weights only)

`params` are the float initial parameters (`edge.app.train.initial_params`); `calib` a few float
view pairs (e.g. the first 4 batches of epoch 0, drawn from their own generator). In integer
mode `qs.params` are the integer stores (int8 / int16 weights, int32 biases), so the
checkpoint and `weights_digest(qs.params)` cover exactly what the device holds; the scales
are in `state_tensors` (exponent tensors) and in `quant_meta` (the full plan). In QAT mode
`qs.params` are the fp32 latent weights and `qs.state` the optimizer's state. `gen` draws the
stochastic-rounding bits after the step's views, so a run is reproducible from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.nets import NetSpec
from quant.calibrate import make_plan, quantize_input
from quant.integer import integer_forward, integer_step, make_noise
from quant.plan import QUANTS, QuantPlan, dequantize_param, quantize_param
from quant.qat import qat_step
from quant.spec import dequantize, pow2_scale

MODES = ("qat", "integer")
Metrics = dict[str, Tensor]


@dataclass(frozen=True)
class QuantState:
    """Everything a quantized run carries from step to step."""

    mode: str  # "qat" | "integer"
    plan: QuantPlan
    params: dict[str, Tensor]  # integer stores (integer) or fp32 latent weights (qat)
    state: dict[str, Tensor]  # {"step"} (integer) or the optimizer state (qat)


def _check(quant: str, mode: str) -> None:
    if quant not in QUANTS:
        raise EdgeError(f"unknown --quant {quant!r}; valid: fp32, {', '.join(QUANTS)}")
    if mode not in MODES:
        raise EdgeError(f"unknown --mode {mode!r}; valid: {', '.join(MODES)}")


def init_quant(
    net: NetSpec,
    rule,
    params: dict[str, Tensor],
    calib: list[tuple[Tensor, Tensor]],
    quant: str = "int8-w16",
    mode: str = "integer",
    opt=None,
    lr: float = 1e-3,
    lr_mode: str = "normalized",
) -> QuantState:
    """Calibrate on `calib` and start a quantized run from float `params`.

    integer: `lr` is the initial per-element step in real units ("normalized", see
    `quant.calibrate`), turned into power-of-two shifts; `opt` is unused.
    qat: `opt` (an `edge.optim.OptimConfig`) trains the latent weights as in fp32.
    """
    _check(quant, mode)
    if mode == "qat":
        if opt is None:
            raise EdgeError("qat mode needs the rule's optimizer (opt)")
        plan, _ = make_plan(net, rule, params, calib, "int8", integer=False)
        latent = {k: v.clone() for k, v in params.items()}
        return QuantState(mode, plan, latent, opt.init_state(latent))
    plan, qparams = make_plan(net, rule, params, calib, quant, lr, lr_mode)
    return QuantState(mode, plan, qparams, {"step": torch.zeros((), dtype=torch.int64)})


def quant_step(
    net: NetSpec, rule, qs: QuantState, x1: Tensor, x2: Tensor, gen: torch.Generator, opt=None
) -> tuple[QuantState, Metrics]:
    """One training step on float views x1, x2 (quantized to int8 here)."""
    if qs.mode == "qat":
        params, state, metrics = qat_step(net, rule, opt, qs.plan, qs.params, qs.state, x1, x2)
        return replace(qs, params=params, state=state), metrics
    if x1.shape[0] != qs.plan.batch:
        raise EdgeError(
            f"integer mode was calibrated for batches of {qs.plan.batch}, got {x1.shape[0]}"
        )
    q1, q2 = quantize_input(x1, qs.plan.f_in), quantize_input(x2, qs.plan.f_in)
    noise = make_noise(qs.plan, qs.params, gen)
    params, metrics = integer_step(net, rule, qs.plan, qs.params, q1, q2, noise)
    return replace(qs, params=params, state={"step": qs.state["step"] + 1}), metrics


def integer_params(qs: QuantState) -> dict[str, Tensor]:
    """The integer stores (QAT: the latent weights quantized as the forward sees them)."""
    if qs.mode == "integer":
        return qs.params
    return {k: quantize_param(qs.params[k], pp) for k, pp in qs.plan.params.items()}


def quant_encode(net: NetSpec, qs: QuantState, x: Tensor) -> list[Tensor]:
    """Every layer's output of the quantized network for float input x, dequantized (float):
    the integer forward pass, bit-exact with the Brevitas encoder at the plan's scales."""
    with torch.no_grad():
        ys = integer_forward(net, qs.plan, integer_params(qs), quantize_input(x, qs.plan.f_in))
    return [dequantize(y, pow2_scale(lp.f_y)) for y, lp in zip(ys, qs.plan.layers, strict=True)]


def dequantized_params(qs: QuantState) -> dict[str, Tensor]:
    """Float parameters equal to what the quantized forward multiplies by."""
    ip = integer_params(qs)
    return {k: dequantize_param(ip[k], pp) for k, pp in qs.plan.params.items()}


def state_tensors(qs: QuantState) -> dict[str, Tensor]:
    """The run's state plus every exponent as int32 scalars (scale = 2^-exponent):
    `exp.in`, `exp.{i}.y` and `exp.{param}` (of the store)."""
    out = dict(qs.state)
    out["exp.in"] = torch.tensor(qs.plan.f_in, dtype=torch.int32)
    for i, lp in enumerate(qs.plan.layers):
        out[f"exp.{i}.y"] = torch.tensor(lp.f_y, dtype=torch.int32)
    for k, pp in qs.plan.params.items():
        out[f"exp.{k}"] = torch.tensor(pp.exponent, dtype=torch.int32)
    return out


def quant_meta(qs: QuantState) -> dict[str, Any]:
    """JSON-able: the mode and the full plan (shifts, ranges, layouts)."""
    return {"mode": qs.mode, "plan": qs.plan.to_dict()}


def restore_quant(
    params: dict[str, Tensor], state: dict[str, Tensor], meta: dict[str, Any]
) -> QuantState:
    """Inverse of (qs.params, state_tensors(qs), quant_meta(qs)) for resuming."""
    plan = QuantPlan.from_dict(meta["plan"])
    run_state = {k: v for k, v in state.items() if not k.startswith("exp.")}
    for k, pp in plan.params.items():
        exp = state.get(f"exp.{k}")
        if exp is not None and int(exp) != pp.exponent:
            raise EdgeError(f"checkpoint exponent of {k} ({int(exp)}) disagrees with its plan")
    return QuantState(meta["mode"], plan, dict(params), run_state)


def describe_plan(qs: QuantState) -> dict[str, Any]:
    """A short summary for result.json: effective per-tensor learning rates and exponents."""
    out = {
        "mode": qs.mode,
        "quant": qs.plan.quant,
        "input_exponent": qs.plan.f_in,
        "layers": [{"f_w": lp.f_w, "f_y": lp.f_y, "f_q": lp.f_q} for lp in qs.plan.layers],
    }
    if qs.mode == "integer":
        out["lr_shifts"] = {k: pp.lr_shift for k, pp in qs.plan.params.items()}
        out["effective_lr"] = {
            k: 2.0 ** -(pp.lr_shift + pp.exponent) / pp.grad_scale  # the equivalent SGD lr
            for k, pp in qs.plan.params.items()
        }
    return out


def latent_params(qs: QuantState) -> dict[str, Tensor]:
    """Full-resolution real values (int16 stores included; QAT: the fp32 latents)."""
    if qs.mode == "qat":
        return qs.params
    return {k: dequantize_param(v, qs.plan.params[k], latent=True) for k, v in qs.params.items()}
