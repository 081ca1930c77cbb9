"""The quantized training engine the training loop runs for `--quant int8 | int8-w16`.

Same verbs as the float engine (`edge.app.train.FloatEngine`): `bind` (net, rule, optimizer),
`start` (from float parameters and a few calibration view pairs), `step` (two float views),
`tensors` (what the checkpoint holds), `resume`, `encoder` (the quantized network's forward,
which the probe reads), `describe`.

    qat      fp32 latent weights, the QAT executor's fake-quantized forward (`quant.qat`),
             the rule's own optimizer; any local rule
    integer  integer stores (int8 / int16 weights, int32 biases), the integer executor and
             update (`quant.integer`); the checkpoint and `weights_digest` cover exactly what
             the device holds; the rule needs an integer form (the CLAPP family)

`step_factory(net, rule, plan, stores)` makes the function that replaces the integer step's
executor once the plan exists (e.g. the exported integer graph on a runtime,
`export.runner.integer_stepper`): called as step_fn(stores, state, x1_int8, x2_int8, noise),
it returns (new stores, new state, metrics); the state is the step counter and the rule's
own (its negatives' memories). Random bits are drawn from the step's generator after its
views, in sorted key order, so a run is reproducible from its seed whatever runs the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.nets import NetSpec
from quant.calibrate import make_plan, qat_plan
from quant.integer import (
    dequantize,
    integer_forward,
    integer_step_state,
    make_noise,
    noise_shapes,
    quantize_input,
    rule_state,
)
from quant.plan import QUANTS, QuantPlan, dequantize_param
from quant.qat import QATExecutor, fake_quant, qat_step

MODES = ("qat", "integer")
# Integer mode's update is SGD with per-tensor power-of-two rates whose rms step is `lr` at
# calibration (quant.calibrate), not AdamW: at the rule's AdamW default it trains too fast
# (benchmarks/quant_accuracy.py measures the rates).
INTEGER_LR_FACTOR = 1 / 3


def integer_default_lr(rule_name: str) -> float:
    """Integer mode's default rate for a rule: its AdamW default x INTEGER_LR_FACTOR."""
    from edge import rules

    return rules.default_lr(rule_name) * INTEGER_LR_FACTOR


def check(quant: str, mode: str) -> None:
    if quant not in QUANTS:
        raise EdgeError(f"unknown --quant {quant!r}; valid: fp32, {', '.join(QUANTS)}")
    if mode not in MODES:
        raise EdgeError(f"unknown --mode {mode!r}; valid: {', '.join(MODES)}")


