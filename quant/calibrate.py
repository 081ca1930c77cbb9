"""Calibration: float parameters + a few batches -> a frozen `QuantPlan` and integer stores.

Integer mode (`make_plan`). The integer step itself does the work: it runs once, without
updating anything, over all calibration batches stacked into one batch, with an executor
(`Calibrator`) that fixes every exponent the first time the step asks for it, from the
tensor it is about to requantize, and quantizes every parameter the first time it is read:

  input           int8 at f_in from the 99.999th percentile of |x| (the views, normalised)
  weights         int8, max-based, `HEADROOM["weight"]` bit(s) coarser: a max-based
                  power-of-two scale puts the largest weight at 64..127, and the first updates
                  that push it outward would clip
  biases          int32 at the accumulator's exponent f_x + f_w, bounded so acc + b fits
  predictors      int8, max-based, `HEADROOM["predictor"]` bits to grow into
  activations     8-bit at every activation / requantization point from the 99.999th
                  percentile of the accumulator's real values (saturating above it)
  int8 points     predictions (B c, c V, m Z U) and inner-block input gradients: max-based,
                  one bit of headroom (`HEADROOM["prediction"]`, `HEADROOM["error"]`)
  accumulators    every forward accumulator's worst case (fan-in x max|x| x max|w|) must fit
                  int32, else EdgeError (the Hebbian sums cannot be bounded that way: they
                  saturate at the int32 limits)
Then the learning-rate shifts, per parameter tensor, from the rms of its integer gradient G
over the calibration batch: "normalized" (default) chooses K so that the first updates move
each element by about `lr` in real units, 2^-K ~ lr * 2^f_store / rms(G) (a per-tensor
power-of-two SGD step that stands in for Adam's per-tensor normalisation, fixed at
calibration); "sgd" is plain SGD at `lr`: 2^-K = lr * grad_scale * 2^f_store (also the
rule for a tensor whose gradient is all zero on the calibration batch). K stays in K_RANGE.

QAT (`qat_plan`). Any rule: a float forward through the blocks with fake-quantization points,
exponents set the same way (percentiles of activations, max-based weights and predictors).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.layers import EAGER, BatchNorm, Conv, Executor, Linear
from edge.layers.base import QT
from edge.nets import NetSpec
from edge.step import local_step
from quant.integer import IntegerExecutor, quantize_input
from quant.plan import (
    A_MAX,
    W_MAX,
    X_MAX,
    ParamPlan,
    QuantPlan,
    bias_plan,
    check_accumulator,
    quantize_param,
    store_shift,
    weight_plan,
)
from quant.spec import pow2_exponent

HEADROOM = {"weight": 1, "predictor": 2, "prediction": 1, "error": 1}  # bits to grow into
F_LIMIT = 24  # calibrated exponents stay in [-24, 24] (a silent tensor gets a finite scale)
PERCENTILE = 99.999
LR_MODES = ("normalized", "sgd")
K_RANGE = (-8, 40)  # learning-rate shifts: at most 2^8 store units per gradient unit
SAMPLE = 1 << 20  # values a percentile reads (an even-strided sample of bigger tensors)
Views = list[tuple[Tensor, Tensor]]


def percentile(t: Tensor, q: float = PERCENTILE) -> float:
    """The q-th percentile of |t| (an even-strided sample of at most SAMPLE values)."""
    a = t.detach().reshape(-1).abs().double()
    if a.numel() > SAMPLE:
        a = a[:: -(-a.numel() // SAMPLE)]
    k = max(1, min(a.numel(), math.ceil(q / 100 * a.numel())))
    return float(torch.kthvalue(a, k).values)


def _exponent(value: float, qmax: int, headroom: int = 0) -> int:
    if not value > 0:
        return F_LIMIT
    return max(-F_LIMIT, min(F_LIMIT, pow2_exponent(value, qmax) - headroom))


def _real(x: QT) -> Tensor:
    return x.t.double() * math.ldexp(1.0, -x.f)


class Calibrator(IntegerExecutor):
    """The integer executor that makes the plan as the step first asks for each entry."""

    def __init__(self, quant: str, rule: str, batch: int, f_in: int, params: dict[str, Tensor]):
        super().__init__(QuantPlan(quant, rule, batch, f_in))
        self.float_params, self.shift = params, store_shift(quant)
        self.exps: dict[str, int] = {}
        self.pplans: dict[str, ParamPlan] = {}
        self.stores: dict[str, Tensor] = {}
        self.gen = torch.Generator().manual_seed(0)

    def _plan(self) -> QuantPlan:
        return replace(self.plan, exps=dict(self.exps), params=dict(self.pplans))

    def _quantize(self, name: str, pp: ParamPlan) -> QT:
        self.pplans[name] = pp
        self.stores[name] = quantize_param(self.float_params[name], pp)
        self.plan = self._plan()
        return self._store(name, self.stores)

    def _weight(self, name: str, headroom: int) -> QT:
        if name in self.pplans:
            return self._store(name, self.stores)
        f = _exponent(float(self.float_params[name].abs().max()), W_MAX, headroom)
        return self._quantize(name, weight_plan(f, self.shift))

    def prim_params(self, key, prim, params, x):
        if isinstance(prim, BatchNorm):
            return super().prim_params(key, prim, params, x)
        out = {}
        for s in prim.param_shapes():
            name = f"{key}.{s}"
            if s == "w" or name in self.pplans:
                out[s] = self._weight(name, HEADROOM["weight"])
                continue
            w = out["w"]
            fan = math.prod(prim.param_shapes()["w"][1:]) if isinstance(prim, Conv | Linear) else 1
            x_max = 255 if x.t.dtype == torch.uint8 else X_MAX
            bound = check_accumulator(fan, x_max, W_MAX, f"{key} forward")
            out[s] = self._quantize(name, bias_plan(x.f + w.f, self.shift, bound))
        return out

    def rule_params(self, key, params):
        out = {}
        for k in ("B", "U", "V"):
            if key + k in params:
                t = self.float_params[key + k]
                for dim in t.shape:
                    check_accumulator(dim, A_MAX, W_MAX, f"{key + k} products")
                out[k] = self._weight(key + k, HEADROOM["predictor"])
        return out

    def out_exponent(self, key, x, hi):
        if key not in self.exps:
            self.exps[key] = _exponent(percentile(_real(x)), hi)
            self.plan = self._plan()
        return self.exps[key]

    def int8_exponent(self, key, acc, headroom):
        if key not in self.exps:
            room = HEADROOM["error"] if key.endswith(".gx") else headroom
            self.exps[key] = _exponent(float(_real(acc).abs().max()), W_MAX, room)
            self.plan = self._plan()
        return self.exps[key]

    def noise(self, key, like):
        return torch.randint(0, 1 << 16, intops_dims(like), generator=self.gen, dtype=torch.int32)


def intops_dims(t: Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


class _GradRms:
    """Calibration's optimizer: records rms and real unit of every integer gradient."""

    def __init__(self):
        self.rms: dict[str, float] = {}
        self.scale: dict[str, float] = {}

    def update(self, name, p, g: QT, state, step, noise=None):
        self.rms[name] = float(g.t.double().pow(2).mean().sqrt())
        self.scale[name] = math.ldexp(g.c, -g.f)
        return p, {}


