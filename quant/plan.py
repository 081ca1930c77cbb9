"""The integer plan: every bit width, power-of-two exponent and shift of a quantized step.

A `QuantPlan` is plain frozen data, fixed at calibration (`quant.calibrate`) and saved with
the checkpoint and the bundle manifest (`to_dict` / `from_dict`); the integer executor
(`quant.integer`), the QAT executor (`quant.qat`), the NumPy reference (`quant.reference`)
and the exporter read everything from it. Scales are 2^-f; an exponent is the f.

    f_in     the network input: int8 at 2^-f_in (round half to even, clip)
    exps     {point: exponent} of every requantization point, keyed like the primitives
             (`edge.nets.block`): activation outputs (`enc.3.1`, `enc.3.0.q` after a conv no
             activation follows, `enc.3.add.q`), int8 predictions of the hinge
             (`rule.3.q`, `rule.3.t`, `rule.3.au`, prefixed `rule.3.fb.` for feedback
             predictors), and int8 input-gradients inside blocks (`enc.3.1.gx`)
    params   {parameter: ParamPlan}: its integer store

Stored parameters (`ParamPlan`): an integer `store` of `dtype` in [lo, hi], scale
2^-exponent. The forward pass uses `floor_shift(store, shift)`: shift 0 in int8 mode; shift 8
in int8-w16 mode, where the int16 store keeps 8 extra low bits and its top 8 bits feed the
forward. The store is initialised as round(w * 2^exponent) + 2^(shift-1) (half a forward
step up), so the floor of the shift rounds the latent weight to the nearest forward step.
The update is store' = clamp(store + stochastic_shift(-G, lr_shift), lo, hi) (`apply_update`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.layers.intops import INT32_MAX, floor_shift, saturate, stochastic_shift, widen

QUANTS = {"int8": 0, "int8-w16": 8}  # quant mode -> store shift (extra low bits of the store)
W_MAX = 127  # forward weights, predictors and signed intermediates: int8, narrow [-127, 127]
A_MAX = 255  # activations after a ReLU: uint8 [0, 255]
X_MAX = 128  # the network input: int8 [-128, 127]
DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32}


@dataclass(frozen=True)
class ParamPlan:
    """One stored parameter: real latent value = (store - offset) * 2^-exponent."""

    exponent: int
    lo: int
    hi: int
    dtype: str
    shift: int  # forward value = floor_shift(store, shift), at exponent - shift
    lr_shift: int = 0  # K: the update is stochastic_shift(-G, K), G the integer gradient
    grad_scale: float = 0.0  # real value of one unit of the integer gradient G

    @property
    def offset(self) -> int:
        return (1 << self.shift) >> 1

    @property
    def forward_exponent(self) -> int:
        return self.exponent - self.shift


@dataclass(frozen=True)
class QuantPlan:
    quant: str  # "int8" | "int8-w16"
    rule: str
    batch: int  # images per view per step (the static batch size of exported steps)
    f_in: int
    exps: dict[str, int] = field(default_factory=dict)
    params: dict[str, ParamPlan] = field(default_factory=dict)
    lr: float = 1e-3

    def exp(self, key: str) -> int:
        if key not in self.exps:
            raise EdgeError(f"the integer plan has no exponent for {key!r}; recalibrate for "
                            "this network and rule")
        return self.exps[key]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> QuantPlan:
        try:
            params = {k: ParamPlan(**v) for k, v in d["params"].items()}
            return QuantPlan(d["quant"], d["rule"], int(d["batch"]), int(d["f_in"]),
                             {k: int(v) for k, v in d["exps"].items()}, params, float(d["lr"]))
        except (KeyError, TypeError, ValueError) as e:
            raise EdgeError(f"malformed integer plan ({type(e).__name__}: {e})") from None


def store_shift(quant: str) -> int:
    if quant not in QUANTS:
        raise EdgeError(f"unknown integer quantization {quant!r}; valid: {', '.join(QUANTS)}")
    return QUANTS[quant]


def check_accumulator(fan_in: int, a_max: int, b_max: int, what: str, extra: int = 0) -> int:
    """The worst-case |sum of fan_in products| (+ extra); EdgeError if it reaches 2^31."""
    bound = fan_in * a_max * b_max + extra
    if bound > INT32_MAX:
        raise EdgeError(
            f"{what}: {fan_in} inputs x max|a| {a_max} x max|b| {b_max} = {bound} overflows the "
            "int32 accumulator (>= 2^31); use fewer inputs per output or narrower operands"
        )
    return bound


def weight_plan(f_w: int, shift: int) -> ParamPlan:
    """An int8 forward weight at exponent f_w, stored with `shift` extra bits (int8 or int16)."""
    lo, hi = -W_MAX << shift, (W_MAX << shift) + (1 << shift) - 1
    return ParamPlan(f_w + shift, lo, hi, "int16" if shift else "int8", shift)


def bias_plan(f_acc: int, shift: int, acc_bound: int) -> ParamPlan:
    """An int32 bias at the accumulator's exponent, kept small enough that acc + bias fits."""
    b_max = min(INT32_MAX - acc_bound, (INT32_MAX >> shift) - 1)
    if b_max < 1:
        raise EdgeError(f"no room left for a bias in the int32 accumulator (bound {acc_bound})")
    return ParamPlan(
        f_acc + shift, -b_max << shift, (b_max << shift) + (1 << shift) - 1, "int32", shift
    )


def quantize_param(x: Tensor, pp: ParamPlan) -> Tensor:
    """Latent real value -> store: round half to even at 2^-exponent, offset, clip, cast."""
    q = torch.round(x.to(torch.float64) * math.ldexp(1.0, pp.exponent)) + pp.offset
    return q.clamp(pp.lo, pp.hi).to(DTYPES[pp.dtype])


def forward_value(store: Tensor, pp: ParamPlan) -> Tensor:
    """What the forward pass multiplies by (int32): the top bits of the store."""
    return floor_shift(store.to(torch.int32), pp.shift)


def dequantize_param(store: Tensor, pp: ParamPlan, latent: bool = False) -> Tensor:
    """The forward value as float (default), or the full-resolution latent value."""
    if latent:
        return ((store.to(torch.float64) - pp.offset) * math.ldexp(1.0, -pp.exponent)).float()
    scale = math.ldexp(1.0, pp.shift - pp.exponent)
    return (forward_value(store, pp).to(torch.float64) * scale).float()


def apply_update(pp: ParamPlan, store: Tensor, grad: Tensor, noise: Tensor) -> Tensor:
    """store' = clamp(store + stochastic_shift(-grad, K, noise), lo, hi), cast back to the
    store dtype after the clamp. `grad` is the saturated int32 gradient (|grad| <= GRAD_MAX:
    -grad plus the rounding offset is an int32); for 8/16-bit stores and K >= 1 the sum stays
    within int32 (|store| < 2^15, |step| <= 2^30) and is computed there, else in int64: the
    same values either way."""
    if pp.dtype in ("int8", "int16") and pp.lr_shift >= 1 and grad.dtype == torch.int32:
        new = store.to(torch.int32) + stochastic_shift(-grad, pp.lr_shift, noise, bounded=True)
    else:
        new = widen(store) + stochastic_shift(-widen(grad), pp.lr_shift, noise)
    return saturate(new, pp.lo, pp.hi).to(DTYPES[pp.dtype])
