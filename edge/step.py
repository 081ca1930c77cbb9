"""One training step as a pure function: (params, state, views) -> (params', state', metrics).

For a local rule the step is a loop over layers. Layer l runs its forward pass for both
views, the rule returns closed-form gradients of layer l's own loss, the optimizer applies
them, and only the layer's output (the next layer's input) survives the iteration: the
working set of one layer is all a step ever holds, whatever the depth.

No autograd, no module state, no branching on tensor values: the same function runs in the
torch loop and is what the ONNX exporter traces.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edge.baselines.step import bp_step
from edge.nets import NetSpec, layer_forward, layer_params
from edge.optim import OptimConfig
from edge.rules.base import LocalRule

Metrics = dict[str, Tensor]


def local_step(
    net: NetSpec,
    rule: LocalRule,
    opt: OptimConfig,
    params: dict[str, Tensor],
    state: dict[str, Tensor],
    x1: Tensor,
    x2: Tensor,
    donate: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Metrics]:
    """`donate=True` hands `params` and `state` over: they are updated in place entry by
    entry, so each layer's old tensors die as soon as its new ones exist (as on a device
    that writes updates over the old weights); the caller must not reuse them."""
    step = state["step"] + 1
    new_params, new_state = (params, state) if donate else (dict(params), dict(state))
    ctx = rule.context(net, params, x1, x2)
    losses = []
    for i, layer in enumerate(net.layers):
        w, b = layer_params(params, i)
        o1, o2 = layer_forward(layer, w, b, x1), layer_forward(layer, w, b, x2)
        grads, loss = rule.layer_grads(i, layer, o1, o2, params, ctx)
        for name, g in grads.items():
            new_params[name], upd = opt.update(name, params[name], g, state, step)
            new_state.update(upd)
        losses.append(loss)
        x1, x2 = rule.next_input(i, o1.y), rule.next_input(i, o2.y)
        ctx = rule.next_context(i, params, ctx)  # reads layer i+1's weights: not yet updated
        del o1, o2, grads  # this layer's working set dies here
    new_state["step"] = step
    layer_loss = torch.stack(losses)
    return new_params, new_state, {"loss": layer_loss.sum(), "layer_loss": layer_loss}


def train_step(
    net: NetSpec,
    rule,
    opt: OptimConfig,
    params: dict[str, Tensor],
    state: dict[str, Tensor],
    x1: Tensor,
    x2: Tensor,
    donate: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Metrics]:
    """The step of any rule: closed-form layer-local for local rules, autograd for baselines."""
    if rule.is_local:
        return local_step(net, rule, opt, params, state, x1, x2, donate)
    return bp_step(net, rule, opt, params, state, x1, x2)
