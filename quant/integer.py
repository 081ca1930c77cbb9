"""The integer training step: `integer_step(net, rule, plan, qparams, x1, x2, noise)`.

Integer tensors only (int8/uint8/int16/int32 stored; int32 accumulators and error maps,
int64 for the hinge and the updates), every shift and bit width from the `QuantPlan`,
explicit random bits for the stochastic rounding of the update. Both views travel as one
batch of 2N through each layer: the layer's forward, its rule's integer local loss
(`quant.clapp_int`), the Hebbian products and the updates; only
the layer's uint8 output survives to the next layer.

Bit widths of one layer (f_* are the plan's exponents, scales 2^-f):
  x      int8 (layer 0, f_x) or uint8 (previous output)
  w      int8 [-127, 127] = floor_shift(store, 0 | 8), store int8 | int16
  acc    int32 = conv(x, w) + b (b int32 at f_x + f_w); |acc| < 2^31 checked at plan time
  pool   2x2 max of acc, the first maximum in (0,0), (0,1), (1,0), (1,1) order wins
  y      uint8 = clamp(round_shift(acc, f_x + f_w - f_y), 0, 255)   (the ReLU is the clamp)
  e      int8 error at y (from the rule, stochastically rounded; int32 tensors until the
         product), masked by y > 0 and routed to the max-pool's choice
  GW     int32 (saturating) = sum over batch and positions of e x   (the Hebbian product)
  Gb     int32 (saturating) = sum of e
  update store' = clamp(store + stochastic_shift(-G, K, noise), lo, hi), cast to the store dtype
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from edge.nets import LayerSpec, NetSpec
from quant.intops import (
    NOISE_BITS,
    dims,
    div_round,
    int_conv2d,
    int_conv2d_weight,
    int_matmul,
    narrow,
    round_shift,
    saturate,
    saturate32,
    stochastic_shift,
    widen,
)
from quant.plan import A_MAX, DTYPES, LayerPlan, ParamPlan, QuantPlan, forward_value

Metrics = dict[str, Tensor]


@dataclass
class IntLayerOut:
    """What one layer's integer forward leaves for its update (2N rows: view 1, then view 2)."""

    x: Tensor  # input (int8/uint8; flattened for linear layers)
    y: Tensor  # output, uint8
    sel: Tensor | None  # max-pool choice per pooled output: 0..3 = (0,0), (0,1), (1,0), (1,1)
    full_hw: tuple[int, int] | None  # pre-pool map size (H, W)


def layer_weights(plan: QuantPlan, qparams: dict[str, Tensor], i: int) -> tuple[Tensor, Tensor]:
    """Layer i's forward weight (int8, the top bits of the store) and bias (int32)."""
    w, b = f"enc.{i}.w", f"enc.{i}.b"
    w8 = narrow(forward_value(qparams[w], plan.params[w]), torch.int8)
    return w8, narrow(forward_value(qparams[b], plan.params[b]), torch.int32)


def max_pool_first(acc: Tensor) -> tuple[Tensor, Tensor]:
    """2x2/stride-2 max-pool (floor crop) of (N, C, H, W) and which of the four won.

    Ties go to the first in (0,0), (0,1), (1,0), (1,1) order, written out explicitly so the
    choice never depends on a library's scan order: with n_k = [a_k is not the maximum],
    sel = n_0 (1 + n_1 (1 + n_2)). Comparisons only (no differences that could overflow an
    int32 accumulator).
    """
    hp, wp = dims(acc)[2] // 2, dims(acc)[3] // 2
    a = [acc[:, :, i : 2 * hp : 2, j : 2 * wp : 2] for i in (0, 1) for j in (0, 1)]
    m = torch.maximum(torch.maximum(a[0], a[1]), torch.maximum(a[2], a[3]))
    n0, n1, n2 = ((t != m).to(torch.int32) for t in a[:3])
    return m, narrow(n0 * (1 + n1 * (1 + n2)), torch.uint8)


