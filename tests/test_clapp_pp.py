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


def test_default_grid_is_the_reference_grid_on_cifar_vgg6_and_capped_at_8x8():
    from edge.nets.presets import preset

    rule = get("clapp++")
    rule.check(preset("vgg6", (3, 32, 32), 0.125))  # maps of side 32, 16, 16, 8, 4, 2
    assert [c.shape[1] for c in rule.codes] == [8, 4, 4, 4, 2, 2]  # kernels 4, 4, 4, 2, 2, 1
    rule.check(preset("vgg6", (3, 96, 96), 0.125))  # STL-10: 96, 48, 48, 24, 12, 6
    assert [c.shape[1] for c in rule.codes] == [8, 8, 8, 6, 6, 3]  # kernels 12, 6, 6, 4, 2, 2
    rule.check(preset("mnist", (1, 28, 28)))  # 14, 7, 3
    assert [c.shape[1] for c in rule.codes] == [7, 3, 3]


@pytest.mark.parametrize("kw", [{"pool": 9}, {"pool": 0}, {"predictor": "dense"}, {"rank": 0}])
def test_bad_hyperparameters(kw):
    net = vgg([4], [], (1, 8, 8))
    with pytest.raises(EdgeError):
        get("clapp++", **kw).check(net)
