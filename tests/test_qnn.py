"""QNN HTP (onnxruntime-qnn's HTP simulator): whole step on the NPU or an error, never a
silent CPU fallback. Tolerance: export.qnn.FP16_TOLERANCE, relative L2 per tensor of the fp16
HTP step against fp32 onnxruntime after STEPS SGD steps."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from edge.app.cli import main
from edge.errors import EdgeError
from edge.app.train import TrainConfig, build, initial_params
from export import qnn
from export.manifest import PARAMS, STATE
from export.profile import apply_profile
from export.runner import OnnxStepper, Runner, apply_bindings, make_stepper
from export.training_step import training_step

HAS_QNN = qnn.available()
NO_QNN = f"onnxruntime-qnn not installed ({qnn.QNN_EXTRA})"
needs_qnn = pytest.mark.skipif(not HAS_QNN, reason=NO_QNN)
BATCH, STEPS = 8, 20


@pytest.fixture(scope="module")
def sgd_step():
    cfg = TrainConfig(width=0.25, batch_size=BATCH, optimizer="sgd")
    net, rule = build(cfg, (1, 8, 8))
    opt = cfg.optim()
    params = initial_params(cfg, net, rule)
    state = opt.init_state(params)
    model, manifest = training_step(net, rule, opt, params, state, BATCH)
    return net, rule, opt, params, state, model, manifest


def test_missing_extra_names_it(monkeypatch):
    qnn._register.cache_clear()
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # import fails
    try:
        with pytest.raises(EdgeError, match=r'pip install -e "\.\[qnn\]"'):
            qnn.qnn_session(b"")
        assert not qnn.available()
    finally:
        qnn._register.cache_clear()


@needs_qnn
def test_plain_graph_names_the_ops_left_on_the_cpu(sgd_step):
    """The plain step's MaxPool-with-indices is not a QNN op: an error listing it, not a
    session that quietly runs those nodes on the CPU provider."""
    model = sgd_step[5]
    with pytest.raises(EdgeError, match=r"left on the CPU: MaxPool x4"):
        Runner(model, runtime="qnn-htp")


@needs_qnn
def test_npu_step_is_all_on_qnn_and_matches_onnxruntime(sgd_step):
    *_, params, state, model, manifest = sgd_step
    npu = apply_profile(model, "npu")
    htp = Runner(npu, runtime="qnn-htp")
    p = htp.placement
    assert p.complete and p.partitions >= 1 and p.cpu_ops == {}
    assert p.on_accelerator == p.nodes > 100
    ref = Runner(model)
    gen = torch.Generator().manual_seed(0)
    a = {PARAMS + k: v.numpy() for k, v in params.items()}
    a.update({STATE + k: v.numpy() for k, v in state.items()})
    b = dict(a)
    for _ in range(STEPS):
        x1, x2 = (torch.randn(BATCH, 1, 8, 8, generator=gen).numpy() for _ in range(2))
        apply_bindings(a, ref.run({**a, "x1": x1, "x2": x2}), manifest.step)
        apply_bindings(b, htp.run({**b, "x1": x1, "x2": x2}), manifest.step)
    rel = {k: float(np.linalg.norm(b[k] - a[k]) / max(np.linalg.norm(a[k]), 1e-30)) for k in a}
    assert max(rel.values()) <= qnn.FP16_TOLERANCE, rel
    assert max(rel.values()) > 1e-6  # it really ran in fp16, not on onnxruntime's CPU


@needs_qnn
def test_adamw_in_fp16_is_refused(sgd_step):
    net, rule, *_ = sgd_step
    from edge.optim import OptimConfig

    with pytest.raises(EdgeError, match="optimizer sgd"):
        make_stepper("qnn-htp", net, rule, OptimConfig("adamw"))


@needs_qnn
def test_integer_step_lists_what_the_htp_refuses():
    qc = pytest.importorskip("quant.calibrate")
    from edge import rules
    from edge.nets import init_params, preset
    from edge.optim import OptimConfig
    from export.integer import integer_program, integer_state

    net = preset("mlp", (1, 8, 8), width=0.05)
    rule = rules.get("clapp++")
    gen = torch.Generator().manual_seed(0)
    params = init_params(net, gen)
    params.update(rule.init(net, gen))
    views = [tuple(torch.randn(2, 4, 1, 8, 8, generator=gen))]
    plan, q = qc.make_plan(net, rule, params, views)
    model, _ = training_step(net, rule, OptimConfig(), q, integer_state(), 4,
                             program=integer_program(net, rule, plan, q), profile="npu")
    with pytest.raises(EdgeError, match=r"left on the CPU: .*MatMul(Integer)? x\d+"):
        Runner(model, runtime="qnn-htp")


@needs_qnn
def test_stepper_default_profile_is_npu(sgd_step):
    net, rule, opt, params, state, model, manifest = sgd_step
    stepper = OnnxStepper.from_graphs(net, rule, opt, [model], [manifest.step],
                                      runtime="qnn-htp")
    assert stepper.profile == "npu" and stepper._runners[0].placement.complete
    x = torch.randn(BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    p, s, m = stepper(params, state, x, x.flip(0))
    assert torch.isfinite(m["loss"])
    assert abs(float(s["step"]) - 1) < 1e-3  # the counter is computed in fp16 too


@needs_qnn
@pytest.mark.slow
def test_cli_train_on_qnn_reports_placement(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--runtime", "qnn-htp", "--optimizer", "sgd", "--width", "0.25",
              "--subset", "64", "--epochs", "1", "--batch-size", "16",
              "--out", str(tmp_path / "r"), "--json"])
    assert e.value.code == 0
    out = json.loads(capsys.readouterr().out)
    rt = out["runtime"]
    assert rt["name"] == "qnn-htp" and rt["profile"] == "npu"
    assert rt["placement"] and all(p["on_accelerator"] == p["nodes"] for p in rt["placement"])


def test_cli_unknown_runtime_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--runtime", "tpu", "--epochs", "1", "--subset", "32"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown runtime 'tpu'" in err and "qnn-htp" in err and len(err.splitlines()) == 1
