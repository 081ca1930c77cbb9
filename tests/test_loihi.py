"""The CLAPP dense update in Loihi 2's learning-engine form (`quant.loihi`): the NumPy engine
simulation against edge's integer dense update at the engine's widths, bit for bit; the case
where the widths matter; `describe_engine`; and, where lava-nc imports, Lava's own model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from edge.errors import EdgeError
from edge.layers import intops
from quant.loihi import (
    LOIHI2,
    WIDE,
    DenseRule,
    EngineWidths,
    describe_engine,
    edge_dense_update,
    engine_dense_update,
    engine_noise,
    narrow_input,
    pre_trace,
    render_engine,
    rule_for_lr_shift,
)


def data(seed: int, n: int = 6, fin: int = 9, fout: int = 5, w_span: int = 256,
         per_synapse: bool = True):
    """Random weights, sparse 8-bit inputs (zeros: no spike), ReLU outputs with zeros (the
    gate), int8 errors with their extremes, and 7-bit random numbers."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-w_span, w_span, (fout, fin))
    x = rng.integers(0, 256, (n, fin))
    x[rng.random((n, fin)) < 0.3] = 0
    x[0, 0] = 255  # round(255 / 2) = 128 in the trace, clipped to 127 by the product
    y = rng.integers(0, 256, (n, fout))
    y[rng.random((n, fout)) < 0.3] = 0
    r = rng.integers(-127, 128, (n, fout))
    r[0, :2] = (127, -127)
    shape = (n, fout, fin) if per_synapse else (n,)
    rand = rng.integers(0, 128, shape)
    return w, x, y, r, rand


def both(w, x, y, r, rand, rule: DenseRule, edge_rule: DenseRule | None = None):
    """(engine run, edge's store) for the same epochs; edge_rule: edge at other widths."""
    run = engine_dense_update(w, x, y, r, rule, rand)
    out = edge_dense_update(torch.tensor(w, dtype=torch.int16), torch.tensor(x, dtype=torch.uint8),
                            torch.tensor(y, dtype=torch.uint8), torch.tensor(r, dtype=torch.int32),
                            edge_rule or rule, torch.tensor(rand))
    assert out.dtype == torch.int16
    return run, out.numpy().astype(np.int64)


# ------------------------------------------------------------------------ widths, rule


def test_widths_are_lavas():
    w = LOIHI2
    assert (w.weight_bits, w.frac_bits, w.trace_bits, w.acc_bits, w.mant_bits) == (8, 7, 7, 15, 4)
    assert (w.weight_lo, w.weight_hi) == (-256, 255)
    assert (w.acc_lo, w.acc_hi) == (-(2**15) - 1, 2**15 - 1)
    assert (w.exp_min, w.exp_max, w.payload_shift) == (-7, 8, 1)
    assert DenseRule(-1, 0).shift == 3  # 7 + 7 + 4 - 15
    assert DenseRule(-1, 0, WIDE).shift == 0
    with pytest.raises(EdgeError, match="error magnitude"):
        EngineWidths(trace_bits=6)
    with pytest.raises(EdgeError, match="random bits"):
        EngineWidths(frac_bits=17, acc_bits=30)


def test_rule_normalised_as_lava_parses_it():
    r = DenseRule(-8, 0)  # Lava: |m| > 7 and even -> halved, exponent up
    assert (r.mantissa, r.exponent) == (-4, 1)
    assert (DenseRule(16, -3).mantissa, DenseRule(16, -3).exponent) == (4, -1)
    with pytest.raises(EdgeError, match="negative"):
        DenseRule(-8, 8)  # exponent at its top: stays -8, and +8 (the y3 product) does not fit
    assert DenseRule(-3, 2).scale == -12
    for bad in ((9, 0), (0, 0), (1, 9), (1, -8)):
        with pytest.raises(EdgeError):
            DenseRule(*bad)
    assert DenseRule(-3, -2).expression() == "-3 * 2^-2 * x0 * x1 * y2 + 3 * 2^-2 * x0 * x1 * y3"
    assert DenseRule(3, 2).expression() == "3 * 2^2 * x0 * x1 * y2 - 3 * 2^2 * x0 * x1 * y3"
    assert [p["factors"] for p in DenseRule().products()] == [["x1", "y2"], ["x1", "y3"]]


def test_lr_shift_maps_to_a_scale():
    assert rule_for_lr_shift(5).exponent == 0 and rule_for_lr_shift(5).mantissa == -1
    assert rule_for_lr_shift(-3).exponent == 8 and rule_for_lr_shift(12).exponent == -7
    with pytest.raises(EdgeError, match="-3..12"):
        rule_for_lr_shift(13)


def test_pre_trace_is_lavas_graded_spike():
    x = np.arange(256)
    t = pre_trace(x)
    np.testing.assert_array_equal(t, np.round(x / 2).astype(np.int64))  # half to even
    assert t[255] == 128 and t[1] == 0 and t[3] == 2
    edge = narrow_input(torch.arange(256, dtype=torch.uint8)).numpy()
    np.testing.assert_array_equal(edge, np.minimum(t, 127))