def unpool(g: Tensor, sel: Tensor, hw: tuple[int, int]) -> Tensor:
    """Adjoint of `max_pool_first`: each pooled value goes to its chosen position, zeros else."""
    n, c, hp, wp = dims(g)
    s = sel.to(torch.int32)
    parts = [torch.where(s == k, g, 0) for k in range(4)]  # (0,0), (0,1), (1,0), (1,1)
    full = torch.stack(parts, -1).reshape(n, c, hp, wp, 2, 2).permute(0, 1, 2, 4, 3, 5)
    full = full.reshape(n, c, 2 * hp, 2 * wp)
    return F.pad(full, (0, hw[1] - 2 * wp, 0, hw[0] - 2 * hp))


def int_layer_forward(
    layer: LayerSpec, lp: LayerPlan, w: Tensor, b: Tensor, x: Tensor
) -> IntLayerOut:
    """acc = x * w + b (int32), max-pool on acc, y = clamp(round_shift(acc), 0, 255) as uint8.
    x: int8 (the network input) or uint8, w: int8, b: int32 (`layer_weights`). The plan
    bounds |x * w| + |b| below 2^31, so the accumulator never wraps."""
    sel, hw = None, None
    if layer.kind == "linear":
        x = x.flatten(1)
        acc = int_matmul(x, w.t()) + b
    else:
        acc = int_conv2d(x, w) + b[None, :, None, None]
        if layer.pool:
            hw = dims(acc)[2:]
            acc, sel = max_pool_first(acc)
    y = saturate(round_shift(acc, lp.f_x + lp.f_w - lp.f_y), 0, A_MAX).to(torch.uint8)
    return IntLayerOut(x, y, sel, hw)


def int_layer_backward(layer: LayerSpec, out: IntLayerOut, e: Tensor) -> tuple[Tensor, Tensor]:
    """Integer dW, db (int32, saturating) from the int8-valued error `e` at the layer's output
    (any integer dtype; int32 in the step).

    Mask by y > 0 (the ReLU; exact at the max-pool's choice too), route through the max-pool,
    then the Hebbian product with the layer's own input, accumulated in int32.
    """
    e = torch.where(out.y > 0, e, 0)
    if layer.kind == "linear":
        gw = int_matmul(narrow(e, torch.int8).t(), out.x)
        return saturate32(gw), saturate32(widen(e).sum(0))
    if out.sel is not None:
        e = unpool(e, out.sel, out.full_hw)
    gw = int_conv2d_weight(out.x, narrow(e, torch.int8))
    return saturate32(gw), saturate32(widen(e).sum((0, 2, 3)))


def window_sum(y: Tensor, window: tuple[int, int]) -> Tensor:
    """(N, C, H, W) -> (N, C*H'*W'): sums over non-overlapping kh x kw windows (floor crop),
    int64; (N, F) stays. Flattened in (C, H', W') order, as `edge.rules.base.avg_pool`."""
    if y.dim() == 2:
        return widen(y)
    kh, kw = window
    n, c, h, w = dims(y)
    hp, wp = h // kh, w // kw
    y = widen(y[:, :, : hp * kh, : wp * kw])
    return y.reshape(n, c, hp, kh, wp, kw).sum((3, 5)).flatten(1)


def window_code(y: Tensor, window: tuple[int, int]) -> Tensor:
    """The pooled code z: window averages of uint8 y, rounded half to even, as uint8."""
    return narrow(div_round(window_sum(y, window), window[0] * window[1]), torch.uint8)


def window_spread(g: Tensor, y_shape: torch.Size, window: tuple[int, int]) -> Tensor:
    """Adjoint of `window_sum`: every position of a window gets its window's value (zeros in
    the cropped border). The 1 / (kh kw) of the average lives in the gradient's scale."""
    if len(y_shape) == 2:
        return g
    kh, kw = window
    n, c, h, w = (int(d) for d in y_shape)
    hp, wp = h // kh, w // kw
    g = g.reshape(n, c, hp, 1, wp, 1).expand(n, c, hp, kh, wp, kw).reshape(n, c, hp * kh, wp * kw)
    return F.pad(g, (0, w - wp * kw, 0, h - hp * kh))


def apply_update(
    pp: ParamPlan, store: Tensor, grad: Tensor, noise: Tensor
) -> tuple[Tensor, Tensor]:
    """store' = clamp(store + stochastic_shift(-grad, K, noise), lo, hi), cast back to the store
    dtype after the clamp; also returns how many elements the clamp touched."""
    new = widen(store) + stochastic_shift(-widen(grad), pp.lr_shift, noise)
    clipped = ((new < pp.lo) | (new > pp.hi)).sum()
    return saturate(new, pp.lo, pp.hi).to(DTYPES[pp.dtype]), clipped


