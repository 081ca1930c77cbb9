"""What the exporter traces: a `StepProgram`, the pluggable arithmetic of one training step.

The fp32 program is `edge.step.local_step` itself (whole step) and its loop body (one
layer). Integer mode plugs in by building another `StepProgram` over integer tensors, with
named random-bit inputs for stochastic rounding (`noise`, one per parameter, say) and a
`quant` description for the manifest; graph builders, manifests, runners and bundles do not
change.

Contracts (all pure tensor functions, no autograd, no branching on tensor values):
  step(params, state, x1, x2, noise) -> (params', state', metrics)      metrics: loss, layer_loss
  layer(i, params_i, state_i, x1, x2, step, noise_i) -> (y1, y2, params_i', state_i', loss)
where params_i / state_i / noise_i hold only layer i's tensors (`enc.{i}.*`, `rule.{i}.*`,
their optimizer moments and noise), `step` is the step count *before* this step, y1, y2 are
the next layer's inputs, and noise is a dict keyed like the parameters (empty for fp32).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from edge.errors import EdgeError
from edge.nets import NetSpec, layer_forward, layer_params
from edge.optim import OptimConfig
from edge.rules.base import LocalRule
from edge.step import local_step
from export.manifest import TensorSpec

Tensors = dict[str, Tensor]
StepFn = Callable[[Tensors, Tensors, Tensor, Tensor, Tensors], tuple[Tensors, Tensors, Tensors]]
LayerFn = Callable[
    [int, Tensors, Tensors, Tensor, Tensor, Tensor, Tensors],
    tuple[Tensor, Tensor, Tensors, Tensors, Tensor],
]


@dataclass(frozen=True)
class StepProgram:
    name: str  # "fp32", or the integer mode's name
    step: StepFn
    layer: LayerFn | None = None  # None: no per-layer graphs for this program
    noise: tuple[TensorSpec, ...] = ()  # random-bit inputs, named like the params they round
    noise_range: tuple[int, int] = (0, 1 << 16)  # uniform integers in [low, high)
    view_dtype: str = "float32"
    quant: dict[str, Any] | None = None  # for the manifest; None: fp32


def require_local(rule: Any) -> LocalRule:
    if not getattr(rule, "is_local", False):
        raise EdgeError(
            f"rule {getattr(rule, 'name', rule)!r} trains by global backprop (autograd); "
            "only local rules export as a forward training graph"
        )
    return rule


def fp32_program(net: NetSpec, rule: LocalRule, opt: OptimConfig) -> StepProgram:
    """The torch loop's own step, traced as is."""
    require_local(rule)
    rule.check(net)

    def step(params: Tensors, state: Tensors, x1: Tensor, x2: Tensor, noise: Tensors):
        return local_step(net, rule, opt, params, state, x1, x2)

    def layer(i: int, params_i: Tensors, state_i: Tensors, x1: Tensor, x2: Tensor,
              step_count: Tensor, noise: Tensors):
        return fp32_layer_step(net, rule, opt, i, params_i, state_i, x1, x2, step_count)

    return StepProgram("fp32", step, layer if has_no_context(rule) else None)


def has_no_context(rule: LocalRule) -> bool:
    """Per-layer graphs need a rule whose layer updates use no whole-net forward pass."""
    return type(rule).context is LocalRule.context


def fp32_layer_step(
    net: NetSpec,
    rule: LocalRule,
    opt: OptimConfig,
    i: int,
    params_i: Tensors,
    state_i: Tensors,
    x1: Tensor,
    x2: Tensor,
    step_count: Tensor,
) -> tuple[Tensor, Tensor, Tensors, Tensors, Tensor]:
    """Layer i's part of `edge.step.local_step` (its loop body), with the context of a rule
    that needs none. The per-layer chain test holds it to the whole step."""
    layer = net.layers[i]
    step = step_count + 1
    w, b = layer_params(params_i, i)
    o1, o2 = layer_forward(layer, w, b, x1), layer_forward(layer, w, b, x2)
    grads, loss = rule.layer_grads(i, layer, o1, o2, params_i, None)
    new_params, new_state = dict(params_i), dict(state_i)
    for name, g in grads.items():
        if name not in params_i:
            raise EdgeError(f"rule {rule.name!r} updates {name} from layer {i}: not layer-local")
        new_params[name], upd = opt.update(name, params_i[name], g, state_i, step)
        new_state.update(upd)
    return o1.y, o2.y, new_params, new_state, loss


_LAYER_KEY = re.compile(r"^[A-Za-z_]+\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Which layer a parameter belongs to: `enc.3.w` and `rule.3.B` -> 3; `head.w` -> None."""
    m = _LAYER_KEY.match(name)
    return int(m.group(1)) if m else None


def state_layer_of(name: str) -> int | None:
    """Optimizer state `m.enc.3.w` -> 3; the step counter -> None."""
    return layer_of(name.split(".", 1)[1]) if "." in name else None
