"""The rule family beyond its gradients: registry, bad input, direct feedback, Forward-Forward."""

from __future__ import annotations

import pytest
import torch

from edge import rules
from edge.errors import EdgeError
from edge.layers import EAGER, Conv, MaxPool, ReLU
from edge.nets import NetSpec, encode
from edge.nets.block import Block
from edge.nets.presets import mlp
from edge.rules.ff import blur_masks, goodness

ALL = ["clapp", "clapp++", "clapp++dfb", "clapp++both", "ff", "bp-infonce", "bp-clapp++"]
NET = NetSpec("t", (1, 8, 8), (Block((Conv(1, 4, 3, 1, 1), ReLU(), MaxPool(2))),
                               Block((Conv(4, 6, 3, 1, 1), ReLU()))))


def views(seed: int = 0, n: int = 8, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, *shape, generator=g)
    return x1, x1 + 0.1 * torch.randn(x1.shape, generator=g)


def test_registry_lists_every_rule_with_a_description() -> None:
    assert rules.names() == ALL
    for d in rules.describe():
        assert set(d) == {"name", "description", "local", "memory", "default_lr"}
        assert 0 < d["default_lr"] < 1e-2
        assert d["description"] and d["memory"] and "\n" not in d["description"]
        assert d["local"] == (not d["name"].startswith("bp-"))


def test_unknown_rule_and_bad_hparams_are_one_line_errors() -> None:
    with pytest.raises(EdgeError, match="valid: clapp, clapp\\+\\+"):
        rules.get("nope")
    with pytest.raises(EdgeError,
                       match="rule 'clapp' has no hyper-parameter 'pool'; valid: negatives"):
        rules.get("clapp", pool=2)  # the 2021 rule pools globally: no kernel to choose
    with pytest.raises(EdgeError, match="no hyper-parameter 'nosuchkey'; valid: pool, predictor"):
        rules.get("clapp++", nosuchkey=1)


@pytest.mark.parametrize("name", ["clapp++dfb", "clapp++both"])
def test_direct_feedback_needs_two_layers(name: str) -> None:
    net = NetSpec("one", (1, 8, 8), (Block((Conv(1, 4, 3, 1, 1), ReLU())),))
    with pytest.raises(EdgeError) as e:
        rules.get(name).check(net)
    msg = str(e.value)
    assert "at least 2 layers" in msg and "clapp++" in msg and "\n" not in msg
    rules.get("clapp++").check(net)  # the error's suggestion works
    rules.get("clapp").check(net)


@pytest.mark.parametrize("name", ["clapp++", "clapp++dfb", "clapp++both"])
def test_pooling_kernel_larger_than_the_map_is_refused(name: str) -> None:
    with pytest.raises(EdgeError, match=r"does not fit layer 0's 4x4 output; use 1\.\.4"):
        rules.get(name, pool=5).check(NET)


def test_clapp_predictor_is_channels_by_channels() -> None:
    rule = rules.get("clapp")
    params = rule.init(NET, torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        "rule.0.B": (4, 4), "rule.1.B": (6, 6)
    }


def test_direct_feedback_context_is_the_pooled_top_of_both_views() -> None:
    rule = rules.get("clapp++dfb", pool=1, predictor="full")
    gen = torch.Generator().manual_seed(0)
    params = NET.init_params(gen)
    params.update(rule.init(NET, gen))
    x1, x2 = views()
    c = rule.context(NET, EAGER, params, rule.inputs(x1, x2))
    assert torch.equal(c[:8], encode(NET, params, x1)[-1].flatten(1))
    assert torch.equal(c[8:], encode(NET, params, x2)[-1].flatten(1))
    # B^l maps the top code (Dc = 6*4*4) to block l's code (D = 4*4*4 for block 0).
    assert params["rule.0.fb.B"].shape == (64, 96) and params["rule.1.fb.B"].shape == (96, 96)
    leafy = {k: v.requires_grad_(True) for k, v in params.items()}
    assert not rule.context(NET, EAGER, leafy, rule.inputs(x1, x2)).requires_grad


def test_ff_negatives_are_hybrids_of_two_images() -> None:
    rule = rules.get("ff")
    x1, x2 = views(n=5, shape=(1, 28, 28))
    xn = rule.negatives(x1, x2)
    partner = torch.roll(x2, 1, 0)
    from_x1, from_partner = xn == x1, xn == partner
    assert bool((from_x1 | from_partner).all())
    share = from_x1.float().mean((1, 2, 3))
    assert bool(((share > 0.1) & (share < 0.9)).all())  # both images show
    assert torch.equal(xn, rule.negatives(x1, x2))  # a pure function of the batch
    assert not torch.equal(rule.mask_bank(28, 28)[0], rule.mask_bank(28, 28)[1])


