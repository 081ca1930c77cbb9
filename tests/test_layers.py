"""Every primitive's closed-form adjoint against autograd, eager and traced kernels alike,
and the registry that specs load from."""

from __future__ import annotations

import pytest
import torch

from edge.errors import EdgeError
from edge.layers import (
    EAGER,
    PRIMITIVES,
    TRACED,
    AvgPool,
    BatchNorm,
    Conv,
    Flatten,
    GlobalAvgPool,
    Identity,
    Linear,
    MaxPool,
    ReLU,
    ReLU6,
    from_dict,
)
from edge.layers.leaky import LeakyReLU

CASES = [
    (Conv(4, 6, 3, 1, 1), (4, 7, 7)),
    (Conv(4, 8, 3, 2, 1, groups=2), (4, 9, 9)),
    (Conv(4, 4, 3, 2, 1, groups=4), (4, 8, 8)),  # depthwise, stride 2
    (Conv(4, 8, 3, 1, 1, groups=4), (4, 6, 6)),  # depthwise with a channel multiplier
    (Conv(4, 6, (10, 4), 2, (5, 1)), (4, 49, 10)),  # DS-CNN's first layer
    (Conv(4, 6, 1), (4, 5, 5)),  # pointwise
    (Conv(3, 5, 5, 3, 2), (3, 11, 13)),
    (Linear(5, 3), (5,)),
    (ReLU(), (4, 5, 5)),
    (ReLU6(), (4, 5, 5)),
    (Identity(), (4, 5, 5)),
    (LeakyReLU(0.1), (4, 5, 5)),
    (MaxPool(2), (3, 6, 6)),
    (MaxPool(2), (3, 7, 7)),  # odd: the last row and column are outside every window
    (MaxPool(3, 2, 1), (3, 7, 7)),  # overlapping, padded
    (MaxPool((2, 3), (1, 2)), (2, 5, 7)),
    (AvgPool(2), (3, 7, 7)),
    (AvgPool(3, 2, 1), (3, 8, 8)),
    (AvgPool((2, 1)), (3, 6, 5)),
    (GlobalAvgPool(), (3, 5, 4)),
    (Flatten(), (3, 5, 4)),
    (BatchNorm(3), (3, 5, 4)),
]


def _ids(case):
    return case[0].describe()


@pytest.mark.parametrize("ex", [EAGER, TRACED], ids=["eager", "traced"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_adjoint_matches_autograd(case, ex) -> None:
    prim, shape = case
    g = torch.Generator().manual_seed(1)
    p = {k: v.double() for k, v in prim.init(g).items()}
    if isinstance(prim, BatchNorm):  # statistics that are not the identity
        p = {"gamma": torch.rand(3, dtype=torch.float64) + 0.5, "beta": torch.randn(3).double(),
             "mean": torch.randn(3).double(), "var": torch.rand(3).double() + 0.5}
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    x = (torch.randn(3, *shape, generator=g, dtype=torch.float64) * 4).requires_grad_()
    y, _ = prim.forward(ex, leaves, x)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (y * gy).sum().backward()
    with torch.no_grad():
        y2, saved = prim.forward(ex, p, x.detach())
        grads, gx = prim.adjoint(ex, p, saved, gy, True)
    assert torch.equal(y2, y.detach())
    assert set(grads) == set(prim.trainable)
    for k in prim.trainable:
        assert torch.allclose(grads[k], leaves[k].grad, rtol=1e-10, atol=1e-10), k
    assert torch.allclose(gx, x.grad, rtol=1e-10, atol=1e-10)
    assert float(x.grad.abs().sum()) > 0  # the check could fail


def test_max_pool_ties_go_to_the_first_maximum() -> None:
    x = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    for ex in (EAGER, TRACED):
        y, saved = MaxPool(2).forward(ex, {}, x)
        _, gx = MaxPool(2).adjoint(ex, {}, saved, torch.ones_like(y), True)
        assert gx.tolist() == [[[[1.0, 0.0], [0.0, 0.0]]]]


def test_relu6_derivative_is_zero_where_it_clips() -> None:
    y = ReLU6().apply(torch.tensor([-1.0, 0.5, 6.0, 9.0]))
    assert ReLU6().derivative(y).tolist() == [False, True, False, False]


def test_every_op_is_registered_and_round_trips() -> None:
    assert {"conv", "linear", "relu", "relu6", "identity", "maxpool", "avgpool", "gap", "bn",
            "flatten"} <= set(PRIMITIVES)
    for prim, _ in CASES:
        assert from_dict(prim.to_dict()) == prim


@pytest.mark.parametrize("d,needle", [
    ({"op": "conv2d"}, "unknown op 'conv2d'; valid:"),
    ({"op": "conv", "cin": 1, "cout": 2, "kernal": 3}, "unknown field 'kernal'; valid: cin,"),
    ({"op": "conv", "cin": 1}, "missing field 'cout'"),
    ({"op": "conv", "cin": 1, "cout": 2, "k": 2.5}, "field 'k' must be an integer"),
    ({"op": "conv", "cin": 4, "cout": 6, "groups": 4}, "groups=4 must divide"),
    ({"op": "maxpool", "k": 2, "padding": 2}, "at most half the kernel"),
    ({"cout": 3}, "needs an 'op' field"),
])
def test_bad_layer_specs_are_one_line_errors(d, needle) -> None:
    with pytest.raises(EdgeError) as e:
        from_dict(d, "net.toml, block 0, layers 1")
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("net.toml, block 0, layers 1")


def test_shapes_and_multiply_adds() -> None:
    conv = Conv(3, 16, 3, 2, 1)
    assert conv.out_shape((3, 32, 32)) == (16, 16, 16)
    assert conv.macs((3, 32, 32)) == 16 * 16 * 16 * 27
    dw = Conv(16, 16, 3, 1, 1, groups=16)
    assert dw.macs((16, 8, 8)) == 16 * 8 * 8 * 9
    with pytest.raises(EdgeError, match="does not fit"):
        MaxPool(5).out_shape((3, 4, 4))
    with pytest.raises(EdgeError, match="add a flatten"):
        Linear(48, 3).out_shape((3, 4, 4))


def test_conv_adjoint_of_an_expanded_gradient() -> None:
    """A global pool's adjoint hands on a stride-0 expanded gradient; aten's bias gradient
    of such a tensor is wrong unless it is made contiguous first."""
    conv = Conv(3, 4, 3, 1, 1)
    p = {k: v.double() for k, v in conv.init(torch.Generator().manual_seed(0)).items()}
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    g = torch.randn(2, 4, 1, 1, dtype=torch.float64).expand(2, 4, 5, 5)
    for ex in (EAGER, TRACED):
        grads, _ = conv.adjoint(ex, p, x, g, False)
        assert torch.allclose(grads["b"], g.sum((0, 2, 3)), rtol=1e-12)