def test_noise_makes_edge_round_as_the_engine():
    """stochastic_shift(v, 7, engine_noise(k)) = floor(v / 128) + [k < v mod 128], every k."""
    v = torch.arange(-300, 300, dtype=torch.int64)[:, None].expand(-1, 128)
    k = torch.arange(128)[None, :].expand(600, -1)
    got = intops.stochastic_shift(v, 7, engine_noise(k.contiguous()))
    want = torch.div(v, 128, rounding_mode="floor") + (k < torch.remainder(v, 128)).long()
    assert torch.equal(got, want)


# --------------------------------------------------------------- engine == edge, bit for bit


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rule", [DenseRule(-1, -7), DenseRule(-3, -4), DenseRule(5, -6),
                                  DenseRule(-7, -2)])
def test_engine_equals_edge(seed, rule):
    w, x, y, r, rand = data(seed, per_synapse=seed % 2 == 0)
    run, edge = both(w, x, y, r, rand, rule)
    np.testing.assert_array_equal(run.weights, edge)
    assert (run.weights != w).any()  # the rule moved something


@pytest.mark.parametrize("seed", range(3))
def test_saturation_at_the_16_bit_accumulator(seed):
    """Large scales: products beyond 2^15 clip, sums clip, weights sit at their bounds."""
    w, x, y, r, rand = data(seed, n=8)
    w[:, :3] = 255
    w[:, 3:6] = -256
    for rule in (DenseRule(-7, 4), DenseRule(3, 8), DenseRule(-1, 0)):
        run, edge = both(w, x, y, r, rand, rule)
        assert run.clipped > 0
        np.testing.assert_array_equal(run.weights, edge)
        assert (run.weights == 255).any() and (run.weights == -256).any()


def test_fixed_random_bits_floor_and_ceil():
    """rand = 127 never rounds up (floor), rand = 0 rounds up any remainder (ceil): one epoch
    against the update written out by hand."""
    w, x, y, r, _ = data(7, n=1)
    rule = DenseRule(-3, -5)
    x1 = np.minimum(pre_trace(x[0]), 127) * (x[0] > 0)
    g = np.where(y[0] > 0, r[0], 0)[:, None] * x1[None, :]
    t = np.clip((rule.mantissa * g >> 3) << (rule.exponent + 7), -(2**15) - 1, 2**15 - 1)
    acc = (w << 7) + t
    for k, rounded in ((127, acc >> 7), (0, -((-acc) >> 7))):
        rand = np.full((1,), k)
        run, edge = both(w, x, y, r, rand, rule)
        np.testing.assert_array_equal(run.weights, np.clip(rounded, -256, 255))
        np.testing.assert_array_equal(edge, run.weights)


def test_stale_trace_is_gated_by_x0():
    """A zero input sends no spike: its trace keeps the last payload, x0 = 0 keeps it out."""
    fin, fout = 3, 2
    w = np.zeros((fout, fin), np.int64)
    x = np.array([[200, 100, 0], [0, 100, 0]])
    y = np.full((2, fout), 50)
    r = np.full((2, fout), 100)
    rule = DenseRule(-1, -2)
    rand = np.zeros(2, np.int64)
    first = engine_dense_update(w, x[:1], y[:1], r[:1], rule, rand[:1])
    run = engine_dense_update(w, x, y, r, rule, rand)
    np.testing.assert_array_equal(run.x1, [100, 50, 0])  # input 0 still holds 200 / 2
    np.testing.assert_array_equal(run.weights[:, 0], first.weights[:, 0])  # no second step
    assert (run.weights[:, 1] < first.weights[:, 1]).all()
    _, edge = both(w, x, y, r, rand, rule)
    np.testing.assert_array_equal(edge, run.weights)


def test_widths_matter():
    """edge's full-width update (8-bit inputs, no product shift, 30-bit accumulator, the same
    scale) is not the 7/9/16-bit one; nor is the engine without its 16-bit saturation. The
    equality of the two implementations holds at either width."""
    w, x, y, r, rand = data(11, n=8, w_span=64)
    narrow, wide = DenseRule(-1, -3), DenseRule(-1, -7, WIDE)  # same S x r: 2^-3 / 16
    run, edge = both(w, x, y, r, rand, narrow)
    np.testing.assert_array_equal(run.weights, edge)
    run_w, edge_w = both(w, x, y, r, rand, wide)
    np.testing.assert_array_equal(run_w.weights, edge_w)
    assert (edge_w != run.weights).sum() > 5
    assert run_w.clipped == 0
    # saturation: a 24-bit accumulator keeps what the 16-bit one clips
    big = DenseRule(-7, 4)
    no_clip = DenseRule(-7, 4, dataclasses.replace(LOIHI2, name="acc24", acc_bits=24))
    run, edge = both(w, x, y, r, rand, big, edge_rule=no_clip)
    assert run.clipped > 0 and (edge != run.weights).any()


