"""Network specs and the closed-form layer backward against autograd."""

import pytest
import torch

from edge.errors import EdgeError
from edge.nets import (
    LayerSpec,
    NetSpec,
    init_params,
    layer_backward,
    layer_forward,
    mlp,
    preset,
    vgg,
)


def test_vgg6_matches_the_paper():
    net = preset("vgg6", (3, 32, 32))
    assert [s.out_features for s in net.layers] == [128, 256, 256, 512, 1024, 1024]
    assert [s.pool for s in net.layers] == [False, True, False, True, True, True]
    assert net.shapes()[-1] == (1024, 2, 2)
    small = preset("vgg6", (3, 32, 32), width=0.125)
    assert [s.out_features for s in small.layers] == [16, 32, 32, 64, 128, 128]


@pytest.mark.parametrize(
    "name,shape", [("digits", (1, 8, 8)), ("mnist", (1, 28, 28)), ("mlp", (1, 8, 8))]
)
def test_presets_build_and_run(name, shape):
    net = preset(name, shape)
    params = init_params(net, torch.Generator().manual_seed(0))
    x = torch.randn(2, *shape)
    for i, (layer, out_shape) in enumerate(zip(net.layers, net.shapes(), strict=True)):
        x = layer_forward(layer, params[f"enc.{i}.w"], params[f"enc.{i}.b"], x).y
        assert tuple(x.shape[1:]) == out_shape


def test_spec_round_trip():
    net = vgg([4, 8], [2], (3, 8, 8))
    assert NetSpec.from_dict(net.to_dict()) == net


@pytest.mark.parametrize(
    "bad",
    [
        lambda: LayerSpec("attention", 1, 2),
        lambda: LayerSpec("conv", 0, 2),
        lambda: LayerSpec("linear", 3, 2, pool=True),
        lambda: vgg([4, 4, 4, 4], [1, 2, 3, 4], (1, 8, 8)),  # pools 8 -> 4 -> 2 -> 1 -> ?
        lambda: NetSpec("x", (1, 8, 8), (LayerSpec("conv", 2, 4),)),
        lambda: preset("resnet", (3, 32, 32)),
        lambda: preset("vgg6", (3, 32, 32), width=0),
    ],
)
def test_bad_specs_are_refused(bad):
    with pytest.raises(EdgeError):
        bad()


@pytest.mark.parametrize(
    "layer,shape",
    [
        (LayerSpec("conv", 3, 5, pool=False), (4, 3, 6, 6)),
        (LayerSpec("conv", 3, 5, pool=True), (4, 3, 6, 6)),
        (LayerSpec("conv", 2, 3, pool=True), (3, 2, 7, 7)),  # odd size: the pool drops a row
        (LayerSpec("linear", 12, 7), (4, 12)),
    ],
)
def test_layer_backward_equals_autograd(layer, shape):
    g = torch.Generator().manual_seed(1)
    net_w = (layer.out_features, layer.in_features) + ((3, 3) if layer.kind == "conv" else ())
    w = torch.randn(net_w, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(layer.out_features, generator=g, dtype=torch.float64).requires_grad_(True)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    out = layer_forward(layer, w, b, x)
    gy = torch.randn(out.y.shape, generator=g, dtype=torch.float64)
    ref_w, ref_b = torch.autograd.grad((out.y * gy).sum(), [w, b])
    gw, gb = layer_backward(layer, layer_forward(layer, w.detach(), b.detach(), x), gy)
    assert ref_w.abs().sum() > 0
    torch.testing.assert_close(gw, ref_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb, ref_b, rtol=1e-10, atol=1e-12)


def test_mlp_flattens_conv_input():
    net = mlp([16], (2, 4, 4))
    assert net.layers[0].in_features == 32


@pytest.mark.parametrize("hw", [(7, 7), (7, 6), (5, 9), (8, 8)])
def test_pooled_backward_odd_maps_and_ties_equal_autograd(hw):
    """The eager pooled update never builds the full-resolution error (window offsets, stride-2
    correlations): exact against autograd on odd maps (floor-mode pooling drops a row or a
    column) and with tied maxima, where torch routes the gradient to the first maximum."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(hw[0] * 10 + hw[1])
    layer = LayerSpec("conv", 3, 5, pool=True)
    x = torch.randn(4, 3, *hw, generator=gen)
    x[:2] = 0.25  # constant images: every window of their maps is a tie
    w = torch.randn(5, 3, 3, 3, generator=gen).requires_grad_()
    b = torch.randn(5, generator=gen).abs().requires_grad_()
    y = F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2)
    gy = torch.randn(y.shape, generator=gen)
    (y * gy).sum().backward()
    out = layer_forward(layer, w.detach(), b.detach(), x)
    assert out.pool_idx is None and out.pool_off.dtype == torch.uint8  # 1 byte per unit
    gw, gb = layer_backward(layer, out, gy)
    torch.testing.assert_close(out.y, y.detach())
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, b.grad, rtol=1e-5, atol=1e-5)
