"""Gradient alignment: how close is a rule's update to the global backprop-SSL gradient?

Per layer l, the cosine similarity between
  - the rule's update of the layer's encoder weights `enc.{l}.w`: for a local rule its
    closed-form gradient, computed layer by layer exactly as `edge.step.local_step` does
    (context, forward, `layer_grads`, `next_input`, `next_context`) but without applying the
    optimizer; for a global rule its autograd gradient;
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
from edge.nets import NetSpec, layer_forward, layer_params


def rule_update(
    net: NetSpec, rule, params: dict[str, Tensor], x1: Tensor, x2: Tensor
) -> dict[str, Tensor]:
    """`enc.{i}.w` -> the gradient a training step of `rule` would hand the optimizer."""
    if not rule.is_local:
        return backprop_grads(net, rule, params, x1, x2)
    ctx = rule.context(net, params, x1, x2)
    out = {}
    for i, layer in enumerate(net.layers):
        w, b = layer_params(params, i)
        o1, o2 = layer_forward(layer, w, b, x1), layer_forward(layer, w, b, x2)
        grads, _ = rule.layer_grads(i, layer, o1, o2, params, ctx)
        out[f"enc.{i}.w"] = grads[f"enc.{i}.w"]
        x1, x2 = rule.next_input(i, o1.y), rule.next_input(i, o2.y)
        ctx = rule.next_context(i, params, ctx)
    return out


def backprop_grads(
    net: NetSpec, rule, params: dict[str, Tensor], x1: Tensor, x2: Tensor
) -> dict[str, Tensor]:
    """`enc.{i}.w` -> autograd gradient of a global rule's `loss`."""
    keys = [f"enc.{i}.w" for i in range(len(net.layers))]
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
    """Per layer, cos(rule's update of enc.{l}.w, reference global gradient of enc.{l}.w)."""
    reference = reference if reference is not None else BPInfoNCE()
    reference.check(net)
    ref_params = {**reference.init(net, torch.Generator().manual_seed(seed)), **params}
    bp = backprop_grads(net, reference, ref_params, x1, x2)
    upd = rule_update(net, rule, params, x1, x2)
    return [cosine(upd[k], bp[k]) for k in bp]
