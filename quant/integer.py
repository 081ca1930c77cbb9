"""Integer mode as an executor of the one step loop: `integer_step(net, form, plan, ...)`.

`IntegerExecutor` runs every primitive's integer form (`edge.layers`) and the rule's integer
form (`edge.rules.hinge.IntHinge`) over `QT` tensors: int8 / uint8 activations between
primitives, int32 accumulators, int8 errors carried as int32, every exponent from the
`QuantPlan`, explicit random bits for every stochastic rounding. `IntegerUpdate` is its
optimizer: store' = clamp(store + stochastic_shift(-G, K), lo, hi) per parameter, K its
learning-rate shift. The loop itself is `edge.step.local_step`, the same function the float
modes run; `integer_step` only quantizes the two views and binds the pieces.

Bit widths of one block (f_* exponents, scales 2^-f):
  x      int8 (block 0, f_in) or the previous block's 8-bit output
  w      int8 [-127, 127] = floor_shift(store, 0 | 8), store int8 | int16;  b int32
  acc    int32 = conv(x, w) + b at f_x + f_w; |acc| < 2^31 checked when the plan is made
  y      8-bit = clamp(round_half_even(acc 2^(f_y - f_acc)), lo, hi) at every activation
  e      int8 error (the rule's, stochastically rounded), masked, routed, requantized with
         stochastic rounding where a block's inner gradient needs it (`<key>.gx`)
  G      int32 (saturating) Hebbian products and sums

Random bits (`noise`): int32 uniform in [0, 2^16), one tensor per parameter (its update's
rounding) and one per error requantization (`err.{block}.z` at the rule's code,
`err.{block}.{j}.gx` inside blocks). `noise_shapes` finds them by running the step once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.layers import EAGER, BatchNorm, Executor, intops
from edge.layers.base import QT
from edge.nets import NetSpec
from edge.step import local_step
from quant.plan import (
    DTYPES,
    W_MAX,
    QuantPlan,
    apply_update,
    forward_value,
)

NOISE_BITS = intops.NOISE_BITS


def noise_key(key: str) -> str:
    """The noise of an error requantization point: `enc.3.1.gx` -> `err.3.1.gx`."""
    return "err." + key.removeprefix("enc.")


class IntegerExecutor(Executor):
    """Integer forms, exponents from `plan`, random bits from `noise` (name -> int32 tensor).

    `traced=True` picks the kernels that trace into integer ONNX graphs (the sums are the
    same). `record=True` makes `noise` answer zeros of whatever shape is asked and remember
    the shapes (how `noise_shapes` finds the step's random-bit inputs)."""

    def __init__(self, plan: QuantPlan, noise: dict[str, Tensor] | None = None,
                 traced: bool = False, record: bool = False):
        super().__init__("integer", traced=traced, integer=True, quantized=True)
        self.plan, self.bits, self.record = plan, noise or {}, record
        self.asked: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ parameters
    def _store(self, name: str, params: dict[str, Tensor]) -> QT:
        pp = self.plan.params[name]
        t = forward_value(params[name], pp)
        dtype = torch.int32 if pp.dtype == "int32" else torch.int8
        return QT(intops.narrow(t, dtype), pp.forward_exponent)

    def prim_params(self, key, prim, params, x):
        if isinstance(prim, BatchNorm):
            raise EdgeError(f"{key}: BatchNorm has no integer form; fold it into the conv "
                            "before it (edge.nets.fold_batchnorm)")
        return {s: self._store(f"{key}.{s}", params) for s in prim.param_shapes()}

    def rule_params(self, key: str, params: dict[str, Tensor]) -> dict[str, QT]:
        """Predictor forward values of one hinge term (`key` = `rule.{i}.{prefix}`)."""
        return {k: self._store(key + k, params) for k in ("B", "U", "V") if key + k in params}

    # ------------------------------------------------------------------ exponents
    def out_exponent(self, key: str, x: QT, hi: int) -> int:
        return self.plan.exp(key)

    def int8_exponent(self, key: str, acc: QT, headroom: int) -> int:
        return self.plan.exp(key)

    def requant_error(self, key: str, acc: QT) -> QT:
        """An inner-gradient accumulator as int8 at its plan exponent (stochastic rounding)."""
        f = self.int8_exponent(key + ".gx", acc, 1)
        t = intops.stochastic_shift(acc.t, acc.f - f, self.noise(noise_key(key) + ".gx", acc.t))
        return QT(intops.saturate(t, -W_MAX, W_MAX).to(torch.int32), f, acc.c)

    # ------------------------------------------------------------------ random bits
    def noise(self, key: str, like: Tensor) -> Tensor:
        shape = intops.dims(like)
        if self.record:
            self.asked[key] = shape
            return torch.zeros(shape, dtype=torch.int32)
        if key not in self.bits:
            raise EdgeError(f"integer step: no random bits for {key!r} (see noise_shapes)")
        t = self.bits[key]
        if intops.dims(t) != shape:
            raise EdgeError(f"random bits {key!r} have shape {list(t.shape)}, need {list(shape)}")
        return t


class IntegerUpdate:
    """The integer optimizer: a stochastic power-of-two SGD step per stored parameter."""

    name = "integer-sgd"

    def __init__(self, plan: QuantPlan):
        self.plan = plan

    def update(self, name: str, store: Tensor, g: QT, state: dict, step: Tensor,
               noise: dict[str, Tensor] | None = None) -> tuple[Tensor, dict]:
        pp = self.plan.params[name]
        if noise is None or name not in noise:
            raise EdgeError(f"integer step: no random bits for the update of {name}")
        return apply_update(pp, store, g.t, noise[name]), {}

    def describe(self) -> dict[str, Any]:
        """What the manifest says about the update: the real optimizer, not the float one."""
        return {"name": self.name, "update": "store' = clamp(store + stochastic_shift(-G, "
                "lr_shift), lo, hi)", "lr_shift": {k: p.lr_shift for k, p in
                                                   self.plan.params.items()},
                "calibrated_lr": self.plan.lr}


def integer_step(
    net: NetSpec,
    form: Any,
    plan: QuantPlan,
    qparams: dict[str, Tensor],
    x1: Tensor,
    x2: Tensor,
    noise: dict[str, Tensor],
    step: Tensor | None = None,
    traced: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One integer training step: (stores, int8 views, random bits) -> (new stores, metrics).

    x1, x2: the two views, int8 at the plan's input exponent (`quantize_input`); `form`: the
    rule's integer form (`rule.integer_form(net)`); noise: `make_noise` (keys and shapes
    `noise_shapes`). Metrics: loss (float, dequantized from the integer hinge), layer_loss.
    """
    if form.rule.negatives:
        raise EdgeError("a rule with a memory of negatives carries step state: use "
                        "integer_step_state")
    state = {"step": torch.zeros((), dtype=torch.int64) if step is None else step}
    new, _, metrics = integer_step_state(net, form, plan, qparams, state, x1, x2, noise, traced)
    return new, metrics


def integer_step_state(
    net: NetSpec, form: Any, plan: QuantPlan, qparams: dict[str, Tensor],
    state: dict[str, Tensor], x1: Tensor, x2: Tensor, noise: dict[str, Tensor],
    traced: bool = False, head=None, labels: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """`integer_step` with the step state in and out: the step counter, the rule's own
    (`form.init_state`: e.g. the negatives' memories) and the head's (`edge.head`)."""
    ex = IntegerExecutor(plan, noise, traced=traced)
    return local_step(net, form, IntegerUpdate(plan), qparams, state, QT(x1, plan.f_in),
                      QT(x2, plan.f_in), ex=ex, noise=noise, head=head, labels=labels)


def noise_shapes(net: NetSpec, form: Any, plan: QuantPlan, qparams: dict[str, Tensor]
                 ) -> dict[str, tuple[int, ...]]:
    """Shapes of the random bits one step consumes, in sorted key order: one per element of
    every planned parameter (its update's stochastic rounding) and every error rounding
    the step asks for (found by running the step once on zeros)."""
    ex = IntegerExecutor(plan, record=True)
    x = torch.zeros((plan.batch, *net.in_shape), dtype=torch.int8)
    state = {"step": torch.zeros((), dtype=torch.int64), **rule_state(net, form, plan, qparams)}
    zeros = {k: torch.zeros(tuple(v.shape), dtype=torch.int32) for k, v in qparams.items()}
    with torch.no_grad():
        local_step(net, form, IntegerUpdate(plan), qparams, state, QT(x, plan.f_in),
                   QT(x.clone(), plan.f_in), ex=ex, noise=zeros)
    shapes = {k: tuple(qparams[k].shape) for k in plan.params}
    shapes.update(ex.asked)
    return dict(sorted(shapes.items()))


def make_noise(shapes: dict[str, tuple[int, ...]], gen: torch.Generator) -> dict[str, Tensor]:
    """The random bits of one step: int32 uniform in [0, 2^16) for every `noise_shapes`
    entry, drawn from `gen` in sorted key order (reproducible from the generator's state)."""
    return {k: torch.randint(0, 1 << NOISE_BITS, shape, generator=gen, dtype=torch.int32)
            for k, shape in sorted(shapes.items())}


def integer_forward(net: NetSpec, plan: QuantPlan, qparams: dict[str, Tensor], x: Tensor,
                    traced: bool = False) -> list[QT]:
    """Every block's 8-bit output for the int8 input x (the quantized network's inference)."""
    ex = IntegerExecutor(plan, traced=traced)
    h, outs = QT(x, plan.f_in), []
    for i, b in enumerate(net.blocks):
        h, _ = b.forward(ex, i, qparams, h)
        outs.append(h)
    return outs


def rule_state(net: NetSpec, form: Any, plan: QuantPlan, qparams: dict[str, Tensor]
               ) -> dict[str, Tensor]:
    """The integer form's initial step state (e.g. the negatives' memories, in the dtypes of
    the codes the blocks' integer outputs give)."""
    zeros = torch.zeros((plan.batch, *net.in_shape), dtype=torch.int8)
    with torch.no_grad():
        return form.init_state(net, integer_forward(net, plan, qparams, zeros))


def quantize_input(x: Tensor, f_in: int) -> Tensor:
    """Float (normalised) images -> int8 at scale 2^-f_in, rounded half to even, clipped."""
    q = torch.round(x.to(torch.float64) * math.ldexp(1.0, f_in))
    return q.clamp(-128, 127).to(torch.int8)


def dequantize(y: QT) -> Tensor:
    return (y.t.to(torch.float64) * math.ldexp(y.c, -y.f)).float()


__all__ = ["DTYPES", "EAGER", "IntegerExecutor", "IntegerUpdate", "dequantize", "integer_forward",
           "integer_step", "integer_step_state", "make_noise", "noise_key", "noise_shapes",
           "quantize_input", "rule_state"]
