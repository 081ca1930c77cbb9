"""LeakyReLU, the primitive added in one file (edge/layers/leaky.py): its adjoint, its integer
form against the NumPy reference, and everything that reads the registry (specs, torch)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edge import rules
from edge.errors import EdgeError
from edge.layers import EAGER, PRIMITIVES, TRACED, Conv, MaxPool, from_dict
from edge.layers.base import QT
from edge.layers.leaky import LeakyReLU
from edge.nets import encode, from_torch
from edge.nets.block import Block
from edge.nets.spec import NetSpec
from quant import reference as ref
from quant.calibrate import make_plan
from quant.integer import integer_step, make_noise, noise_shapes, quantize_input

sys.path.insert(0, str(Path(__file__).parent))
from test_quant_reference import KEY, _both, _check_adjoint, _ints, _q, _same  # noqa: E402


@pytest.mark.parametrize("ex", [EAGER, TRACED], ids=["eager", "traced"])
@pytest.mark.parametrize("slope", [0.1, 0.125])
def test_adjoint_matches_autograd(ex, slope):
    act = LeakyReLU(slope)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    y, _ = act.forward(ex, {}, x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    with torch.no_grad():
        _, gx = act.adjoint(ex, {}, y.detach(), g, True)
    assert torch.allclose(gx, x.grad) and bool((x.grad != g).any())


@pytest.mark.parametrize("shift", [-3, 0, 4])
def test_integer_form_is_bit_exact_with_the_reference(shift):
    act = LeakyReLU(0.25)
    rng = np.random.default_rng(shift + 10)
    x = QT(_ints(rng, (2, 3, 5, 5), -(2**20), 2**20, torch.int32), 10)
    ex, env = _both(act, {KEY: 10 - shift})
    y, saved = act.int_forward(ex, KEY, {}, x)
    ry, rsaved = ref.forward(act, env, KEY, {}, _q(x))
    _same(y, ry)
    g = QT(_ints(rng, (2, 3, 5, 5), -127, 127, torch.int32), 3, 0.5)
    _check_adjoint(act, ex, env, {}, {}, saved, rsaved, g, True)


def test_registry_specs_and_torch_read_it():
    assert PRIMITIVES["leakyrelu"] is LeakyReLU
    assert from_dict({"op": "leakyrelu", "slope": 0.25}) == LeakyReLU(0.25)
    with pytest.raises(EdgeError, match=r"slope must be in \(0, 1\)"):
        from_dict({"op": "leakyrelu", "slope": 1.5})
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.MaxPool2d(2)).eval()
    net, params = from_torch(m, (1, 8, 8))
    assert net.blocks[0].body[1] == LeakyReLU(0.2)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(encode(net, params, x)[-1], m(x), atol=1e-6)
    with pytest.raises(EdgeError, match="no integer form"):
        _ = LeakyReLU(0.2).shift


def test_a_net_with_it_trains_in_integer_mode_like_the_reference():
    net = NetSpec("leaky", (1, 8, 8), (
        Block((Conv(1, 4, 3, 1, 1), LeakyReLU(0.125), MaxPool(2))),
        Block((Conv(4, 6, 3, 1, 1), LeakyReLU(0.5))),
    ))
    rule = rules.get("clapp++")
    gen = torch.Generator().manual_seed(0)
    params = net.init_params(gen)
    params.update(rule.init(net, gen))
    views = [(torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen))]
    plan, stores = make_plan(net, rule, params, views, "int8-w16", 1e-3)
    form = rule.integer_form(net)
    noise = make_noise(noise_shapes(net, form, plan, stores), gen)
    q1, q2 = (quantize_input(v, plan.f_in) for v in views[0])
    new, _ = integer_step(net, form, plan, stores, q1, q2, noise)
    want, _ = ref.reference_step(net, rule, plan, {k: v.numpy() for k, v in stores.items()},
                                 q1.numpy(), q2.numpy(), {k: v.numpy() for k, v in noise.items()})
    for k in new:
        np.testing.assert_array_equal(new[k].numpy(), want[k], err_msg=k)
    assert any(not torch.equal(new[k], stores[k]) for k in stores)
