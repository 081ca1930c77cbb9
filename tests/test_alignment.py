"""Gradient alignment between a rule's update and the global BP-SSL gradient; run plots."""

from __future__ import annotations

import json

import pytest
import torch

from edge import rules
from edge.alignment import alignment, backprop_grads, cosine, rule_update
from edge.app.plot import plot_run
from edge.errors import EdgeError
from edge.layers import Conv, MaxPool, ReLU
from edge.nets import NetSpec
from edge.nets.block import Block

NET = NetSpec("t", (1, 8, 8), (Block((Conv(1, 4, 3, 1, 1), ReLU(), MaxPool(2))),
                               Block((Conv(4, 6, 3, 1, 1), ReLU())),
                               Block((Conv(6, 8, 3, 1, 1), ReLU()))))
LOCAL = ["clapp", "clapp++", "clapp++dfb", "clapp++both", "ff"]


def setup(name: str, seed: int = 0):
    rule = rules.get(name)
    rule.check(NET)
    gen = torch.Generator().manual_seed(seed)
    params = NET.init_params(gen)
    params.update(rule.init(NET, gen))
    x1 = torch.randn(16, 1, 8, 8, generator=gen)
    return rule, params, x1, x1 + 0.2 * torch.randn(x1.shape, generator=gen)


@pytest.mark.parametrize("name", LOCAL)
def test_one_cosine_per_layer_in_range_and_deterministic(name: str) -> None:
    rule, params, x1, x2 = setup(name)
    a = alignment(NET, rule, params, x1, x2)
    assert len(a) == len(NET.blocks)
    assert all(-1.0 <= v <= 1.0 for v in a)
    assert any(v != 0.0 for v in a)
    assert alignment(NET, rule, params, x1, x2) == a  # the bp-infonce head comes from a seed


def test_a_global_rule_is_aligned_with_itself() -> None:
    rule, params, x1, x2 = setup("bp-clapp++")
    a = alignment(NET, rule, params, x1, x2, reference=rules.get("bp-clapp++"))
    assert a == pytest.approx([1.0] * len(NET.blocks), abs=1e-6)


def test_clapp_pp_top_layer_is_exactly_bp_clapp_pp() -> None:
    """On the top layer the local CLAPP++ loss is bp-clapp++'s loss, with the same B."""
    rule, params, x1, x2 = setup("clapp++")
    a = alignment(NET, rule, params, x1, x2, reference=rules.get("bp-clapp++"))
    assert a[-1] == pytest.approx(1.0, abs=1e-6)
    assert all(v < 0.999 for v in a[:-1])  # below the top, local is not backprop


def test_local_update_is_what_the_step_would_apply() -> None:
    """For a 1-layer net the local update is just the layer's closed-form gradient, which is
    autograd of the same loss through bp-clapp++ (the top = the only layer)."""
    net = NetSpec("one", (1, 8, 8), (Block((Conv(1, 4, 3, 1, 1), ReLU(), MaxPool(2))),))
    rule = rules.get("clapp++")
    gen = torch.Generator().manual_seed(0)
    params = {**net.init_params(gen), **rule.init(net, gen)}
    x1 = torch.randn(8, 1, 8, 8, generator=gen)
    x2 = x1 + 0.1 * torch.randn(x1.shape, generator=gen)
    mine = rule_update(net, rule, params, x1, x2)["enc.0.0.w"]
    bp = rules.get("bp-clapp++")
    bp.check(net)
    ref = backprop_grads(net, bp, params, x1, x2)["enc.0.0.w"]
    assert torch.allclose(mine, ref, rtol=1e-4, atol=1e-7) and float(ref.norm()) > 0


def test_cosine_edges() -> None:
    a = torch.tensor([1.0, 2.0])
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, -a) == pytest.approx(-1.0)
    assert cosine(a, torch.zeros(2)) == 0.0


def test_plot_run_writes_pngs(tmp_path) -> None:
    result = {"rule": "clapp", "data": "digits",
              "history": [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}],
              "alignment": [[0.1, 0.2], [0.3, 0.4]]}
    (tmp_path / "result.json").write_text(json.dumps(result))
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "alignment.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    result["alignment"] = [0.5, -0.2]  # final values only: bars
    (tmp_path / "result.json").write_text(json.dumps(result))
    assert len(plot_run(tmp_path)) == 2
    del result["alignment"]
    result["history"][1]["alignment"] = [0.3, 0.4]  # per epoch, inside the history
    (tmp_path / "result.json").write_text(json.dumps(result))
    assert [p.name for p in plot_run(tmp_path)] == ["loss.png", "alignment.png"]


def test_plot_run_errors(tmp_path) -> None:
    with pytest.raises(EdgeError, match="no result.json"):
        plot_run(tmp_path)
    (tmp_path / "result.json").write_text("{")
    with pytest.raises(EdgeError, match="not valid JSON"):
        plot_run(tmp_path)
