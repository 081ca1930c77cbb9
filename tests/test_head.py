"""The on-device head: class sums and counts learned in the step, in float, integer and the
exported graphs alike."""

from __future__ import annotations

import torch

from edge import rules
from edge.head import PrototypeHead
from edge.layers import EAGER
from edge.nets import preset
from edge.optim import OptimConfig
from edge.step import init_state, train_step
from export.runner import OnnxStepper
from export.step import fp32_program, integer_program
from quant.calibrate import make_plan
from quant.integer import integer_step_state, make_noise, noise_shapes, quantize_input


def test_sums_counts_and_nearest_mean():
    head = PrototypeHead(3, (4,))
    state = head.init_state()
    y = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [3.0, 0, 0, 0], [9.0, 9, 9, 9]])
    y = torch.cat((y, y))  # both views stacked: only view 1 (the first rows) is read
    labels = torch.tensor([0, 1, 0, -1])
    new = head.update(EAGER, y, labels, state)
    assert new["head.count"].tolist() == [2.0, 1.0, 0.0]
    assert new["head.sum"][0].tolist() == [4.0, 0, 0, 0] and not new["head.sum"][2].any()
    again = head.update(EAGER, y, torch.tensor([-1, 1, -1, -1]), new)
    assert again["head.count"].tolist() == [2.0, 1.0 * (1 - 2**-3) + 1, 0.0]  # only class 1
    assert again["head.sum"][1].tolist() == [0, 2.0 * (1 - 2**-3) + 2.0, 0, 0]  # decays
    pred = head.predict(new, torch.tensor([[2.0, 0, 0, 0], [0, 1.5, 0, 0], [0, 0.5, 9.0, 0]]))
    assert pred.tolist() == [0, 1, 1]  # class 2 was never seen: it never wins


def _setup(batch=4):
    net = preset("digits", (1, 8, 8), 0.25)
    rule = rules.get("clapp++")
    gen = torch.Generator().manual_seed(0)
    params = net.init_params(gen)
    rule.check(net)
    params.update(rule.init(net, gen))
    head = PrototypeHead(10, net.shapes()[-1])
    x1 = torch.randn(batch, 1, 8, 8, generator=gen)
    x2 = x1 + 0.2 * torch.randn(x1.shape, generator=gen)
    labels = torch.tensor([3, -1, 7, 3])[:batch]
    return net, rule, params, head, x1, x2, labels


def test_the_step_trains_the_head_and_the_graph_does_the_same():
    net, rule, params, head, x1, x2, labels = _setup()
    opt = OptimConfig("sgd", lr=1e-3)
    state = {**init_state(net, rule, opt, params), **head.init_state()}
    _, s_t, _ = train_step(net, rule, opt, params, state, x1, x2, head=head, labels=labels)
    assert s_t["head.count"].tolist() == [0, 0, 0, 2, 0, 0, 0, 1, 0, 0]
    for per_layer in (False, True):
        stepper = OnnxStepper(net, rule, opt, program=fp32_program(net, rule, opt, head),
                              per_layer=per_layer)
        _, s_o, _ = stepper(params, state, x1, x2, labels=labels)
        assert torch.equal(s_o["head.count"], s_t["head.count"])
        assert torch.allclose(s_o["head.sum"], s_t["head.sum"], rtol=1e-5, atol=1e-6)


def test_integer_head_is_exact_in_the_exported_graph():
    net, rule, params, head, x1, x2, labels = _setup()
    plan, stores = make_plan(net, rule, params, [(x1, x2)], "int8-w16", 1e-3)
    form = rule.integer_form(net)
    state = {"step": torch.zeros((), dtype=torch.int64), **head.init_state(integer=True)}
    noise = make_noise(noise_shapes(net, form, plan, stores), torch.Generator().manual_seed(1))
    q1, q2 = quantize_input(x1, plan.f_in), quantize_input(x2, plan.f_in)
    _, s_t, _ = integer_step_state(net, form, plan, stores, state, q1, q2, noise, head=head,
                                   labels=labels)
    assert s_t["head.sum"].dtype == torch.int32 and int(s_t["head.sum"].abs().sum()) > 0
    stepper = OnnxStepper(net, rule, None, program=integer_program(net, rule, plan, stores, head))
    _, s_o, _ = stepper(stores, state, q1, q2, noise=noise, labels=labels)
    assert torch.equal(s_o["head.sum"], s_t["head.sum"])
    assert torch.equal(s_o["head.count"], s_t["head.count"])