def test_ff_masks_are_smooth_blobs() -> None:
    m = blur_masks(32, 28, 28, 5, torch.Generator().manual_seed(0))
    assert set(m.unique().tolist()) == {0.0, 1.0}
    flips = (m[..., 1:] != m[..., :-1]).float().mean()
    assert float(flips) < 0.15  # random bits would flip half the time


def test_ff_hands_on_length_normalised_activity() -> None:
    rule = rules.get("ff")
    y = torch.rand(4, 3, 5, 5) * torch.tensor([0.5, 1.0, 5.0, 20.0]).view(4, 1, 1, 1)
    z = rule.next_input(0, y)
    assert torch.allclose(goodness(z), torch.ones(4), atol=1e-4)  # goodness is gone
    assert torch.allclose(rule.next_input(0, 7.0 * y), z, atol=1e-5)  # direction stays
    assert torch.allclose(z / z.flatten(1).norm(dim=1).view(4, 1, 1, 1),
                          y / y.flatten(1).norm(dim=1).view(4, 1, 1, 1), atol=1e-5)


def test_ff_runs_the_negatives_as_a_third_stream() -> None:
    rule = rules.get("ff")
    x1, x2 = views()
    x = rule.inputs(x1, x2)
    assert x.shape[0] == 3 * 8 and torch.equal(x[16:], rule.negatives(x1, x2))


def test_ff_on_a_linear_net() -> None:
    net = mlp([16, 8], (1, 8, 8))
    rule = rules.get("ff", threshold=0.5)
    params = net.init_params(torch.Generator().manual_seed(0))
    x1, x2 = views()
    y, saved = net.blocks[0].forward(EAGER, 0, params, rule.inputs(x1, x2))
    loss, gy, _, _ = rule.output_grads(0, EAGER, y, params, None)
    grads = net.blocks[0].adjoint(EAGER, 0, params, saved, gy)
    assert grads["enc.0.1.w"].shape == (16, 64) and torch.isfinite(loss)


def test_ff_bad_hparams() -> None:
    with pytest.raises(EdgeError, match="at least 1 mask"):
        rules.get("ff", masks=0)
    with pytest.raises(EdgeError, match="ff loss must be one of symba, threshold"):
        rules.get("ff", loss="hinge")
    with pytest.raises(EdgeError, match="alpha must be > 0"):
        rules.get("ff", alpha=0)


def test_ff_symba_contrasts_each_view_with_its_negative() -> None:
    """SymBa: the loss is softplus(alpha (g_neg - g_pos)) per pair; it falls as the pair's
    goodness gap grows, and the negative's gradient is minus the views' together."""
    rule = rules.get("ff", alpha=2.0)
    g = [torch.tensor([1.0, 2.0]), torch.tensor([1.5, 0.5]), torch.tensor([1.0, 1.0])]
    loss, (d1, d2, dn) = rule._loss_and_dg(g)
    sp = torch.nn.functional.softplus
    want = 0.5 * (sp(2.0 * (g[2] - g[0])).mean() + sp(2.0 * (g[2] - g[1])).mean())
    assert float(loss) == pytest.approx(float(want))
    assert torch.allclose(dn, -(d1 + d2)) and (d1 < 0).all() and (d2 < 0).all()
    wider = rule._loss_and_dg([g[0] + 1, g[1] + 1, g[2]])[0]
    assert float(wider) < float(loss)


def test_pool_list_from_the_command_line_and_bad_kernels() -> None:
    """`--hp pool=4,4,2` is the per-layer list; a non-integer kernel is a one-line error,
    not a TypeError from the comparison."""
    from edge.app.commands import parse_hparams

    assert parse_hparams(["pool=4,4,2", "rank=16", "predictor=full"]) == {
        "pool": [4, 4, 2], "rank": 16, "predictor": "full"}
    net = NetSpec("two", (1, 8, 8), (Block((Conv(1, 4, 3, 1, 1), ReLU())),
                                     Block((Conv(4, 4, 3, 1, 1), ReLU()))))
    rules.get("clapp++", pool=[4, 2]).check(net)
    for bad in (["a", "b"], "x", [2.5, 2]):
        with pytest.raises(EdgeError, match="must be an integer"):
            rules.get("clapp++", pool=bad).check(net)
