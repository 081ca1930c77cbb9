"""The training step of a global baseline: autograd through the whole network, then the
same functional optimizer the local rules use."""

from __future__ import annotations

import torch
from torch import Tensor

from edge.nets import NetSpec
from edge.optim import OptimConfig


def bp_step(
    net: NetSpec,
    rule,
    opt: OptimConfig,
    params: dict[str, Tensor],
    state: dict[str, Tensor],
    x1: Tensor,
    x2: Tensor,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    loss = rule.loss(net, leaves, x1, x2)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    step = state["step"] + 1
    new_params, new_state = {}, dict(state)
    update = getattr(opt, "update_eager", opt.update)  # eager: the fused kernel
    with torch.no_grad():
        for (name, p), g in zip(params.items(), grads, strict=True):
            new_params[name], upd = update(name, p, g, state, step)
            new_state.update(upd)
    new_state["step"] = step
    loss = loss.detach()
    return new_params, new_state, {"loss": loss, "layer_loss": loss.reshape(1)}
