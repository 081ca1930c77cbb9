"""Networks: presets against the reference designs' figures, spec files, BatchNorm folding,
torch models in and out, and the block's saved tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edge.errors import EdgeError
from edge.layers import EAGER, BatchNorm, Conv, MaxPool, ReLU
from edge.nets import (
    PRESETS,
    encode,
    fold_batchnorm,
    from_torch,
    load_spec,
    preset,
    resolve,
    to_torch,
)
from edge.nets.block import FUSED, Block
from edge.nets.spec import NetSpec
from edge.nets.torch_io import Residual


def n_params(net: NetSpec, skip_bn: bool = False) -> int:
    return sum(math.prod(s) for k, s in net.param_shapes().items()
               if not (skip_bn and k.rsplit(".", 1)[1] in ("gamma", "beta", "mean", "var")))


def test_resnet8_matches_mlperf_tiny() -> None:
    """MLPerf Tiny IC's ResNet-8: 78,666 parameters with its Dense(10) head and Keras's four
    BatchNorm numbers per channel; the encoder here is that without the head."""
    net = preset("resnet8", (3, 32, 32))
    assert n_params(net) + 64 * 10 + 10 == 78_666
    assert net.shapes()[-1] == (64, 8, 8)
    shortcuts = [b.shortcut for b in net.blocks[1:]]
    assert shortcuts[0] == () and all(len(s) == 1 for s in shortcuts[1:])  # 1x1 convs, no BN


def test_dscnn_and_mobilenets_follow_their_references() -> None:
    ds = preset("dscnn", (1, 49, 10))
    assert ds.shapes()[0] == (64, 25, 5)  # conv 10x4 stride 2, 'same' sizes
    assert len(ds.blocks) == 5 and all(b.body[0].groups == 64 for b in ds.blocks[1:])
    v1 = preset("mobilenetv1-0.25", (3, 96, 96))
    widths = [b.body[-3].cout if len(b.body) > 3 else b.body[0].cout for b in v1.blocks]
    assert widths == [8, 16, 32, 32, 64, 64, 128, 128, 128, 128, 128, 128, 256, 256]
    assert v1.shapes()[-1] == (256, 3, 3)
    v2 = preset("mobilenetv2-0.35", (3, 96, 96))
    outs = [b.body[-2].cout for b in v2.blocks[1:-1]]
    assert outs[0] == 8 and sorted(set(outs)) == [8, 16, 24, 32, 56, 112]
    assert v2.blocks[-1].body[0].cout == 1280  # kept at 1280 below width 1
    residual = [b.residual for b in v2.blocks]
    assert sum(residual) == 10  # stride-1 blocks whose channels match


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_runs_and_scales(name: str) -> None:
    shape = {"mlp": (1, 8, 8), "digits": (1, 8, 8)}.get(name, (3, 32, 32))
    net = preset(name, shape, 0.5)
    params = net.init_params(torch.Generator().manual_seed(0))
    ys = encode(net, params, torch.randn(2, *shape))
    assert [tuple(y.shape[1:]) for y in ys] == net.shapes()
    assert n_params(preset(name, shape, 1.0)) > n_params(net)


def test_fold_batchnorm_is_exact_and_removes_them() -> None:
    net = preset("resnet8", (3, 16, 16), 0.5)
    g = torch.Generator().manual_seed(0)
    params = net.init_params(g)
    for k in params:  # statistics that are not the identity
        if k.endswith((".mean", ".beta")):
            params[k] = torch.randn(params[k].shape, generator=g)
        if k.endswith((".var", ".gamma")):
            params[k] = torch.rand(params[k].shape, generator=g) + 0.5
    folded, fp = fold_batchnorm(net, params)
    assert not any(isinstance(p, BatchNorm) for _, p in folded.primitives())
    x = torch.randn(3, 3, 16, 16)
    for a, b in zip(encode(net, params, x), encode(folded, fp, x), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert set(fp) == set(folded.param_shapes())


SPEC = """
name = "tiny"
[[blocks]]
layers = [ { op = "conv", cout = 8, k = 3, padding = 1 }, { op = "relu" },
           { op = "maxpool", k = 2 } ]
[[blocks]]
layers = [ { op = "conv", cout = 8, k = 3, padding = 1 }, { op = "relu" },
           { op = "conv", cout = 8, k = 3, padding = 1 } ]
