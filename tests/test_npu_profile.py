"""The npu operator profile: the plain step's numbers without comparisons, scatters or indices.

Tolerance: PROFILE_TOLERANCE, the relative L2 per parameter / state tensor between the plain
and the npu graph after STEPS steps in onnxruntime (every rewrite is exact, so this is float
tolerance only; measured 0, bit for bit). Integer steps must match bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edge import rules
from edge.app.cli import main
from edge.data import default_views, load, two_views
from edge.errors import EdgeError
from edge.nets import LayerSpec, layer_backward, layer_forward
from edge.app.train import TrainConfig, build, initial_params
from export.bundle import check_bundle, write_bundle
from export.manifest import PARAMS, STATE
from export.profile import BANNED_OPS, apply_profile, npu_violations, profile_bundle
from export.runner import Runner, apply_bindings
from export.trace import export_function, op_counts
from export.training_step import training_step

BATCH, STEPS = 8, 20
PROFILE_TOLERANCE = 1e-6
LOCAL = ["clapp", "clapp++", "clapp++dfb", "clapp++both", "ff"]


def _setup(rule: str = "clapp++", net: str | None = None):
    cfg = TrainConfig(rule=rule, width=0.25, batch_size=BATCH, net=net)
    spec, learning_rule = build(cfg, (1, 8, 8))
    opt = cfg.optim()
    params = initial_params(cfg, spec, learning_rule)
    return spec, learning_rule, opt, params, opt.init_state(params)


@pytest.fixture(scope="module")
def digits_views():
    ds = load("digits")
    gen = torch.Generator().manual_seed(5)
    return [two_views(ds.x_train[s * BATCH:(s + 1) * BATCH], gen, default_views("digits"),
                      ds.mean, ds.std) for s in range(STEPS)]


@pytest.fixture(scope="module")
def conv_step():
    net, rule, opt, params, state = _setup()
    model, manifest = training_step(net, rule, opt, params, state, BATCH)
    return model, manifest, params, state


def _carried(params, state):
    out = {PARAMS + k: v.numpy() for k, v in params.items()}
    out.update({STATE + k: v.numpy() for k, v in state.items()})
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_npu_profile_has_none_of_the_banned_patterns(conv_step):
    model, *_ = conv_step
    plain = npu_violations(model)
    assert any(v.startswith("ScatterElements") for v in plain)  # the check can fail
    assert any(v.startswith("MaxPool with Indices") for v in plain)
    assert any(v.startswith("Cast from bool") for v in plain)
    npu = apply_profile(model, "npu")
    assert npu_violations(npu) == []
    ops = set(op_counts(npu))
    assert not ops & BANNED_OPS, ops & BANNED_OPS
    assert {"Ceil", "Clip", "DepthToSpace"} <= ops  # the arithmetic forms are there
    assert [i.name for i in npu.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in npu.graph.output] == [o.name for o in model.graph.output]
    onnx.checker.check_model(npu, full_check=True)


def test_npu_profile_matches_plain_for_20_steps(conv_step, digits_views):
    model, manifest, params, state = conv_step
    plain, npu = Runner(model), Runner(apply_profile(model, "npu"))
    a = _carried(params, state)
    b = dict(a)
    for x1, x2 in digits_views:
        outs_a = plain.run({**a, "x1": x1, "x2": x2})
        outs_b = npu.run({**b, "x1": x1, "x2": x2})
        np.testing.assert_allclose(outs_b["layer_loss"], outs_a["layer_loss"], rtol=1e-6)
        apply_bindings(a, outs_a, manifest.step)
        apply_bindings(b, outs_b, manifest.step)
    worst = max(_rel(b[k], a[k]) for k in a)
    assert worst <= PROFILE_TOLERANCE, worst


def test_pool_rewrite_keeps_torch_first_argmax_on_ties():
    """Windows whose maximum appears twice or four times (constant patches): the gradient
    goes to the first maximum in row-major order, as torch's max-pool indices send it."""
    layer = LayerSpec("conv", 1, 2, pool=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 7, 6, generator=gen)  # odd height: floor-mode pooling drops a row
    x[:, :, :5, :] = 0.5  # constant rows -> equal (positive) conv outputs inside them
    w = torch.randn(2, 1, 3, 3, generator=gen).abs()
    b = torch.tensor([0.3, 0.1])

    def fn(t):
        out = layer_forward(layer, t["w"], t["b"], t["x"])
        gw, gb = layer_backward(layer, out, t["gy"])
        return {"gw": gw, "gb": gb}

    gy = torch.randn(2, 2, 3, 3, generator=gen)
    inputs = {"x": x, "w": w, "b": b, "gy": gy}
    model = export_function(fn, inputs, ["gw", "gb"])
    z = torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1))[:, :, :6, :6]
    windows = z.reshape(2, 2, 3, 2, 3, 2).permute(0, 1, 2, 4, 3, 5).reshape(-1, 4)
    ties = ((windows == windows.max(1, keepdim=True).values).sum(1) > 1) & (windows.max(1).values
                                                                           > 0)
    assert int(ties.sum()) >= 2  # the case under test is really there
    npu = apply_profile(model, "npu")
    assert npu_violations(npu) == []
    feeds = {k: v.numpy() for k, v in inputs.items()}
    got, plain = Runner(npu).run(feeds), Runner(model).run(feeds)
    want = fn(inputs)  # torch eager: the reference for which unit gets the gradient
    for k in ("gw", "gb"):
        np.testing.assert_array_equal(got[k], plain[k])
        np.testing.assert_allclose(got[k], want[k].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule_name", LOCAL)
def test_every_local_rule_exports_in_the_npu_profile(rule_name):
    net, rule, opt, params, state = _setup(rule_name)
    try:
        plain, manifest = training_step(net, rule, opt, params, state, BATCH)
    except EdgeError as e:  # a rule that does not export at all is not the profile's failure
        pytest.xfail(f"{rule_name} does not export (plain profile either): {str(e)[:120]}")
    npu = apply_profile(plain, "npu")
    assert npu_violations(npu) == []
    gen = torch.Generator().manual_seed(1)
    feeds = {**_carried(params, state), "x1": torch.randn(BATCH, 1, 8, 8, generator=gen).numpy(),
             "x2": torch.randn(BATCH, 1, 8, 8, generator=gen).numpy()}
    a, b = Runner(plain).run(feeds), Runner(npu).run(feeds)
    assert max(_rel(b[k], a[k]) for k in a) <= PROFILE_TOLERANCE


def test_integer_step_in_the_npu_profile_is_bit_exact():
    """Integer mode (a linear net): the integer comparisons become Clip arithmetic with no
    subtraction of the two sides, so no overflow; every output equal bit for bit."""
    qc = pytest.importorskip("quant.calibrate")
    from export.integer import integer_program, integer_state
    from export.manifest import NOISE
    from quant.integer import make_noise

    net, _, opt, _, _ = _setup("clapp++", net="mlp")
    rule = rules.get("clapp++")
    gen = torch.Generator().manual_seed(0)
    from edge.nets import init_params

    params = init_params(net, gen)
    params.update(rule.init(net, gen))
    views = [tuple(torch.randn(2, 4, 1, 8, 8, generator=gen)) for _ in range(3)]
    plan, q = qc.make_plan(net, rule, params, views)
    program = integer_program(net, rule, plan, q)
    model, manifest = training_step(net, rule, opt, q, integer_state(), 4, program=program)
    npu = apply_profile(model, "npu")
    assert npu_violations(npu) == []
    assert npu_violations(model)  # the plain integer graph is full of comparisons
    plain_r, npu_r = Runner(model), Runner(npu)
    a = {PARAMS + k: v.numpy() for k, v in q.items()} | {STATE + "step": np.zeros((), np.float32)}
    b = dict(a)
    for x1, x2 in views:
        x1q, x2q = (qc.quantize_input(x, plan.f_in).numpy() for x in (x1, x2))
        noise = {NOISE + k: v.numpy() for k, v in make_noise(plan, q, gen).items()}
        oa = plain_r.run({**a, "x1": x1q, "x2": x2q, **noise})
        ob = npu_r.run({**b, "x1": x1q, "x2": x2q, **noise})
        for k in oa:
            np.testing.assert_array_equal(ob[k], oa[k], err_msg=k)
        apply_bindings(a, oa, manifest.step)
        apply_bindings(b, ob, manifest.step)


def test_unknown_profile_is_an_error(conv_step):
    with pytest.raises(EdgeError, match="unknown operator profile 'gpu'; valid: plain, npu"):
        apply_profile(conv_step[0], "gpu")


def test_profile_bundle_rewrites_graphs_and_keeps_the_bundle_valid(tmp_path):
    net, rule, opt, params, state = _setup()
    manifest = write_bundle(tmp_path / "b", net, rule, opt, params, state, 4, per_layer=True)
    before = onnx.load(str(tmp_path / "b" / manifest.step.file))
    assert npu_violations(before)
    done = profile_bundle(tmp_path / "b", "npu")
    assert done == [manifest.step.file, *(io.file for io in manifest.layers)]
    checked = check_bundle(tmp_path / "b")  # hashes, graphs vs manifest, checker
    assert checked.step == manifest.step
    for io in (checked.step, *checked.layers):
        assert npu_violations(onnx.load(str(tmp_path / "b" / io.file))) == []


def test_cli_profile_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--profile", "gpu", "--width", "0.25", "--batch-size", "4",
              "-o", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown operator profile") and len(err.splitlines()) == 1
