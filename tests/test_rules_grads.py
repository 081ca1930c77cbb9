"""Every local rule's closed-form update against autograd of its own block loss.

For each block of small nets (conv with and without max-pool, a linear head, a residual
block, a depthwise-separable pair, an inverted residual), the block input is what the
block-by-block step hands it (detached) and the context what the step passes; then autograd
of `layer_loss` through the block's forward with respect to the block's parameters and the
rule's own must match `output_grads` + the block's closed-form adjoint to 1e-8 relative, and
be non-zero so the check can fail.
"""

from __future__ import annotations

import pytest
import torch

from edge import rules
from edge.layers import EAGER, AvgPool, Conv, Flatten, Linear, MaxPool, ReLU, ReLU6
from edge.nets import NetSpec
from edge.nets.block import Block

LOCAL = ["clapp", "clapp++", "clapp++dfb", "clapp++both", "ff"]
NETS = {
    "conv-pool": NetSpec("t", (2, 8, 8), (Block((Conv(2, 4, 3, 1, 1), ReLU(), MaxPool(2))),
                                          Block((Conv(4, 6, 3, 1, 1), ReLU(), MaxPool(2))))),
    "conv-linear": NetSpec("t", (2, 8, 8), (
        Block((Conv(2, 3, 3, 1, 1), ReLU(), MaxPool(2))),
        Block((Flatten(), Linear(48, 10), ReLU())))),
    "residual": NetSpec("t", (3, 8, 8), (
        Block((Conv(3, 4, 3, 1, 1), ReLU())),
        Block((Conv(4, 6, 3, 2, 1), ReLU(), Conv(6, 6, 3, 1, 1)), (Conv(4, 6, 1, 2, 0),),
              (ReLU(),)))),
    "separable": NetSpec("t", (3, 8, 8), (
        Block((Conv(3, 4, 3, 2, 1), ReLU6())),
        Block((Conv(4, 4, 3, 1, 1, groups=4), ReLU(), Conv(4, 8, 1), ReLU(), AvgPool(2))))),
    "inverted": NetSpec("t", (4, 6, 6), (
        Block((Conv(4, 4, 1), ReLU6())),
        Block((Conv(4, 12, 1), ReLU6(), Conv(12, 12, 3, 1, 1, groups=12), ReLU6(),
               Conv(12, 4, 1)), ()))),
}