shortcut = "identity"
post = [ { op = "relu" } ]
[[blocks]]
layers = [ { op = "avgpool", k = 2 }, { op = "flatten" }, { op = "linear", fout = 10 } ]
"""


def test_a_spec_file_loads_with_channels_read_off_the_shapes(tmp_path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(SPEC)
    net = load_spec(path, (1, 8, 8))
    assert net.name == "tiny" and net.shapes() == [(8, 4, 4), (8, 4, 4), (10,)]
    assert net.blocks[0].body[0] == Conv(1, 8, 3, 1, 1)
    assert net.blocks[2].body[2].fin == 8 * 2 * 2
    assert resolve(str(path), (1, 8, 8)) == net
    assert NetSpec.from_dict(net.to_dict()) == net


@pytest.mark.parametrize("edit,needle", [
    (("op = \"relu\"", "op = \"gelu\""), "block 0, layers 1: unknown op 'gelu'"),
    (("k = 3, padding = 1 }, { op = \"relu\" },\n           { op = \"maxpool\"",
      "k = 3, pad = 1 }, { op = \"relu\" },\n           { op = \"maxpool\""),
     "block 0, layers 0 (conv): unknown field 'pad'"),
    (("shortcut = \"identity\"", "shortcut = \"skip\""), "'shortcut' must be a list"),
    (("{ op = \"maxpool\", k = 2 }", "{ op = \"maxpool\", k = 9 }"),
     "block 0, layers 2 (maxpool): maxpool: a window of 9"),
    (("name = \"tiny\"", "name = \"tiny\"\nin_shape = [3, 8, 8]"), "does not match the data's"),
    (("fout = 10 }", "fout = 10 "), "not valid TOML"),
])
def test_bad_spec_files_name_the_field(tmp_path, edit, needle) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(SPEC.replace(*edit))
    with pytest.raises(EdgeError) as e:
        load_spec(path, (1, 8, 8))
    msg = str(e.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def test_missing_spec_file_and_width_on_a_spec() -> None:
    with pytest.raises(EdgeError, match="network spec not found"):
        resolve("nope/net.toml", (1, 8, 8))
    with pytest.raises(EdgeError, match="unknown network 'vgg7'; valid: vgg6"):
        resolve("vgg7", (3, 32, 32))


def _trained_bn(m: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g))
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m.eval()


def test_from_torch_converts_weights_and_groups_blocks() -> None:
    m = _trained_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Dropout(0.1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)))
    net, params = from_torch(m, (3, 8, 8))
    assert [[p.op for p in b.body] for b in net.blocks] == [
        ["conv", "bn", "relu6"], ["conv", "relu", "avgpool", "flatten"], ["linear"]]
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(encode(net, params, x)[-1], m(x), atol=1e-5)


def test_from_torch_residual_blocks_and_round_trip() -> None:
    net = preset("resnet8", (3, 16, 16), 0.5)
    params = net.init_params(torch.Generator().manual_seed(0))
    module = _trained_bn(to_torch(net, params))
    assert isinstance(module[1], Residual)
    back, bp = from_torch(module, (3, 16, 16))
    assert back.blocks == net.blocks
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(encode(back, bp, x)[-1], module(x), atol=1e-5)


def test_unsupported_modules_are_named() -> None:
    with pytest.raises(EdgeError) as e:
        from_torch(nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU()), (1, 8, 8))
    msg = str(e.value)
    assert "unsupported module GELU" in msg and "Conv2d" in msg and "ReLU6" in msg
    with pytest.raises(EdgeError, match="padding='same'"):
        from_torch(nn.Sequential(nn.Conv2d(1, 2, 3, padding="same")), (1, 8, 8))
    with pytest.raises(EdgeError, match="takes an nn.Sequential"):
        from_torch(nn.Conv2d(1, 2, 3), (1, 8, 8))


def test_an_activation_before_a_max_pool_keeps_no_full_size_map() -> None:
    block = Block((Conv(1, 4, 3, 1, 1), ReLU(), MaxPool(2)))
    params = block.init(0, torch.Generator().manual_seed(0))
    y, saved = block.forward(EAGER, 0, params, torch.randn(2, 1, 8, 8))
    assert saved["body"][1] is FUSED  # the ReLU's output died in the forward
    off, _, pooled = saved["body"][2]
    # the eager argmax: flat plane indices, 2 bytes a pooled value (traced: uint8 offsets)
    assert off.dtype == torch.int16 and off.shape == y.shape and pooled is y


def test_residual_shapes_must_match() -> None:
    with pytest.raises(EdgeError, match="residual add of shapes"):
        NetSpec("bad", (4, 8, 8), (Block((Conv(4, 8, 3, 1, 1),), ()),))
    with pytest.raises(EdgeError, match="put them in the body"):
        Block((Conv(4, 4, 3, 1, 1),), None, (Conv(4, 4, 1),))