class QuantEngine:
    def __init__(self, quant: str, mode: str, step_factory: Callable | None = None,
                 head: Any = None):
        check(quant, mode)
        self.quant, self.mode, self.step_factory, self.head = quant, mode, step_factory, head
        self.step_fn: Callable | None = None
        self.plan: QuantPlan | None = None

    def bind(self, net: NetSpec, rule: Any, opt: Any) -> None:
        self.net, self.rule, self.opt = net, rule, opt
        if self.mode == "integer":
            self.form = rule.integer_form(net)

    def start(self, params: dict[str, Tensor], calib: list) -> None:
        if self.mode == "qat":
            self.plan = qat_plan(self.net, self.rule, params, calib)
            self.params = {k: v.clone() for k, v in params.items()}
            self.state = {**self.opt.init_state(self.params), **self.rule.init_state(self.net)}
            if self.head is not None:
                self.state.update(self.head.init_state())
            return
        self.plan, self.params = make_plan(self.net, self.rule, params, calib, self.quant,
                                           self.opt.lr)
        self.state = {"step": torch.zeros((), dtype=torch.int64),
                      **rule_state(self.net, self.form, self.plan, self.params)}
        if self.head is not None:
            self.state.update(self.head.init_state(integer=True))
        self._ready()

    def _ready(self) -> None:
        self._shapes = noise_shapes(self.net, self.form, self.plan, self.params)
        if self.step_factory is not None:
            self.step_fn = self.step_factory(self.net, self.rule, self.plan, self.params)

    def step(self, v1: Tensor, v2: Tensor, gen: torch.Generator,
             labels: Tensor | None = None) -> dict[str, Tensor]:
        if self.mode == "qat":
            params, state, metrics = qat_step(
                self.net, self.rule, self.opt, self.plan, self.params, self.state, v1, v2,
                head=self.head, labels=labels)
            if not torch.stack([torch.isfinite(v).all() for v in params.values()]).all():
                return {**metrics, "finite_params": torch.tensor(False)}
            self.params, self.state = params, state
            return metrics
        if v1.shape[0] != self.plan.batch:
            raise EdgeError(f"integer mode was calibrated for batches of {self.plan.batch}, "
                            f"got {v1.shape[0]}")
        q1, q2 = quantize_input(v1, self.plan.f_in), quantize_input(v2, self.plan.f_in)
        noise = make_noise(self._shapes, gen)
        if self.step_fn is not None:
            self.params, self.state, metrics = self.step_fn(self.params, self.state, q1, q2,
                                                            noise, labels)
        else:
            self.params, self.state, metrics = integer_step_state(
                self.net, self.form, self.plan, self.params, self.state, q1, q2, noise,
                head=self.head, labels=labels)
        return metrics

    def head_features(self, x: Tensor) -> Tensor:
        """The head's features of float images x, in the head's own units."""
        if self.mode == "qat":
            return self.head.features(QATExecutor(self.plan), self.encoder()(x)[-1])
        from edge.layers.base import QT  # noqa: F401 - the integer features are QT codes
        from quant.integer import IntegerExecutor

        with torch.no_grad():
            y = integer_forward(self.net, self.plan, self.params,
                                quantize_input(x, self.plan.f_in))[-1]
        return self.head.features(IntegerExecutor(self.plan), y).double()

    def tensors(self) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
        state = dict(self.state)
        state["exp.in"] = torch.tensor(self.plan.f_in, dtype=torch.int32)
        for k, f in self.plan.exps.items():
            state[f"exp.{k}"] = torch.tensor(f, dtype=torch.int32)
        for k, pp in self.plan.params.items():
            state[f"exp.{k}"] = torch.tensor(pp.exponent, dtype=torch.int32)
        return self.params, state, {"mode": self.mode, "plan": self.plan.to_dict()}

    def resume(self, params: dict[str, Tensor], state: dict[str, Tensor], meta: dict) -> None:
        self.plan = QuantPlan.from_dict(meta["plan"])
        for k, pp in self.plan.params.items():
            e = state.get(f"exp.{k}")
            if e is not None and int(e) != pp.exponent:
                raise EdgeError(f"checkpoint exponent of {k} ({int(e)}) disagrees with its plan")
        self.params = dict(params)
        self.state = {k: v for k, v in state.items() if not k.startswith("exp.")}
        if self.mode == "integer":
            self._ready()

    def encoder(self) -> Callable[[Tensor], list[Tensor]]:
        net, plan = self.net, self.plan
        if self.mode == "integer":
            stores = self.params

            def integer(x: Tensor) -> list[Tensor]:
                with torch.no_grad():
                    ys = integer_forward(net, plan, stores, quantize_input(x, plan.f_in))
                return [dequantize(y) for y in ys]

            return integer
        ex, params = QATExecutor(plan), self.params

        def qat(x: Tensor) -> list[Tensor]:
            outs, h = [], fake_quant(x, plan.f_in, -128, 127)
            with torch.no_grad():
                for i, b in enumerate(net.blocks):
                    h, _ = b.forward(ex, i, params, h)
                    outs.append(h)
            return outs

        return qat

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "quant": self.plan.quant if self.mode ==
                               "integer" else "int8", "input_exponent": self.plan.f_in,
                               "exponents": dict(self.plan.exps)}
        if self.mode == "integer":
            out["lr_shifts"] = {k: pp.lr_shift for k, pp in self.plan.params.items()}
            out["effective_lr"] = {  # the equivalent SGD learning rate of each shift
                k: 2.0 ** -(pp.lr_shift + pp.exponent) / pp.grad_scale
                for k, pp in self.plan.params.items() if pp.grad_scale > 0}
        return out

    def latent_params(self) -> dict[str, Tensor]:
        """Full-resolution real values (int16 stores included; QAT: the fp32 latents)."""
        if self.mode == "qat":
            return self.params
        return {k: dequantize_param(v, self.plan.params[k], latent=True)
                for k, v in self.params.items()}