def test_inputs_checked():
    w, x, y, r, rand = data(0)
    rule = DenseRule()
    with pytest.raises(EdgeError, match="int8 error"):
        engine_dense_update(w, x, y, r * 2, rule, rand)
    with pytest.raises(EdgeError, match="unsigned"):
        engine_dense_update(w, x - 128, y, r, rule, rand)
    with pytest.raises(EdgeError, match="random"):
        engine_dense_update(w, x, y, r, rule, rand + 128)
    with pytest.raises(EdgeError, match="weights outside"):
        engine_dense_update(w * 2, x, y, r, rule, rand)


# ------------------------------------------------------------------------ describe_engine


def test_describe_engine():
    d = describe_engine("loihi2")
    json.dumps(d)
    assert {"engine", "summary", "widths", "rule", "mapping", "verified", "assumed", "limits",
            "sources"} <= set(d)
    bits = {w["name"]: w["bits"] for w in d["widths"]}
    assert bits["trace_bits"] == 7 and bits["acc_bits"] == 15 and bits["weight_bits"] == 8
    assert all(w["source"] and w["status"] for w in d["widths"])
    assert d["rule"]["product_shift"] == 3
    assert "x0 * x1 * y2" in d["rule"]["lava_expression"]
    whats = [lim["what"] for lim in d["limits"]]
    assert "convolutions" in whats and "the prediction B c as a third factor" in whats
    assert all(lim["would_need"] for lim in d["limits"])
    text = render_engine(d)
    assert "dw = " in text and "convolutions" in text and "needs:" in text
    with pytest.raises(EdgeError, match="valid: loihi2"):
        describe_engine("speck")


# ------------------------------------------------------------- Lava's own model, if present


def lava_update(w, x, y, r, expression: str, rand):
    """The same epochs through lava-nc's parser, graded-spike handling, bit-approximate
    product-series applier and learning phase (its methods on a bare model object)."""
    from lava.magma.core.learning.constants import GradedSpikeCfg
    from lava.magma.core.learning.learning_rule import Loihi3FLearningRule
    from lava.magma.core.learning.learning_rule_applier import LearningRuleApplierBitApprox
    from lava.magma.core.model.py.connection import LearningConnectionModelBitApproximate as M
    from lava.utils.weightutils import SignMode

    lr = Loihi3FLearningRule(dw=expression)
    m = object.__new__(M)
    fout, fin = w.shape
    m.weights, m.sign_mode = w.copy(), SignMode.MIXED
    m._learning_rule, m._graded_spike_cfg = lr, GradedSpikeCfg.OVERWRITE
    m._learning_rule_appliers = {"weights": LearningRuleApplierBitApprox(lr.dw)}
    m.x1, m.x2 = np.zeros(fin, np.int64), np.zeros(fin, np.int64)
    m._x_impulses_int = m._x_impulses_frac = np.zeros(2, np.int64)
    m.time_step = 1
    for t in range(x.shape[0]):
        m.tx = np.zeros(fin, np.int64)
        M._process_pre_spikes(m, x[t])  # x1 = round(payload / 2) where the payload > 0
        x0 = m.tx > 0
        y2, y3 = (np.broadcast_to(v[:, None], (fout, fin)) for v in
                  (np.where(y[t] > 0, np.maximum(r[t], 0), 0),
                   np.where(y[t] > 0, np.maximum(-r[t], 0), 0)))
        args = {"shape": (fout, fin), "x0": x0[None, :], "y0": np.zeros((fout, 1), bool),
                "u": 0, "weights": m.weights, "tag_1": 0 * m.weights, "tag_2": 0 * m.weights,
                "x1_x0": m.x1.astype(np.int64)[None, :], "y2_x0": y2, "y3_x0": y3}
        m._extract_applier_args = lambda xh, yh, a=args: a
        m._conn_var_random = type("R", (), {"random_stochastic_round": rand[t] / 128})
        M._apply_learning_rules(m, None, None)
    return m.weights


@pytest.mark.parametrize("seed", range(3))
def test_against_lava(seed):
    pytest.importorskip("lava.magma.core.model.py.connection")
    w, x, y, r, rand = data(seed, n=5, per_synapse=seed == 2)
    w[:, :2] = (255, -256)
    clipped = 0
    for rule in (DenseRule(-1, -7), DenseRule(-5, -3), DenseRule(3, 2), DenseRule(-8, 0),
                 DenseRule(7, 8)):
        got = lava_update(w, x, y, r, rule.expression(), rand)
        run = engine_dense_update(w, x, y, r, rule, rand)
        np.testing.assert_array_equal(run.weights, got)
        clipped += run.clipped
    assert clipped > 0


def test_cli_rules_engine(capsys):
    """`edge rules --engine loihi2` prints describe_engine's data (text or --json); an unknown
    engine is one line and exit 2."""
    import json

    from edge.app.cli import main
    from quant.loihi import describe_engine, render_engine

    with pytest.raises(SystemExit) as e:
        main(["rules", "--engine", "loihi2", "--json"])
    assert e.value.code == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(describe_engine()))
    with pytest.raises(SystemExit) as e:
        main(["rules", "--engine", "loihi2"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == render_engine(describe_engine()).strip()
    with pytest.raises(SystemExit) as e:
        main(["rules", "--engine", "truenorth"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown learning engine 'truenorth'" in err and len(err.splitlines()) == 1
