"""Runners and steppers: Runner's names, shapes and errors; OnnxStepper over the whole step
and the per-block chain against torch (fp32) and the integer step (bit for bit); the random
bits it draws; make_stepper's switch; the manifest's GraphIO and binding rules."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from net_setup import build, int_state

from edge import rules
from edge.errors import EdgeError
from edge.nets import encode, preset
from edge.optim import OptimConfig
from edge.step import init_state, train_step
from export.inference import encoder_graph
from export.manifest import GraphIO, Manifest, TensorSpec, binding_problem
from export.runner import (
    OPENVINO_EXTRA,
    OnnxStepper,
    Runner,
    apply_bindings,
    draw_noise,
    integer_stepper,
    make_stepper,
)
from export.step import integer_program, step_graph
from quant.calibrate import make_plan
from quant.integer import integer_step, make_noise, noise_shapes, quantize_input, rule_state

BATCH = 4
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


def views(n: int = BATCH, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, 1, 8, 8, generator=gen)
    return x1, x1 + 0.3 * torch.randn(x1.shape, generator=gen)


def rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def encoder():
    net = preset("digits", (1, 8, 8), 0.25)
    params = net.init_params(torch.Generator().manual_seed(0))
    model, io = encoder_graph(net, params, outputs="last")
    return net, params, model, io


# ------------------------------------------------------------------ Runner


def test_runner_runs_the_encoder(encoder):
    net, params, model, _ = encoder
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    runner = Runner(model, provider="CPUExecutionProvider", threads=2)
    assert runner.input_names == ["x"] and runner.output_names == ["y"]
    np.testing.assert_allclose(runner.run({"x": x})["y"], encode(net, params, x)[-1].numpy(),
                               rtol=1e-5, atol=1e-6)


def test_runner_shape_checks_and_bad_inputs(encoder, tmp_path):
    model = encoder[2]
    runner = Runner(model)
    with pytest.raises(EdgeError, match="^missing graph inputs: x$"):
        runner.run({})
    with pytest.raises(EdgeError, match=r"^input x has shape \[3, 1, 8, 9\], the graph wants "
                                        r"\['\?', 1, 8, 8\]$"):
        runner.run({"x": np.zeros((3, 1, 8, 9), np.float32)})
    with pytest.raises(EdgeError, match=r"^input x has shape \[1, 8, 8\]"):
        runner.run({"x": np.zeros((1, 8, 8), np.float32)})
    with pytest.raises(EdgeError, match="^unknown runtime 'tflite'; valid: onnxruntime"):
        Runner(model, runtime="tflite")
    with pytest.raises(EdgeError, match="^no ONNX model at"):
        Runner(tmp_path / "missing.onnx")
    with pytest.raises(EdgeError, match="^threads must be positive, got 0$"):
        Runner(model, threads=0)


def test_unknown_execution_provider_lists_the_available_ones(encoder):
    with pytest.raises(EdgeError) as err:
        Runner(encoder[2], provider="NoSuchExecutionProvider")
    msg = str(err.value)
    assert "NoSuchExecutionProvider" in msg and "\n" not in msg
    for name in onnxruntime.get_available_providers():
        assert name in msg


def test_openvino_missing_names_the_extra(encoder, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(EdgeError) as err:
        Runner(encoder[2], runtime="openvino")
    assert OPENVINO_EXTRA in str(err.value)


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
def test_openvino_runs_the_encoder(encoder):
    net, params, model, _ = encoder
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(Runner(model, runtime="openvino").run({"x": x})["y"],
                               encode(net, params, x)[-1].numpy(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ OnnxStepper, fp32


@pytest.fixture(scope="module")
def fp32_setup():
    net, rule, params = build()
    opt = OptimConfig("sgd", lr=1e-2)
    return net, rule, opt, params, init_state(net, rule, opt, params)


@pytest.mark.parametrize("per_layer", [False, True], ids=["whole", "per-block"])
def test_onnx_stepper_matches_torch(fp32_setup, per_layer):
    net, rule, opt, params, state = fp32_setup
    stepper = OnnxStepper(net, rule, opt, per_layer=per_layer)
    p_o, s_o, m_o, p_t, s_t = params, state, None, params, state
    for s in range(3):
        x1, x2 = views(seed=s)
        new_o, s_o, m_o = stepper(p_o, s_o, x1, x2)
        new_t, s_t, m_t = train_step(net, rule, opt, p_t, s_t, x1, x2)
        d_o = torch.cat([(new_o[k] - p_o[k]).flatten() for k in p_o])
        d_t = torch.cat([(new_t[k] - p_t[k]).flatten() for k in p_t])
        assert float((d_o - d_t).norm() / d_t.norm()) < 1e-4, s
        assert m_o["layer_loss"].shape == (len(net.blocks),)
        assert float(m_o["loss"]) == pytest.approx(float(m_t["loss"]), rel=1e-5)
        torch.testing.assert_close(m_o["layer_loss"], m_t["layer_loss"], rtol=1e-5, atol=1e-6)
        p_o, p_t = new_o, new_t
    assert float(s_o["step"]) == 3.0 and set(s_o) == set(state)
    assert len(stepper._runners) == (len(net.blocks) if per_layer else 1)


def test_onnx_stepper_reexports_for_a_new_batch_but_fixed_graphs_refuse_it(fp32_setup):
    net, rule, opt, params, state = fp32_setup
    stepper = OnnxStepper(net, rule, opt)
    stepper(params, state, *views(BATCH))
    first = stepper._runners[0]
    p6, _, _ = stepper(params, state, *views(6))
    assert stepper._runners[0] is not first
    p_t, _, _ = train_step(net, rule, opt, params, state, *views(6))
    assert rel(p6["enc.0.0.w"], p_t["enc.0.0.w"]) < 1e-5
    model, manifest = step_graph(net, rule, stepper.program, params, state, BATCH)
    fixed = OnnxStepper.from_graphs(net, rule, opt, [model], [manifest.step])
    with pytest.raises(EdgeError, match=r"^input x1 has shape \[6, 1, 8, 8\], the graph wants "
                                        r"\[4, 1, 8, 8\]$"):
        fixed(params, state, *views(6))


def test_onnx_stepper_bad_runtime_and_provider(fp32_setup):
    net, rule, opt, *_ = fp32_setup
    with pytest.raises(EdgeError, match="^unknown runtime 'tvm'"):
        OnnxStepper(net, rule, opt, runtime="tvm")
    with pytest.raises(EdgeError, match="not available; available: .*CPUExecutionProvider"):
        OnnxStepper(net, rule, opt, provider="FooExecutionProvider")


def test_make_stepper_switches_runtimes(fp32_setup):
    net, rule, opt, params, state = fp32_setup
    x1, x2 = views()
    p_t, _, _ = make_stepper("torch", net, rule, opt)(params, state, x1, x2)
    stepper = make_stepper("onnxruntime", net, rule, opt)
    assert isinstance(stepper, OnnxStepper)
    p_o, s_o, _ = stepper(params, state, x1, x2)
    for k in p_t:
        torch.testing.assert_close(p_o[k], p_t[k], rtol=1e-5, atol=1e-7)
    assert s_o["step"].shape == () and float(s_o["step"]) == 1.0
    with pytest.raises(EdgeError, match="unknown runtime 'tvm'"):
        make_stepper("tvm", net, rule, opt)
    with pytest.raises(EdgeError, match="global backprop"):
        make_stepper("onnxruntime", net, rules.get("bp-infonce"), opt)


# ------------------------------------------------------------------ integer


@pytest.fixture(scope="module")
def int_setup():
    net, rule, params = build()
    calib = [views(seed=20), views(seed=21)]
    plan, stores = make_plan(net, rule, params, calib, "int8-w16", 1e-3)
    return net, rule, plan, stores


@pytest.mark.parametrize("per_layer", [False, True], ids=["whole", "per-block"])
def test_integer_stepper_is_the_integer_step_bit_for_bit(int_setup, per_layer):
    net, rule, plan, stores = int_setup
    form = rule.integer_form(net)
    step_fn = integer_stepper("onnxruntime", net, rule, plan, stores, per_layer=per_layer)
    shapes, gen = noise_shapes(net, form, plan, stores), torch.Generator().manual_seed(4)
    q_o, q_t, count = stores, stores, torch.zeros((), dtype=torch.int64)
    state = {"step": count, **rule_state(net, form, plan, stores)}
    for s in range(2):
        x1, x2 = (quantize_input(v, plan.f_in) for v in views(seed=s))
        noise = make_noise(shapes, gen)
        q_t, m_t = integer_step(net, form, plan, q_t, x1, x2, noise, count)
        q_o, state, m_o = step_fn(q_o, state, x1, x2, noise)
        count = count + 1
        assert int(state["step"]) == int(count)
        assert m_o["layer_loss"].tolist() == m_t["layer_loss"].tolist(), s
    for k in q_t:
        assert torch.equal(q_o[k], q_t[k]), k
    assert any(not torch.equal(q_t[k], stores[k]) for k in stores)


def test_stepper_draws_its_bits_from_its_seed(int_setup):
    """noise=None: the bits come from default_rng(seed) through draw_noise, so equal seeds
    give equal steps and the same bits fed explicitly give the same step."""
    net, rule, plan, stores = int_setup
    program = integer_program(net, rule, plan, stores)
    x1, x2 = (quantize_input(v, plan.f_in) for v in views())
    state = int_state(net, rule, plan, stores)
    model, manifest = step_graph(net, rule, program, stores, state, BATCH)

    def stepper(**kwargs):
        return OnnxStepper.from_graphs(net, rule, None, [model], [manifest.step],
                                       program=program, **kwargs)

    a = stepper(seed=3)(stores, state, x1, x2)[0]
    bits = draw_noise([manifest.step], np.random.default_rng(3), 0, 1 << 16)
    assert list(bits) == sorted(bits) and {str(v.dtype) for v in bits.values()} == {"int32"}
    assert all(int(v.min()) >= 0 and int(v.max()) < 1 << 16 for v in bits.values())
    noise = {k.split("/", 1)[1]: torch.from_numpy(v) for k, v in bits.items()}
    b = stepper(seed=99)(stores, state, x1, x2, noise=noise)[0]
    c = stepper(seed=4)(stores, state, x1, x2)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another seed, other bits


# ------------------------------------------------------------------ manifest pieces


def test_apply_bindings_moves_outputs_to_their_inputs():
    a, b = TensorSpec("params/w", (2,), "float32"), TensorSpec("new_params/w", (2,), "float32")
    io = GraphIO("g.onnx", (a,), (b, TensorSpec("loss", (), "float32")),
                 (("new_params/w", "params/w"),))
    carried = {"params/w": np.zeros(2, np.float32)}
    apply_bindings(carried, {"new_params/w": np.ones(2, np.float32), "loss": 0.0}, io)
    assert carried.keys() == {"params/w"} and carried["params/w"].tolist() == [1.0, 1.0]


def _io(bindings, extra_in=(), extra_out=()):
    ins = (TensorSpec("params/w", (2, 3), "float32"), TensorSpec("state/m.w", (2, 3), "float32"),
           *extra_in)
    outs = (TensorSpec("new_params/w", (2, 3), "float32"),
            TensorSpec("new_state/m.w", (2, 3), "float32"), *extra_out)
    return GraphIO("g.onnx", ins, outs, bindings)


@pytest.mark.parametrize("bindings, problem", [
    ((("new_params/w", "params/w"), ("new_state/m.w", "state/m.w")), None),
    ((("new_params/w", "params/w"),), "output new_state/m.w is bound to no input"),
    ((("new_params/w", "params/w"), ("new_params/w", "params/w")),
     "output new_params/w is bound twice"),
    ((("new_params/w", "state/m.w"), ("new_state/m.w", "params/w")),
     "binding new_params/w -> state/m.w: an output must feed the input of its own name"),
    ((("new_params/w", "params/w"), ("new_state/m.w", "params/w")),
     "input params/w is bound twice"),
])
def test_binding_problem(bindings, problem):
    got = binding_problem(_io(bindings))
    assert got == problem if problem is None else got.startswith(problem), got


def test_binding_problem_unfed_input_and_shared_counter():
    io = _io((("new_params/w", "params/w"), ("new_state/m.w", "state/m.w")),
             extra_in=(TensorSpec("state/step", (), "float32"),))
    assert binding_problem(io) == "input state/step is fed by no binding (it would never change)"
    assert binding_problem(io, shared=("state/step",)) is None


def test_graphio_refuses_unknown_and_reshaping_bindings():
    with pytest.raises(EdgeError, match="changes shape or dtype"):
        GraphIO("g.onnx", (TensorSpec("params/w", (2, 3), "float32"),),
                (TensorSpec("new_params/w", (3, 2), "float32"),), (("new_params/w", "params/w"),))
    with pytest.raises(EdgeError, match="names an unknown tensor"):
        _io((("nope", "params/w"),))


def test_manifest_round_trip_carries_its_digest():
    m = Manifest(step=_io((("new_params/w", "params/w"), ("new_state/m.w", "state/m.w"))),
                 rule="r", hparams={"k": (1, 2)}, optimizer={"betas": (0.9, 0.99)},
                 net={"name": "n"}, batch_size=2, versions={"x": "1"})
    text = m.to_json()
    again = Manifest.from_json(text)
    assert again == m and again.hparams == {"k": [1, 2]}
    with pytest.raises(EdgeError, match="does not match its manifest_sha256"):
        Manifest.from_json(text.replace('"batch_size": 2', '"batch_size": 3'))
    with pytest.raises(EdgeError, match="^manifest lacks the field 'step.inputs'$"):
        Manifest.from_json(text.replace('"inputs"', '"inputz"', 1))
