"""`edge simulate --rule`: the exported local step beside backprop's traced joint graph."""

import json

import pytest

from edge.cli import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_rule_reports_local_and_backprop(capsys):
    code, out, err = run(capsys, "simulate", "--target", "stm32f746", "--rule", "clapp++",
                         "--data", "digits", "--width", "0.25", "--batch", "4", "--json")
    assert code in (0, None), err
    r = json.loads(out)
    for key in ("fits", "peak_bytes", "arena_bytes", "lower_bound_bytes", "no_reuse_bytes",
                "peak_op", "per_category", "tiers", "backprop_peak_bytes"):
        assert key in r
    assert r["lower_bound_bytes"] <= r["arena_bytes"] <= 1.05 * r["lower_bound_bytes"]
    assert r["backprop_peak_bytes"] > 0
    assert r["local_vs_backprop_peak"] == pytest.approx(r["peak_bytes"] / r["backprop_peak_bytes"])


def test_exactly_one_source(capsys):
    code, _, err = run(capsys, "simulate", "--target", "host")
    assert code == 2 and "exactly one of" in err
