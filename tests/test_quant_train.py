"""The API the training loop wires in: init, step, checkpoint round trip, probe features."""

import pytest
import torch

from edge import checkpoint
from edge.errors import EdgeError
from edge.nets import init_params, vgg
from edge.optim import OptimConfig
from edge.rules import get
from quant.train import (
    dequantized_params,
    describe_plan,
    init_quant,
    latent_params,
    quant_encode,
    quant_meta,
    quant_step,
    restore_quant,
    state_tensors,
)

NET = vgg([4, 6], [1, 2], (1, 8, 8))
N = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    yield
    torch.set_num_threads(n)


def _start(rule_name="clapp++", quant="int8-w16", mode="integer", **hp):
    rule = get(rule_name, **hp)
    rule.check(NET)
    g = torch.Generator().manual_seed(0)
    params = init_params(NET, g)
    params.update(rule.init(NET, g))
    calib = [tuple(torch.randn(N, 1, 8, 8, generator=g) for _ in range(2)) for _ in range(2)]
    opt = OptimConfig("adamw", lr=1e-3)
    return rule, init_quant(NET, rule, params, calib, quant, mode, opt), opt


def _batches(k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(N, 1, 8, 8, generator=g) for _ in range(2)) for _ in range(k)]


def test_integer_mode_checkpoint_round_trip_resumes_bit_exactly(tmp_path):
    rule, qs, _ = _start()
    assert {v.dtype for k, v in qs.params.items() if k.endswith(".w")} == {torch.int16}
    assert all(qs.params[k].dtype == torch.int32 for k in qs.params if k.endswith(".b"))
    batches, gen = _batches(4), torch.Generator().manual_seed(7)
    for x1, x2 in batches[:2]:
        qs, m = quant_step(NET, rule, qs, x1, x2, gen)
        assert torch.isfinite(m["loss"]) and m["layer_loss"].shape == (2,)
    path = tmp_path / checkpoint.FILENAME
    checkpoint.save(path, qs.params, state_tensors(qs), {"quant": quant_meta(qs)})
    params, state, meta = checkpoint.load(path)
    resumed = restore_quant(params, state, meta["quant"])
    assert checkpoint.weights_digest(resumed.params) == checkpoint.weights_digest(qs.params)
    assert int(state["exp.in"]) == qs.plan.f_in and f"exp.{0}.y" in state
    gen_a, gen_b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for x1, x2 in batches[2:]:
        qs, _ = quant_step(NET, rule, qs, x1, x2, gen_a)
        resumed, _ = quant_step(NET, rule, resumed, x1, x2, gen_b)
    assert all(torch.equal(qs.params[k], resumed.params[k]) for k in qs.params)
    assert int(resumed.state["step"]) == 4


def test_tampered_checkpoint_exponent_is_an_error():
    _, qs, _ = _start()
    state = state_tensors(qs)
    state["exp.enc.0.w"] = state["exp.enc.0.w"] + 1
    with pytest.raises(EdgeError, match="exponent of enc.0.w"):
        restore_quant(qs.params, state, quant_meta(qs))


@pytest.mark.parametrize("rule_name", ["clapp++", "ff"])
def test_qat_mode_trains_latent_weights_of_any_rule(rule_name):
    rule, qs, opt = _start(rule_name, mode="qat")
    assert all(v.dtype == torch.float32 for v in qs.params.values())
    before = {k: v.clone() for k, v in qs.params.items()}
    for x1, x2 in _batches(2):
        qs, m = quant_step(NET, rule, qs, x1, x2, None, opt)
        assert torch.isfinite(m["loss"])
    assert all(not torch.equal(before[k], qs.params[k]) for k in before if k.endswith(".w"))
    assert latent_params(qs) is qs.params


def test_integer_mode_refuses_rules_without_an_integer_form():
    with pytest.raises(EdgeError, match="no integer form"):
        _start("ff", mode="integer")


def test_bad_choices_are_one_line_errors():
    for quant, mode, why in (("int4", "integer", "--quant"), ("int8", "float", "--mode")):
        with pytest.raises(EdgeError, match=why) as e:
            _start(quant=quant, mode=mode)
        assert "\n" not in str(e.value)
    rule, qs, _ = _start()
    x = torch.randn(N + 1, 1, 8, 8)
    with pytest.raises(EdgeError, match="batches of 4"):
        quant_step(NET, rule, qs, x, x, torch.Generator())


@pytest.mark.parametrize(
    "quant, mode", [("int8", "integer"), ("int8-w16", "integer"), ("int8", "qat")]
)
def test_probe_features_come_from_the_quantized_network(quant, mode):
    _, qs, _ = _start(quant=quant, mode=mode)
    x = torch.randn(3, 1, 8, 8)
    outs = quant_encode(NET, qs, x)
    assert [tuple(o.shape) for o in outs] == [(3, 4, 4, 4), (3, 6, 2, 2)]
    for o, lp in zip(outs, qs.plan.layers, strict=True):
        codes = o * 2.0**lp.f_y
        assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 255
    deq = dequantized_params(qs)
    assert set(deq) == set(qs.plan.params)
    w = deq["enc.0.w"] * 2.0 ** qs.plan.layers[0].f_w
    assert torch.equal(w, w.round()) and w.abs().max() <= 127
    info = describe_plan(qs)
    assert info["mode"] == mode and len(info["layers"]) == 2
    if mode == "integer":
        assert set(info["lr_shifts"]) == set(qs.plan.params)
        latent = latent_params(qs)
        assert (latent["enc.1.w"] - deq["enc.1.w"]).abs().max() <= 2.0 ** -qs.plan.layers[1].f_w