def input_exponent(views: Views) -> int:
    return _exponent(percentile(torch.cat([torch.cat(v) for v in views])), X_MAX - 1)


def make_plan(
    net: NetSpec,
    rule: Any,
    params: dict[str, Tensor],
    views: Views,
    quant: str = "int8-w16",
    lr: float = 1e-3,
    lr_mode: str = "normalized",
) -> tuple[QuantPlan, dict[str, Tensor]]:
    """Calibrate the integer step on `views` (float view pairs of N images each; stacked
    into one batch) and quantize `params`. `net` must have its BatchNorms folded."""
    if lr_mode not in LR_MODES:
        raise EdgeError(f"unknown lr mode {lr_mode!r}; valid: {', '.join(LR_MODES)}")
    if not (lr > 0 and math.isfinite(lr)):
        raise EdgeError(f"learning rate must be a positive finite number, got {lr}")
    if not views:
        raise EdgeError("calibration needs at least one batch")
    form = rule.integer_form(net)
    f_in = input_exponent(views)
    x1 = quantize_input(torch.cat([v[0] for v in views]), f_in)
    x2 = quantize_input(torch.cat([v[1] for v in views]), f_in)
    cal = Calibrator(quant, rule.name, views[0][0].shape[0], f_in, params)
    rms = _GradRms()
    state = {"step": torch.zeros((), dtype=torch.int64)}
    with torch.no_grad():
        local_step(net, form, rms, params, state, QT(x1, f_in), QT(x2, f_in), ex=cal)
    missing = sorted(set(params) - set(cal.pplans))
    if missing:
        raise EdgeError(f"calibration never read {', '.join(missing[:3])}: not a parameter the "
                        f"integer step of {rule.name!r} trains")
    plans = {}
    for k, pp in cal.pplans.items():
        g_rms, scale = rms.rms.get(k, 0.0), rms.scale.get(k, 0.0)
        if lr_mode == "normalized" and g_rms > 0:
            k_float = math.log2(g_rms) - math.log2(lr) - pp.exponent
        else:  # plain SGD at lr (also where the gradient was all zero at calibration)
            k_float = math.log2(2.0**-pp.exponent / (lr * scale)) if scale > 0 else K_RANGE[1]
        k_int = max(K_RANGE[0], min(K_RANGE[1], round(k_float)))
        plans[k] = replace(pp, lr_shift=k_int, grad_scale=scale)
    plan = replace(cal.plan, exps=dict(cal.exps), params=plans, lr=lr)
    return plan, {k: cal.stores[k] for k in params}


class _QATRecorder(Executor):
    """A float executor with the quantization points that records their exponents."""

    def __init__(self):
        super().__init__("qat-calibration", quantized=True)
        self.exps: dict[str, int] = {}
        self.weights: dict[str, float] = {}

    def weight(self, key, name, w):
        full = f"{key}.{name}"
        self.weights[full] = max(self.weights.get(full, 0.0), float(w.detach().abs().max()))
        return w

    def act(self, key, y, signed):
        if key not in self.exps:
            self.exps[key] = _exponent(percentile(y), 127 if signed else A_MAX)
        return y


def qat_plan(net: NetSpec, rule: Any, params: dict[str, Tensor], views: Views) -> QuantPlan:
    """Exponents for QAT (any rule): activations, weights and predictors (int8)."""
    rec = _QATRecorder()
    with torch.no_grad():
        for x1, x2 in views[:1]:
            x = rule.inputs(x1, x2)
            rule.check(net)
            for i, b in enumerate(net.blocks):
                x, _ = b.forward(rec, i, params, x)
                x = rule.next_input(i, x)
    plans = {}
    for name, m in rec.weights.items():
        if name.endswith(".w"):
            plans[name] = weight_plan(_exponent(m, W_MAX, HEADROOM["weight"]), 0)
    for name, t in params.items():
        if name.startswith("rule."):
            plans[name] = weight_plan(_exponent(float(t.abs().max()), W_MAX,
                                                HEADROOM["predictor"]), 0)
    return QuantPlan("int8", rule.name, views[0][0].shape[0], input_exponent(views), rec.exps,
                     plans)


__all__ = ["EAGER", "make_plan", "percentile", "qat_plan"]
