"""Every local rule's closed-form update against autograd of its own layer loss.

For each layer of small linear and conv nets (max-pool on and off), the layer input is what the
layer-by-layer step would hand it (detached), the context is what the step would pass; then
autograd of `layer_loss` with respect to the layer's weights and the rule's own parameters must
match `layer_grads` to a relative error of 1e-4, and be non-zero so the check can fail.
"""

from __future__ import annotations

import pytest
import torch

from edge import rules
from edge.nets import LayerSpec, NetSpec, init_params, layer_forward, layer_params

LOCAL = ["clapp", "clapp++", "clapp++dfb", "clapp++both", "ff"]
NETS = {
    "conv-pool": NetSpec(
        "t", (2, 8, 8), (LayerSpec("conv", 2, 4, pool=True), LayerSpec("conv", 4, 6, pool=True))
    ),
    "conv": NetSpec("t", (2, 6, 6), (LayerSpec("conv", 2, 4), LayerSpec("conv", 4, 5))),
    "conv-linear": NetSpec(
        "t", (2, 8, 8), (LayerSpec("conv", 2, 3, pool=True), LayerSpec("linear", 48, 10))
    ),
    "linear": NetSpec(
        "t", (1, 4, 4), (LayerSpec("linear", 16, 12), LayerSpec("linear", 12, 9))
    ),
}


def setup(name: str, net: NetSpec, seed: int = 0, **hp):
    rule = rules.get(name, **hp)
    rule.check(net)
    gen = torch.Generator().manual_seed(seed)
    params = init_params(net, gen)
    params.update(rule.init(net, gen))
    params = {k: v.double() for k, v in params.items()}
    x1 = torch.randn(12, *net.in_shape, generator=gen, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(x1.shape, generator=gen, dtype=torch.float64)
    return rule, params, x1, x2


def walk(net: NetSpec, rule, params, x1, x2):
    """Yield (i, layer, x1, x2, ctx) as the layer-by-layer step hands them to layer i."""
    ctx = rule.context(net, params, x1, x2)
    for i, layer in enumerate(net.layers):
        yield i, layer, x1, x2, ctx
        w, b = layer_params(params, i)
        x1 = rule.next_input(i, layer_forward(layer, w, b, x1).y)
        x2 = rule.next_input(i, layer_forward(layer, w, b, x2).y)
        ctx = rule.next_context(i, params, ctx)


def check_layer(rule, i, layer, x1, x2, ctx, params) -> int:
    """Compare closed form and autograd for layer i; return the number of non-zero gradients."""
    w, b = layer_params(params, i)
    grads, loss = rule.layer_grads(
        i, layer, layer_forward(layer, w, b, x1), layer_forward(layer, w, b, x2), params, ctx
    )
    mine = [k for k in params if k.startswith((f"enc.{i}.", f"rule.{i}."))]
    assert sorted(grads) == sorted(mine)
    leaves = {k: params[k].clone().requires_grad_(True) for k in mine}
    p = {**params, **leaves}
    w, b = layer_params(p, i)
    y1 = layer_forward(layer, w, b, x1.detach()).y
    y2 = layer_forward(layer, w, b, x2.detach()).y
    ref_loss = rule.layer_loss(i, y1, y2, p, ctx)
    ref = torch.autograd.grad(ref_loss, list(leaves.values()))
    assert float(loss) == pytest.approx(float(ref_loss.detach()), rel=1e-9)
    nonzero = 0
    for k, g_ref in zip(leaves, ref, strict=True):
        err = float((grads[k] - g_ref).norm() / g_ref.norm().clamp_min(1e-30))
        assert err < 1e-4, f"layer {i} {k}: relative error {err:.2e}"
        nonzero += int(g_ref.norm() > 1e-8)
    return nonzero


@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("name", LOCAL)
def test_closed_form_matches_autograd(name: str, net_name: str) -> None:
    net = NETS[net_name]
    rule, params, x1, x2 = setup(name, net)
    for i, layer, a1, a2, ctx in walk(net, rule, params, x1, x2):
        nonzero = check_layer(rule, i, layer, a1, a2, ctx, params)
        assert nonzero >= 2, f"layer {i}: gradients vanish, the check could not fail"


@pytest.mark.parametrize("net_name", list(NETS))
def test_ff_threshold_loss_matches_autograd(net_name: str) -> None:
    """Hinton's thresholded loss, the non-default ff objective, is exact too."""
    net = NETS[net_name]
    rule, params, x1, x2 = setup("ff", net, loss="threshold", threshold=1.5)
    for i, layer, a1, a2, ctx in walk(net, rule, params, x1, x2):
        assert check_layer(rule, i, layer, a1, a2, ctx, params) >= 2


@pytest.mark.parametrize("predictor", ["full", "lowrank"])
@pytest.mark.parametrize("name", ["clapp++dfb", "clapp++both"])
def test_feedback_predictors_full_and_low_rank(name: str, predictor: str) -> None:
    net = NETS["conv-pool"]
    rule, params, x1, x2 = setup(name, net, predictor=predictor, rank=3, pool=1)
    keys = {k.split(".", 2)[2] for k in params if k.startswith("rule.")}
    want = {"fb.B"} if predictor == "full" else {"fb.U", "fb.V"}
    if name == "clapp++both":
        want |= {"B"} if predictor == "full" else {"U", "V"}
    assert keys == want
    for i, layer, a1, a2, ctx in walk(net, rule, params, x1, x2):
        assert check_layer(rule, i, layer, a1, a2, ctx, params) >= 3


def test_a_wrong_closed_form_is_caught() -> None:
    """The harness fails on a rule whose update is off by a little."""
    net = NETS["conv-pool"]
    rule, params, x1, x2 = setup("clapp", net)
    orig = rule.layer_grads

    def off(*args):
        grads, loss = orig(*args)
        return {k: g * 1.001 for k, g in grads.items()}, loss

    rule.layer_grads = off
    i, layer, a1, a2, ctx = next(walk(net, rule, params, x1, x2))
    with pytest.raises(AssertionError, match="relative error"):
        check_layer(rule, i, layer, a1, a2, ctx, params)
