"""The integer plan: every bit width, power-of-two exponent and shift of the quantized step.

A `QuantPlan` is plain frozen data, fixed at calibration time and saved with the checkpoint
(`to_dict` / `from_dict`); the integer step (`quant.integer`), its NumPy reference
(`quant.reference`) and the exporter read everything they need from it. Scales are 2^-f; an
exponent is the f.

Stored parameters (`ParamPlan`): an integer `store` of `dtype` in [lo, hi], scale 2^-exponent.
The forward pass uses `floor_shift(store, shift)`: shift 0 in int8 mode; shift 8 in int8-w16
mode, where the int16 store keeps 8 extra low bits and its top 8 bits feed the forward. The
store is initialised as round(w * 2^exponent) + 2^(shift-1) (half a forward step up), so the
floor of the shift rounds the latent weight to the nearest forward step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from edge.errors import EdgeError
from quant.intops import INT32_MAX, floor_shift

QUANTS = {"int8": 0, "int8-w16": 8}  # quant mode -> store shift (extra low bits of the store)
W_MAX = 127  # forward weights, predictors and signed intermediates: int8, narrow [-127, 127]
A_MAX = 255  # activations after a ReLU: uint8 [0, 255]
X_MAX = 128  # the network input: int8 [-128, 127]
DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32}
CONTEXTS = ("same", "top")  # a hinge term's context: this layer's other view, or the top layer


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


@dataclass(frozen=True)
class LayerPlan:
    """Exponents of one layer's tensors and the shape of its local loss."""

    f_x: int  # input: int8 (layer 0) or uint8 (after the previous ReLU)
    x_signed: bool
    f_w: int  # forward weight (int8); the bias is int32 at f_x + f_w
    f_y: int  # output (uint8); the pooled code z is uint8 at f_y too
    window: tuple[int, int]  # (kh, kw) of the code's average pooling; (1, 1): none
    terms: tuple[tuple[str, str], ...] = ()  # hinge terms: (predictor key prefix, context)
    f_q: int = 0  # predictions B c (int8), shared by all terms of the layer
    f_t: int = 0  # low rank: c V (int8)
    f_au: int = 0  # low rank: A U, the modulated anchors through U (int8)
    e_shift: int = 1  # error requantization: e = stochastic_shift(sum of +-q, e_shift), int8
    code_dim: int = 0  # D, the length of the pooled code z (the error noise is 2N x D)


@dataclass(frozen=True)
class QuantPlan:
    quant: str  # "int8" | "int8-w16"
    rule: str
    batch: int  # images per view per step (the static batch size)
    layers: tuple[LayerPlan, ...]
    params: dict[str, ParamPlan] = field(default_factory=dict)
    lr: float = 1e-3

    @property
    def f_in(self) -> int:
        return self.layers[0].f_x

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> QuantPlan:
        layers = tuple(
            LayerPlan(
                **{
                    **lp,
                    "window": tuple(lp["window"]),
                    "terms": tuple(tuple(t) for t in lp["terms"]),
                }
            )
            for lp in d["layers"]
        )
        params = {k: ParamPlan(**v) for k, v in d["params"].items()}
        return QuantPlan(d["quant"], d["rule"], d["batch"], layers, params, d["lr"])


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
    """What the forward pass multiplies by (int64): the top bits of the store."""
    return floor_shift(store.to(torch.int64), pp.shift)


def dequantize_param(store: Tensor, pp: ParamPlan, latent: bool = False) -> Tensor:
    """The forward value as float (default), or the full-resolution latent value."""
    if latent:
        return ((store.to(torch.float64) - pp.offset) * math.ldexp(1.0, -pp.exponent)).float()
    scale = math.ldexp(1.0, pp.shift - pp.exponent)
    return (forward_value(store, pp).to(torch.float64) * scale).float()
