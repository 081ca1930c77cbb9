"""Runners: providers and devices by name, clear errors, the torch/ONNX stepper switch."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import onnxruntime
import pytest
import torch

from edge.errors import EdgeError
from edge.nets import encode, init_params, preset
from edge.optim import OptimConfig
from edge.rules import get
from edge.rules.clapp_pp import ClappPP
from export.inference import encoder_graph
from export.manifest import GraphIO, Manifest, TensorSpec
from export.runner import OPENVINO_EXTRA, OnnxStepper, Runner, make_stepper

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
NO_OPENVINO = "openvino not installed (pip install -e '.[openvino]')"


@pytest.fixture(scope="module")
def encoder():
    net = preset("digits", (1, 8, 8), width=0.25)
    params = init_params(net, torch.Generator().manual_seed(0))
    model, io = encoder_graph(net, params, outputs="last")
    return net, params, model, io


def test_onnxruntime_runner_runs_the_encoder(encoder):
    net, params, model, _ = encoder
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    runner = Runner(model, provider="CPUExecutionProvider", threads=2)
    assert runner.input_names == ["x"] and runner.output_names == ["y"]
    y = runner.run({"x": x})["y"]
    np.testing.assert_allclose(y, encode(net, params, x)[-1].numpy(), rtol=1e-5, atol=1e-6)


def test_unknown_execution_provider_lists_the_available_ones(encoder):
    with pytest.raises(EdgeError) as err:
        Runner(encoder[2], provider="NoSuchExecutionProvider")
    msg = str(err.value)
    assert "NoSuchExecutionProvider" in msg
    for name in onnxruntime.get_available_providers():
        assert name in msg


def test_unknown_runtime_and_bad_inputs(encoder, tmp_path):
    with pytest.raises(EdgeError, match="unknown runtime 'tflite'"):
        Runner(encoder[2], runtime="tflite")
    with pytest.raises(EdgeError, match="no ONNX model"):
        Runner(tmp_path / "missing.onnx")
    runner = Runner(encoder[2])
    with pytest.raises(EdgeError, match="missing graph inputs: x"):
        runner.run({})
    with pytest.raises(EdgeError, match=r"input x has shape \[3, 1, 8, 9\]"):
        runner.run({"x": np.zeros((3, 1, 8, 9), np.float32)})


def test_openvino_missing_names_the_extra(encoder, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(EdgeError) as err:
        Runner(encoder[2], runtime="openvino")
    assert OPENVINO_EXTRA in str(err.value)


@pytest.mark.skipif(not HAS_OPENVINO, reason=NO_OPENVINO)
def test_openvino_runs_the_encoder_and_names_devices(encoder):
    net, params, model, _ = encoder
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    runner = Runner(model, runtime="openvino", device="CPU")
    np.testing.assert_allclose(runner.run({"x": x})["y"], encode(net, params, x)[-1].numpy(),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(EdgeError, match="device 'NPU9' is not available; available: .*CPU"):
        Runner(model, runtime="openvino", device="NPU9")


def test_make_stepper_switches_runtimes():
    net = preset("mlp", (1, 8, 8), width=0.05)
    rule, opt = ClappPP(), OptimConfig()
    gen = torch.Generator().manual_seed(0)
    params = init_params(net, gen)
    params.update(rule.init(net, gen))
    state = opt.init_state(params)
    x1, x2 = torch.randn(2, 4, 1, 8, 8, generator=gen)
    p_t, s_t, m_t = make_stepper("torch", net, rule, opt)(params, state, x1, x2)
    stepper = make_stepper("onnxruntime", net, rule, opt)
    assert isinstance(stepper, OnnxStepper)
    p_o, s_o, m_o = stepper(params, state, x1, x2)
    for k in p_t:
        torch.testing.assert_close(p_o[k], p_t[k], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m_o["layer_loss"], m_t["layer_loss"])
    assert s_o["step"].shape == () and float(s_o["step"]) == 1.0
    with pytest.raises(EdgeError, match="unknown runtime 'tvm'"):
        make_stepper("tvm", net, rule, opt)
    with pytest.raises(EdgeError, match="global backprop"):
        make_stepper("onnxruntime", net, get("bp-infonce"), opt)
    with pytest.raises(EdgeError, match="not available; available: .*CPUExecutionProvider"):
        make_stepper("onnxruntime", net, rule, opt, provider="FooExecutionProvider")


def test_manifest_round_trip_and_binding_checks():
    a = TensorSpec("params/w", (2, 3), "float32")
    b = TensorSpec("new_params/w", (2, 3), "float32")
    io = GraphIO("g.onnx", (a,), (b,), (("new_params/w", "params/w"),))
    m = Manifest(step=io, rule="r", hparams={"k": (1, 2)}, optimizer={"betas": (0.9, 0.99)},
                 net={"name": "n"}, batch_size=2, versions={"x": "1"})
    again = Manifest.from_json(m.to_json())
    assert again == m and again.hparams == {"k": [1, 2]}
    with pytest.raises(EdgeError, match="changes shape or dtype"):
        GraphIO("g.onnx", (a,), (TensorSpec("new_params/w", (3, 2), "float32"),),
                (("new_params/w", "params/w"),))
    with pytest.raises(EdgeError, match="unknown tensor"):
        GraphIO("g.onnx", (a,), (b,), (("nope", "params/w"),))
    with pytest.raises(EdgeError, match="malformed manifest"):
        Manifest.from_json('{"step": {}}')
