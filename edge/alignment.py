"""Gradient alignment: how close is a rule's update to the global backprop-SSL gradient?

Per block l, the cosine similarity between
  - the rule's update of the block's encoder weights (every `enc.{l}.*.w`, as one vector):
    for a local rule its closed-form gradient, from `edge.step.local_step` itself with an
    optimizer that records the gradients and applies nothing; for a global rule its autograd
    gradient;
  - the autograd gradient of a reference global loss on the same batch with respect to the
    same weights: `bp-infonce` by default, its projection head taken from `params` when they
    hold one (`head.*`), else drawn from `torch.Generator().manual_seed(seed)`, so the value
    is deterministic.
1 means the local rule moves the weights exactly as backprop would, 0 orthogonally. A zero
gradient on either side (e.g. every hinge inactive) gives 0. The paper's claim under test:
rules whose updates align better with BP-SSL learn better representations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from edge.baselines.bp_infonce import BPInfoNCE
from edge.nets import NetSpec
from edge.step import local_step


def _weights(net: NetSpec, params: dict[str, Tensor]) -> list[list[str]]:
    """The encoder weight names of every block."""
    return [[k for k in params if k.startswith(f"enc.{i}.") and k.endswith(".w")]
            for i in range(len(net.blocks))]


class _Record:
    """An optimizer that keeps the gradients it is handed and changes nothing."""

    def __init__(self):
        self.grads: dict[str, Tensor] = {}

    def update(self, name, p, g, state, step, noise=None):
        self.grads[name] = g
        return p, {}


def rule_update(
    net: NetSpec, rule, params: dict[str, Tensor], x1: Tensor, x2: Tensor
) -> dict[str, Tensor]:
    """Encoder weight name -> the gradient a training step of `rule` would hand the
    optimizer."""
    if not rule.is_local:
        return backprop_grads(net, rule, params, x1, x2)
    rec = _Record()
    local_step(net, rule, rec, params, {"step": torch.zeros(())}, x1, x2)
    return {k: rec.grads[k] for block in _weights(net, params) for k in block}


def backprop_grads(
    net: NetSpec, rule, params: dict[str, Tensor], x1: Tensor, x2: Tensor
) -> dict[str, Tensor]:
    """Encoder weight name -> autograd gradient of a global rule's `loss`."""
    keys = [k for block in _weights(net, params) for k in block]
    leaves = {k: v.detach().requires_grad_(k in keys) for k, v in params.items()}
    with torch.enable_grad():
        grads = torch.autograd.grad(rule.loss(net, leaves, x1, x2), [leaves[k] for k in keys])
    return dict(zip(keys, grads, strict=True))


def cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    if float(a.norm()) == 0.0 or float(b.norm()) == 0.0:
        return 0.0
    return max(-1.0, min(1.0, float(F.cosine_similarity(a, b, dim=0))))


def alignment(
    net: NetSpec,
    rule,
    params: dict[str, Tensor],
    x1: Tensor,
    x2: Tensor,
    reference=None,
    seed: int = 0,
) -> list[float]:
    """Per block, cos(rule's update of its encoder weights, the reference global gradient)."""
    reference = reference if reference is not None else BPInfoNCE()
    reference.check(net)
    ref_params = {**reference.init(net, torch.Generator().manual_seed(seed)), **params}
    bp = backprop_grads(net, reference, ref_params, x1, x2)
    upd = rule_update(net, rule, params, x1, x2)
    return [cosine(torch.cat([upd[k].flatten() for k in ks]),
                   torch.cat([bp[k].flatten() for k in ks])) for ks in _weights(net, params)]
