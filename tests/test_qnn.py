"""QNN HTP (onnxruntime-qnn's HTP simulator): whole step on the NPU or an error, never a
silent CPU fallback. Float steps: export.qnn.FP16_TOLERANCE, relative L2 per tensor of the
fp16 HTP step against fp32 onnxruntime after STEPS SGD steps. Integer steps: the int32 form
in an fp32 HTP session, every store equal to the torch integer step's bit for bit (run in a
child process: the HTP keeps one precision per process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge import rules
from edge.app.cli import main
from edge.errors import EdgeError
from edge.nets import fold_batchnorm, preset
from edge.optim import OptimConfig
from export import qnn
from export.manifest import PARAMS, STATE
from export.profile import apply_profile
from export.runner import OnnxStepper, Runner, apply_bindings, make_stepper
from export.step import fp32_program, step_graph

HAS_QNN = qnn.available()
NO_QNN = f"onnxruntime-qnn not installed ({qnn.QNN_EXTRA})"
needs_qnn = pytest.mark.skipif(not HAS_QNN, reason=NO_QNN)
BATCH, STEPS = 8, 20
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def sgd_step():
    net = preset("digits", SHAPE, 0.25)
    rule = rules.get("clapp++")
    gen = torch.Generator().manual_seed(0)
    net, params = fold_batchnorm(net, net.init_params(gen))
    params.update(rule.init(net, gen))
    opt = OptimConfig("sgd")
    state = opt.init_state(params)
    model, manifest = step_graph(net, rule, fp32_program(net, rule, opt), params, state, BATCH)
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


def test_one_precision_per_process(monkeypatch):
    """The first session fixes the process's precision; another one is refused up front."""
    monkeypatch.setattr(qnn, "_PROCESS_PRECISION", ["fp16"])
    with pytest.raises(EdgeError, match="one precision per process.*new process"):
        qnn._claim(qnn.INTEGER_PRECISION)
    qnn._claim("fp16")  # the same precision again is fine


@needs_qnn
def test_plain_graph_names_the_ops_left_on_the_cpu(sgd_step):
    """The plain step has ops QNN does not take: an error listing them, not a session that
    quietly runs those nodes on the CPU provider."""
    with pytest.raises(EdgeError, match=r"left on the CPU: \w+ x\d+"):
        Runner(sgd_step[5], runtime="qnn-htp")


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
        x1, x2 = (torch.randn(BATCH, *SHAPE, generator=gen).numpy() for _ in range(2))
        apply_bindings(a, ref.run({**a, "x1": x1, "x2": x2}), manifest.step)
        apply_bindings(b, htp.run({**b, "x1": x1, "x2": x2}), manifest.step)
    rel = {k: float(np.linalg.norm(b[k] - a[k]) / max(np.linalg.norm(a[k]), 1e-30)) for k in a}
    assert max(rel.values()) <= qnn.FP16_TOLERANCE, rel
    assert max(rel.values()) > 1e-6  # it really ran in fp16, not on onnxruntime's CPU


@needs_qnn
def test_adamw_in_fp16_is_refused(sgd_step):
    net, rule, *_ = sgd_step
    with pytest.raises(EdgeError, match="optimizer sgd"):
        make_stepper("qnn-htp", net, rule, OptimConfig("adamw"))


@needs_qnn
def test_stepper_default_profile_is_npu(sgd_step):
    net, rule, opt, params, state, model, manifest = sgd_step
    stepper = OnnxStepper.from_graphs(net, rule, opt, [model], [manifest.step],
                                      runtime="qnn-htp")
    assert stepper.profile == "npu" and stepper._runners[0].placement.complete
    x = torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(1))
    p, s, m = stepper(params, state, x, x.flip(0))
    assert torch.isfinite(m["loss"])
    assert abs(float(s["step"]) - 1) < 1e-3  # the counter is computed in fp16 too


_INTEGER_CHILD = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from test_iree import integer_case, run_integer
from export.runner import OnnxStepper
net, rule, plan, stores, views, program, model, manifest = integer_case(sys.argv[2])
stepper = OnnxStepper.from_graphs(net, rule, None, [model], [manifest.step], program=program,
                                  runtime="qnn-htp")
p = stepper._runners[0].placement
q_t, q_o, s_o, m_t, m_o = run_integer(stepper, net, rule, plan, stores, views)
print(json.dumps({
    "complete": p.complete, "cpu_ops": p.cpu_ops, "nodes": p.nodes,
    "on_accelerator": p.on_accelerator,
    "unequal": [k for k in q_t if q_o[k].dtype != q_t[k].dtype or not torch.equal(q_o[k], q_t[k])],
    "moved": any(not torch.equal(q_t[k], stores[k]) for k in stores),
    "loss": [float(m_t["loss"]), float(m_o["loss"])], "steps": int(s_o["step"])}))
"""


@needs_qnn
@pytest.mark.parametrize("name", ["digits", pytest.param("mlp", marks=pytest.mark.slow)])
def test_integer_step_runs_whole_on_htp_bit_exact(name):
    """The integer step's int32 form: every node on the HTP, every store equal to torch's."""
    tests = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", _INTEGER_CHILD, tests, name],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["complete"] and r["cpu_ops"] == {} and r["on_accelerator"] == r["nodes"] > 50
    assert r["unequal"] == [] and r["moved"]
    assert r["loss"][0] == r["loss"][1] and r["steps"] == 5


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
    assert "unknown --runtime 'tpu'" in err and "qnn-htp" in err and len(err.splitlines()) == 1