def err_key(i: int) -> str:
    """The noise key of layer i's error at its code (`err.{i}.z`: named like a layer tensor,
    so per-layer graphs pick it up with the layer's parameters)."""
    return f"err.{i}.z"


def noise_shapes(plan: QuantPlan, qparams: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """Shapes of the random bits one step consumes, in sorted key order: one per element of
    every planned parameter (its update's stochastic rounding), and `err_key(i)`, 2N x D_i,
    for layer i's error at its code."""
    shapes = {k: tuple(qparams[k].shape) for k in plan.params}
    for i, lp in enumerate(plan.layers):
        if lp.terms:
            shapes[err_key(i)] = (2 * plan.batch, lp.code_dim)
    return dict(sorted(shapes.items()))


def make_noise(
    plan: QuantPlan, qparams: dict[str, Tensor], gen: torch.Generator
) -> dict[str, Tensor]:
    """The random bits of one step: int32 uniform in [0, 2^16) for every `noise_shapes`
    entry, drawn from `gen` in sorted key order (reproducible from the generator's state)."""
    return {
        k: torch.randint(0, 1 << NOISE_BITS, shape, generator=gen, dtype=torch.int32)
        for k, shape in noise_shapes(plan, qparams).items()
    }


def integer_forward(
    net: NetSpec, plan: QuantPlan, qparams: dict[str, Tensor], x: Tensor
) -> list[Tensor]:
    """Every layer's uint8 output for the int8 input x (the quantized network's inference)."""
    outs = []
    for i, layer in enumerate(net.layers):
        w, b = layer_weights(plan, qparams, i)
        x = int_layer_forward(layer, plan.layers[i], w, b, x).y
        outs.append(x)
    return outs


def integer_layer_step(
    net: NetSpec,
    form,
    plan: QuantPlan,
    i: int,
    qparams: dict[str, Tensor],
    x: Tensor,
    ctx: tuple[Tensor, Tensor] | None,
    noise: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """Layer i of `integer_step`: forward of both views (x: 2N rows, view 1 then view 2), the
    rule's integer gradients, the updates. `qparams` and `noise` need hold only layer i's
    tensors. Returns (the uint8 output, the layer's new stores, its loss, clipped count)."""
    layer = net.layers[i]
    w, b = layer_weights(plan, qparams, i)
    out = int_layer_forward(layer, plan.layers[i], w, b, x)
    grads, loss = form.layer_grads(i, layer, plan, out, qparams, ctx, noise[err_key(i)])
    new, clipped = {}, torch.zeros((), dtype=torch.int64)
    for name, g in grads.items():
        new[name], c = apply_update(plan.params[name], qparams[name], g, noise[name])
        clipped = clipped + c
    return out.y, new, loss, clipped


def integer_step(
    net: NetSpec,
    rule,
    plan: QuantPlan,
    qparams: dict[str, Tensor],
    x1: Tensor,
    x2: Tensor,
    noise: dict[str, Tensor],
) -> tuple[dict[str, Tensor], Metrics]:
    """One integer training step of a local rule; returns the new stores and metrics.

    x1, x2: the two views, int8 at the plan's input exponent (`quant.calibrate.quantize_input`).
    noise: `make_noise` output (keys and shapes: `noise_shapes`). The rule needs an integer
    form (`quant.clapp_int.integer_form`), else EdgeError. Metrics: loss (float, dequantized
    from the integer hinge), layer_loss, clipped (stored elements that hit their range).
    The layers run one after the other (`integer_layer_step`); only the uint8 output of one
    survives into the next.
    """
    from quant.clapp_int import integer_form

    form = integer_form(rule)
    ctx = form.context(net, plan, qparams, x1, x2)
    new = dict(qparams)
    x = torch.cat((x1, x2))
    losses, clipped = [], torch.zeros((), dtype=torch.int64)
    for i in range(len(net.layers)):
        x, updated, loss, c = integer_layer_step(net, form, plan, i, qparams, x, ctx, noise)
        new.update(updated)
        losses.append(loss)
        clipped = clipped + c
    layer_loss = torch.stack(losses)
    return new, {"loss": layer_loss.sum(), "layer_loss": layer_loss, "clipped": clipped}
