"""CLAPP++'s own choices: the compact predictor and its hyper-parameters (its closed form is
checked against autograd in test_rules_grads.py)."""

import pytest
import torch

from edge.errors import EdgeError
from edge.nets.presets import vgg
from edge.rules import get


def test_auto_predictor_is_compact_for_large_layers():
    gen = torch.Generator().manual_seed(0)
    small = vgg([8], [], (3, 4, 4))  # pooled to 2x2: D = 32, full B (1k) < rank 64 (4k)
    assert set(get("clapp++", rank=64).init(small, gen)) == {"rule.0.B"}
    big = vgg([256], [], (3, 16, 16))  # pool 2: D = 256*8*8 = 16384, full B would be 268M
    assert set(get("clapp++", rank=64, pool=2).init(big, gen)) == {"rule.0.U", "rule.0.V"}


def test_pooling_kernel_per_block():
    rule = get("clapp++", predictor="full", pool=[4, 2])
    rule.check(vgg([4, 6], [], (2, 8, 8)))
    assert [c.dim for c in rule.codes] == [4 * 2 * 2, 6 * 4 * 4]
    with pytest.raises(EdgeError, match="lists 2 kernels for 3 layers"):
        rule.check(vgg([4, 6, 8], [], (2, 8, 8)))


@pytest.mark.parametrize("kw", [{"pool": 9}, {"pool": 0}, {"predictor": "dense"}, {"rank": 0}])
def test_bad_hyperparameters(kw):
    net = vgg([4], [], (1, 8, 8))
    with pytest.raises(EdgeError):
        get("clapp++", **kw).check(net)