def setup(name: str, net: NetSpec, seed: int = 0, **hp):
    rule = rules.get(name, **hp)
    rule.check(net)
    gen = torch.Generator().manual_seed(seed)
    params = net.init_params(gen)
    params.update(rule.init(net, gen))
    params = {k: v.double() for k, v in params.items()}
    x1 = torch.randn(6, *net.in_shape, generator=gen, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(x1.shape, generator=gen, dtype=torch.float64)
    return rule, params, x1, x2


def walk(net: NetSpec, rule, params, x1, x2):
    """Yield (i, x, ctx) as the block-by-block step hands them to block i."""
    x = rule.inputs(x1, x2)
    ctx = rule.context(net, EAGER, params, x)
    for i, block in enumerate(net.blocks):
        yield i, x, ctx
        x = rule.next_input(i, block.forward(EAGER, i, params, x)[0])


def check_block(net, rule, i, x, ctx, params, state=None) -> int:
    """Closed form vs autograd for block i; returns the number of non-zero gradients."""
    block = net.blocks[i]
    y, saved = block.forward(EAGER, i, params, x)
    loss, gy, grads, _ = rule.output_grads(i, EAGER, y, params, ctx, state)
    grads.update(block.adjoint(EAGER, i, params, saved, gy))
    mine = sorted(k for k in params if k.startswith((f"enc.{i}.", f"rule.{i}.")))
    assert sorted(grads) == mine
    leaves = {k: params[k].clone().requires_grad_(True) for k in mine}
    p = {**params, **leaves}
    ref_loss = rule.layer_loss(i, block.forward(EAGER, i, p, x.detach())[0], p, ctx, state)
    ref = torch.autograd.grad(ref_loss, list(leaves.values()))
    assert float(loss) == pytest.approx(float(ref_loss.detach()), rel=1e-12)
    nonzero = 0
    scale = max(float(g.norm()) for g in ref)  # a gradient that cancels to ~0 is compared
    for k, g_ref in zip(leaves, ref, strict=True):  # absolutely, against the block's scale
        err = float((grads[k] - g_ref).norm() / max(float(g_ref.norm()), 1e-6 * scale, 1e-30))
        assert err < 1e-8, f"block {i} {k}: relative error {err:.2e}"
        nonzero += int(g_ref.norm() > 1e-8)
    return nonzero


@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("name", LOCAL)
def test_closed_form_matches_autograd(name: str, net_name: str) -> None:
    net = NETS[net_name]
    rule, params, x1, x2 = setup(name, net)
    for i, x, ctx in walk(net, rule, params, x1, x2):
        assert check_block(net, rule, i, x, ctx, params) >= 2, f"block {i}: gradients vanish"


@pytest.mark.parametrize("net_name", ["conv-pool", "residual"])
def test_ff_threshold_loss_matches_autograd(net_name: str) -> None:
    """Hinton's thresholded loss, the non-default ff objective, is exact too."""
    net = NETS[net_name]
    rule, params, x1, x2 = setup("ff", net, loss="threshold", threshold=1.5)
    for i, x, ctx in walk(net, rule, params, x1, x2):
        assert check_block(net, rule, i, x, ctx, params) >= 2


@pytest.mark.parametrize("predictor", ["full", "lowrank"])
@pytest.mark.parametrize("name", ["clapp++", "clapp++dfb", "clapp++both"])
def test_predictors_full_and_low_rank(name: str, predictor: str) -> None:
    net = NETS["conv-pool"]
    rule, params, x1, x2 = setup(name, net, predictor=predictor, rank=3, pool=1)
    keys = {k.split(".", 2)[2] for k in params if k.startswith("rule.")}
    want = set()
    if name != "clapp++dfb":
        want |= {"B"} if predictor == "full" else {"U", "V"}
    if name != "clapp++":
        want |= {"fb.B"} if predictor == "full" else {"fb.U", "fb.V"}
    assert keys == want
    for i, x, ctx in walk(net, rule, params, x1, x2):
        assert check_block(net, rule, i, x, ctx, params) >= 3


def test_a_wrong_closed_form_is_caught() -> None:
    """The harness fails on a rule whose update is off by a little."""
    net = NETS["conv-pool"]
    rule, params, x1, x2 = setup("clapp", net)
    orig = rule.output_grads

    def off(*args):
        loss, gy, grads, new = orig(*args)
        return loss, gy * 1.001, grads, new

    rule.output_grads = off
    i, x, ctx = next(walk(net, rule, params, x1, x2))
    with pytest.raises(AssertionError, match="relative error"):
        check_block(net, rule, i, x, ctx, params)


@pytest.mark.parametrize("name", ["clapp", "clapp++", "clapp++dfb", "clapp++both"])
def test_negatives_from_memory_match_autograd(name: str) -> None:
    """With a memory of past codes (filled with random codes: zeros would be inert) the
    closed form still equals autograd, at batch 1 and batch 6. The memory is drawn from a
    seeded generator: CLAPP's hinge at batch 1 can be inactive for every pair of an unlucky
    draw (about 6 draws in 100), which would leave nothing to compare."""
    net = NETS["conv-pool"]
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 6):
        rule, params, x1, x2 = setup(name, net, negatives=3)
        x1, x2 = x1[:batch], x2[:batch]
        state = {k: torch.rand(v.shape, dtype=torch.float64, generator=gen)
                 for k, v in rule.init_state(net).items()}
        assert state and all(v.shape[0] == 3 for v in state.values())
        for i, x, ctx in walk(net, rule, params, x1, x2):
            assert check_block(net, rule, i, x, ctx, params, state) >= 2
