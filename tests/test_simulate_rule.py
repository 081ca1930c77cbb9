"""`edge simulate --rule`: the exported local step beside backprop's traced joint graph."""

import json

import pytest

from edge.app.cli import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_rule_reports_local_and_backprop(capsys):
    code, out, err = run(capsys, "simulate", "--target", "stm32f746", "--rule", "clapp++",
                         "--data", "digits", "--width", "0.25", "--batch", "4", "--per-layer",
                         "--json")
    assert code in (0, None), err
    r = json.loads(out)
    for key in ("fits", "peak_bytes", "arena_bytes", "lower_bound_bytes", "no_reuse_bytes",
                "peak_op", "per_category", "tiers", "backprop_peak_bytes"):
        assert key in r
    assert r["lower_bound_bytes"] <= r["arena_bytes"] <= 1.10 * r["lower_bound_bytes"]
    assert r["backprop_peak_bytes"] > 0
    assert r["local_vs_backprop_peak"] == pytest.approx(r["peak_bytes"] / r["backprop_peak_bytes"])
    # what-if: the same step as per-layer graphs run one after another (3 conv layers)
    pl = r["per_layer"]
    assert pl["graphs"] == 3 and pl["lower_bound_bytes"] <= pl["arena_bytes"]
    # the same parameters and optimizer state, one arena reused by the layers' graphs
    assert pl["persistent_onchip_bytes"] == r["persistent_onchip_bytes"]
    assert pl["peak_bytes"] == pl["arena_bytes"] + pl["persistent_onchip_bytes"]
    assert r["per_layer_vs_whole_peak"] == pytest.approx(pl["peak_bytes"] / r["peak_bytes"])


def test_bundle_with_layers_reports_both(capsys, tmp_path):
    code, _, err = run(capsys, "export", "--rule", "clapp++", "--data", "digits", "--width",
                       "0.25", "--batch-size", "4", "--per-layer", "-o", str(tmp_path / "b"))
    assert code in (0, None), err
    code, out, err = run(capsys, "simulate", "--target", "rp2040", "--bundle",
                         str(tmp_path / "b"), "--json")
    assert code in (0, None), err
    r = json.loads(out)
    assert r["per_layer"]["graphs"] == 3
    assert r["per_layer"]["persistent_onchip_bytes"] == r["persistent_onchip_bytes"]
    code, out, _ = run(capsys, "simulate", "--target", "rp2040", "--bundle", str(tmp_path / "b"))
    assert "per-layer graphs (3, one after another)" in out


def test_exactly_one_source(capsys):
    code, _, err = run(capsys, "simulate", "--target", "host")
    assert code == 2 and "exactly one of" in err


def test_integer_step_beside_fp32_and_backprop(capsys):
    code, out, err = run(capsys, "simulate", "--target", "stm32f746", "--rule", "clapp++",
                         "--data", "digits", "--width", "0.25", "--batch", "4", "--quant",
                         "int8-w16", "--mode", "integer", "--json")
    assert code in (0, None), err
    r = json.loads(out)
    assert r["quant"] == "int8-w16" and r["fp32_step"]["total_bytes"] > r["total_bytes"] > 0
    assert r["integer_vs_fp32_total"] == pytest.approx(
        r["total_bytes"] / r["fp32_step"]["total_bytes"])
    assert r["backprop_peak_bytes"] > 0


def test_max_batch_for_a_rule_and_a_fixed_batch_bundle(capsys, tmp_path):
    code, out, err = run(capsys, "simulate", "--target", "stm32h743", "--rule", "clapp++",
                         "--data", "digits", "--width", "0.25", "--max-batch", "--json")
    assert code in (0, None), err
    best = json.loads(out)["max_batch"]
    assert best is not None and best >= 2
    fits = {}
    for b in (best, best + 1):
        code, out, _ = run(capsys, "simulate", "--target", "stm32h743", "--rule", "clapp++",
                           "--data", "digits", "--width", "0.25", "--batch", str(b), "--json")
        fits[b] = json.loads(out)["fits"]
    assert fits == {best: True, best + 1: False}
    run(capsys, "export", "--rule", "clapp++", "--data", "digits", "--width", "0.25",
        "--batch-size", "4", "-o", str(tmp_path / "b"))
    code, _, err = run(capsys, "simulate", "--target", "rp2040", "--bundle", str(tmp_path / "b"),
                       "--max-batch")
    assert code == 2 and "fixed batch size" in err and err.count("\n") == 1


def test_max_batch_none_says_why(capsys):
    """When not even the smallest batch fits, the JSON says so (not a bare null)."""
    code, out, err = run(capsys, "simulate", "--target", "stm32f746", "--rule", "clapp++",
                         "--data", "digits", "--max-batch", "--json")
    assert code in (0, None), err
    r = json.loads(out)
    assert r["max_batch"] is None and not r["fits"]
    assert "smallest batch does not fit" in r["max_batch_note"]


def test_negatives_option_is_the_train_option(capsys):
    """`--negatives memory:K` (edge train's spelling) simulates the same step as --hp
    negatives=K, not the in-batch step."""
    peaks = []
    for flags in (["--negatives", "memory:4"], ["--hp", "negatives=4"]):
        code, out, err = run(capsys, "simulate", "--target", "nrf52840", "--rule", "clapp++",
                             "--data", "digits", "--width", "0.25", "--batch", "1", *flags,
                             "--json")
        assert code in (0, None), err
        peaks.append(json.loads(out)["peak_bytes"])
    assert peaks[0] == peaks[1] > 0
    code, out, err = run(capsys, "simulate", "--target", "nrf52840", "--rule", "clapp++",
                         "--data", "digits", "--width", "0.25", "--batch", "2", "--json")
    assert code in (0, None), err
    assert json.loads(out)["peak_bytes"] != peaks[0]
