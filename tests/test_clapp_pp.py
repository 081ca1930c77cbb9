"""CLAPP++: the closed-form layer update equals autograd of the same per-layer loss."""

import pytest
import torch

from edge.errors import EdgeError
from edge.nets import init_params, layer_forward, mlp, vgg
from edge.rules import get
from edge.rules.base import avg_pool, avg_pool_backward


def _check_layers(net, rule, rtol=1e-4):
    g = torch.Generator().manual_seed(0)
    rule.check(net)
    params = init_params(net, g)
    params.update(rule.init(net, g))
    x1 = torch.randn(6, *net.in_shape, generator=g)
    x2 = torch.randn(6, *net.in_shape, generator=g)
    for i, layer in enumerate(net.layers):
        w, b = params[f"enc.{i}.w"], params[f"enc.{i}.b"]
        o1, o2 = layer_forward(layer, w, b, x1), layer_forward(layer, w, b, x2)
        grads, loss = rule.layer_grads(i, layer, o1, o2, params, None)
        leaves = {k: params[k].clone().requires_grad_(True) for k in grads}
        p = {**params, **leaves}
        # the layer input is detached: nothing reaches earlier layers
        y1 = layer_forward(layer, p[f"enc.{i}.w"], p[f"enc.{i}.b"], x1.detach()).y
        y2 = layer_forward(layer, p[f"enc.{i}.w"], p[f"enc.{i}.b"], x2.detach()).y
        ref_loss = rule.layer_loss(i, y1, y2, p, None)
        ref = torch.autograd.grad(ref_loss, list(leaves.values()))
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
        for name, r in zip(leaves, ref, strict=True):
            assert r.abs().sum() > 0, f"layer {i} {name}: zero reference gradient"
            err = (grads[name] - r).norm() / r.norm()
            assert err < rtol, f"layer {i} {name}: relative error {err:.2e}"
        x1, x2 = o1.y, o2.y


@pytest.mark.parametrize("predictor", ["full", "lowrank"])
@pytest.mark.parametrize("pool", [None, 1])
def test_conv_net_with_and_without_pooling(predictor, pool):
    net = vgg([4, 6, 8], [2, 3], (3, 8, 8))  # max-pool on layers 2 and 3, not 1
    _check_layers(net, get("clapp++", predictor=predictor, rank=5, pool=pool))


def test_conv_with_spatial_pooling_kernel_per_layer():
    net = vgg([4, 6], [], (2, 8, 8))
    _check_layers(net, get("clapp++", predictor="full", pool=[4, 2]))


def test_linear_layers():
    _check_layers(mlp([10, 7], (1, 4, 4)), get("clapp++", predictor="full"))
    _check_layers(mlp([10, 7], (1, 4, 4)), get("clapp++", predictor="lowrank", rank=3))


def test_avg_pool_backward_is_the_adjoint():
    g = torch.Generator().manual_seed(3)
    y = torch.randn(2, 3, 7, 7, generator=g, requires_grad=True)
    gp = torch.randn(2, 3 * 3 * 3, generator=g)
    (ref,) = torch.autograd.grad((avg_pool(y, 2) * gp).sum(), y)
    torch.testing.assert_close(avg_pool_backward(gp, y.shape, 2), ref)


def test_auto_predictor_is_compact_for_large_layers():
    gen = torch.Generator().manual_seed(0)
    small = vgg([8], [], (3, 4, 4))  # pooled to 2x2: D = 32, full B (1k) < rank 64 (4k)
    assert set(get("clapp++", rank=64).init(small, gen)) == {"rule.0.B"}
    big = vgg([256], [], (3, 16, 16))  # pool 2: D = 256*8*8 = 16384, full B would be 268M
    assert set(get("clapp++", rank=64, pool=2).init(big, gen)) == {"rule.0.U", "rule.0.V"}


@pytest.mark.parametrize("kw", [{"pool": 9}, {"pool": 0}, {"predictor": "dense"}, {"rank": 0}])
def test_bad_hyperparameters(kw):
    net = vgg([4], [], (1, 8, 8))
    with pytest.raises(EdgeError):
        get("clapp++", **kw).check(net)
