"""Calibration: float parameters + a few batches -> a frozen `QuantPlan` and integer parameters.

1. Encoder scales from Brevitas (`quant.layers`): input int8, weights int8 (max-based, then
   `HEADROOM["weight"]` bits coarser: a max-based power-of-two scale puts the largest weight
   at 64..127, and the first updates that push it outward would clip; one bit of room
   takes the clip count of the test runs to zero or a few per million updates), layer outputs
   uint8 (percentile statistics averaged over the batches), all powers of two.
2. Static bounds: every int32 accumulator of the forward and of the hinge must hold its worst
   case (fan-in x max|a| x max|b| < 2^31), else EdgeError. (The Hebbian sums over the batch
   cannot be bounded that way; they saturate at the int32 limits instead.)
3. Predictor scales from max|B| (with `headroom` bits to grow into), prediction scales from
   the integer forward of the calibration batches (max |B c|, |c V|, |z U|).
4. Learning-rate shifts K per parameter tensor. "normalized" (default): K is chosen so that
   the first updates move each element by about `lr` in real units (rms over the batches),
   2^-K ~ lr * 2^f_store / rms(G): a per-tensor power-of-two SGD step that stands in for
   Adam's per-tensor normalisation, fixed at calibration. "sgd": plain SGD at `lr`, K from
   lr * (gradient scale) / (store scale) = 2^-K.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.nets import NetSpec
from quant.clapp_int import error_shift, family_layout, integer_form
from quant.integer import err_key, int_layer_forward, layer_weights, make_noise, window_code
from quant.layers import build_quant_encoder, calibrate_encoder, encoder_exponents
from quant.plan import (
    A_MAX,
    W_MAX,
    X_MAX,
    LayerPlan,
    ParamPlan,
    QuantPlan,
    bias_plan,
    check_accumulator,
    dequantize_param,
    quantize_param,
    store_shift,
    weight_plan,
)
from quant.spec import INT8_ACT, pow2_exponent, quantize

HEADROOM = {"weight": 1, "predictor": 2, "prediction": 1}  # bits of room to grow into
F_LIMIT = 24  # calibrated prediction exponents stay in [-24, 24]
LR_MODES = ("normalized", "sgd")
Views = list[tuple[Tensor, Tensor]]


def quantize_input(x: Tensor, f_in: int) -> Tensor:
    """Float (normalised) images -> int8 at scale 2^-f_in, rounded half to even, saturated."""
    return quantize(x, 2.0**-f_in, 0, INT8_ACT.bits, True, False)


def quantize_params(plan: QuantPlan, params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: quantize_param(params[k], pp) for k, pp in plan.params.items()}


def encoder_layers(
    net: NetSpec,
    rule,
    params: dict[str, Tensor],
    views: Views,
    quant: str,
    headroom: int = 0,
    integer: bool = True,
) -> tuple[tuple[LayerPlan, ...], dict[str, ParamPlan]]:
    """Steps 1 and 2 for the encoder: exponents from Brevitas (weights with `headroom` extra
    bits), bounds, weight and bias plans; the rule's integer layout if `integer`."""
    shift = store_shift(quant)
    layout = family_layout(rule, net) if integer else [((1, 1), ())] * len(net.layers)
    bounds = [
        check_accumulator(
            spec.in_features * (9 if spec.kind == "conv" else 1),
            X_MAX if i == 0 else A_MAX,
            W_MAX,
            f"layer {i} forward",
        )
        for i, spec in enumerate(net.layers)
    ]
    enc = build_quant_encoder(net, params)
    ex = encoder_exponents(calibrate_encoder(enc, [torch.cat(v) for v in views]))
    layers, plans = [], {}
    for i, bound in enumerate(bounds):
        f_x, f_w = (ex.f_in if i == 0 else ex.f_y[i - 1]), ex.f_w[i] - headroom
        plans[f"enc.{i}.w"] = weight_plan(f_w, shift)
        plans[f"enc.{i}.b"] = bias_plan(f_x + f_w, shift, bound)
        window, terms = layout[i]
        shape = net.shapes()[i]
        dim = (
            shape[0]
            if len(shape) == 1
            else shape[0] * (shape[1] // window[0]) * (shape[2] // window[1])
        )
        layers.append(
            LayerPlan(
                f_x,
                i == 0,
                f_w,
                ex.f_y[i],
                window,
                terms,
                e_shift=error_shift(len(terms)),
                code_dim=dim,
            )
        )
    return tuple(layers), plans


def _codes(net: NetSpec, plan: QuantPlan, qparams: dict[str, Tensor], x: Tensor) -> list[Tensor]:
    """Every layer's pooled code (uint8 values, int64) for the int8 input x."""
    codes = []
    for i, layer in enumerate(net.layers):
        w, b = layer_weights(plan, qparams, i)
        x = int_layer_forward(layer, plan.layers[i], w, b, x).y
        codes.append(window_code(x, plan.layers[i].window))
    return codes


def _predictors(i: int, prefix: str, plan: QuantPlan, qparams: dict[str, Tensor]) -> dict:
    keys = (f"rule.{i}.{prefix}{k}" for k in ("B", "U", "V"))
    return {
        k[-1]: dequantize_param(qparams[k], plan.params[k]).double() for k in keys if k in qparams
    }


def prediction_exponents(
    net: NetSpec, plan: QuantPlan, qparams: dict[str, Tensor], views: Views, headroom: int
) -> QuantPlan:
    """f_q, f_t, f_au of every layer from the maxima over the calibration batches (clamped to
    [-F_LIMIT, F_LIMIT]: a layer that is silent during calibration gets a finite scale; 0
    where a tensor does not exist, e.g. f_t for a full B)."""
    maxima = [[0.0, 0.0, 0.0] for _ in net.layers]
    for x1, x2 in views:
        x = quantize_input(torch.cat((x1, x2)), plan.f_in)
        codes = _codes(net, plan, qparams, x)
        for i, lp in enumerate(plan.layers):
            z = codes[i].double() * 2.0**-lp.f_y
            top = codes[-1].double() * 2.0 ** -plan.layers[-1].f_y
            for prefix, kind in lp.terms:
                c = z if kind == "same" else top
                P = _predictors(i, prefix, plan, qparams)
                if "B" in P:
                    q = c @ P["B"].t()
                else:
                    t = c @ P["V"]
                    q = t @ P["U"].t()
                    maxima[i][1] = max(maxima[i][1], float(t.abs().max()))
                    maxima[i][2] = max(maxima[i][2], float((z @ P["U"]).abs().max()))
                maxima[i][0] = max(maxima[i][0], float(q.abs().max()))

    def exp(m: float, room: int, used: bool = True) -> int:
        if not used:
            return 0
        f = pow2_exponent(m, W_MAX) - room if m > 0 else F_LIMIT
        return max(-F_LIMIT, min(F_LIMIT, f))

    layers = tuple(
        replace(
            lp,
            f_q=exp(m[0], headroom),
            f_t=exp(m[1], headroom, m[1] > 0),
            f_au=exp(m[2], 0, m[2] > 0),
        )
        for lp, m in zip(plan.layers, maxima, strict=True)
    )
    return replace(plan, layers=layers)


def check_hinge_bounds(plan: QuantPlan, qparams: dict[str, Tensor]) -> None:
    """Step 2 for the hinge's accumulators (B c, c V, t U^T, z . q, A U)."""
    for name, t in qparams.items():
        if name.startswith("rule."):
            for dim in t.shape:
                check_accumulator(dim, A_MAX, W_MAX, f"{name} products")


def grad_scales(plan: QuantPlan) -> dict[str, float]:
    """The real value of one unit of each integer gradient (see quant.clapp_int)."""
    out, two_n = {}, 2 * plan.batch
    for i, lp in enumerate(plan.layers):
        s_e = 2.0 ** (lp.e_shift - lp.f_q) / (two_n * lp.window[0] * lp.window[1])
        out[f"enc.{i}.w"], out[f"enc.{i}.b"] = s_e * 2.0**-lp.f_x, s_e
        for prefix, kind in lp.terms:
            f_c = lp.f_y if kind == "same" else plan.layers[-1].f_y
            key = f"rule.{i}.{prefix}"
            out[key + "B"] = 2.0 ** -(lp.f_y + f_c) / two_n
            out[key + "U"] = 2.0 ** -(lp.f_y + lp.f_t) / two_n
            out[key + "V"] = 2.0 ** -(f_c + lp.f_au) / two_n
    return {k: v for k, v in out.items() if k in plan.params}


def gradient_rms(
    net: NetSpec, rule, plan: QuantPlan, qparams: dict[str, Tensor], views: Views
) -> dict[str, float]:
    """rms of every integer gradient over the calibration batches (no update is applied)."""
    form = integer_form(rule)
    sums: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    for x1, x2 in views:
        noise = make_noise(plan, qparams, gen)
        q1, q2 = quantize_input(x1, plan.f_in), quantize_input(x2, plan.f_in)
        ctx = form.context(net, plan, qparams, q1, q2)
        x = torch.cat((q1, q2))
        for i, layer in enumerate(net.layers):
            w, b = layer_weights(plan, qparams, i)
            out = int_layer_forward(layer, plan.layers[i], w, b, x)
            grads, _ = form.layer_grads(i, layer, plan, out, qparams, ctx, noise[err_key(i)])
            for k, g in grads.items():
                sums[k] = sums.get(k, 0.0) + float(g.double().pow(2).mean()) / len(views)
            x = out.y
    return {k: math.sqrt(v) for k, v in sums.items()}


def lr_shifts(plan: QuantPlan, rms: dict[str, float] | None, lr: float, lr_mode: str) -> QuantPlan:
    scales = grad_scales(plan)
    params = {}
    for k, pp in plan.params.items():
        if lr_mode == "normalized":
            k_float = math.log2(max(rms[k], 1e-30)) - math.log2(lr) - pp.exponent
        else:
            k_float = math.log2(2.0**-pp.exponent / (lr * scales[k]))
        params[k] = replace(pp, lr_shift=round(k_float), grad_scale=scales[k])
    return replace(plan, params=params, lr=lr)


def make_plan(
    net: NetSpec,
    rule,
    params: dict[str, Tensor],
    views: Views,
    quant: str = "int8-w16",
    lr: float = 1e-3,
    lr_mode: str = "normalized",
    headroom: dict[str, int] | None = None,
    integer: bool = True,
) -> tuple[QuantPlan, dict[str, Tensor]]:
    """Calibrate on `views` (float view pairs, N images each) and quantize `params`.

    integer=False (QAT): only steps 1-3's parameter scales (any rule; every `rule.*` tensor
    is quantized like a weight); no hinge layout, prediction scales or shifts."""
    if lr_mode not in LR_MODES:
        raise EdgeError(f"unknown lr mode {lr_mode!r}; valid: {', '.join(LR_MODES)}")
    if not lr > 0:
        raise EdgeError(f"learning rate must be positive, got {lr}")
    if not views:
        raise EdgeError("calibration needs at least one batch")
    room = {**HEADROOM, **(headroom or {})}
    layers, plans = encoder_layers(net, rule, params, views, quant, room["weight"], integer)
    shift = store_shift(quant)
    for k, v in params.items():
        if k.startswith("rule."):
            f = pow2_exponent(float(v.abs().max()), W_MAX) - room["predictor"]
            plans[k] = weight_plan(f, shift)
    plan = QuantPlan(quant, rule.name, views[0][0].shape[0], layers, plans, lr)
    qparams = quantize_params(plan, params)
    if not integer:
        return plan, qparams
    check_hinge_bounds(plan, qparams)
    plan = prediction_exponents(net, plan, qparams, views, room["prediction"])
    rms = gradient_rms(net, rule, plan, qparams, views) if lr_mode == "normalized" else None
    return lr_shifts(plan, rms, lr, lr_mode), qparams
