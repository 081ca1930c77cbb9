"""Named networks: the paper's VGG encoder, the small nets of the tests and demo, and the
networks microcontrollers and NPUs run (MLPerf Tiny's reference models, MobileNetV2 as MIT's
on-device training uses it). Each is just a `NetSpec`; `width` scales every channel count
(max(1, round(c * width))) on top of the preset's own nominal widths.

    vgg6              the paper's VGG-like encoder: 128-256-256-512-1024-1024 3x3 convs,
                      2x2 max-pools after blocks 2, 4, 5 and 6, no BatchNorm
    digits, mnist     3-block conv stacks for 8x8 and 28x28 inputs; mlp: two linear blocks
    resnet8           MLPerf Tiny image classification (CIFAR-10): conv16 stem, three ResNet
                      basic blocks 16/32/64 (strides 1, 2, 2; 1x1-conv shortcut where the
                      shape changes), BatchNorm after every conv but the shortcuts
    dscnn             MLPerf Tiny keyword spotting (49x10 MFCC; any 2-D map): conv64
                      (10x4, stride 2), four depthwise-separable blocks of 64 channels
    mobilenetv1-0.25  MLPerf Tiny visual wake words: MobileNetV1 at alpha 0.25 (3x3 conv
                      stride 2, then 13 depthwise-separable blocks)
    mobilenetv2-0.35  MobileNetV2 at width 0.35 (inverted residuals, ReLU6, linear
                      bottlenecks, channels rounded to multiples of 8)
The classifiers (global pool + dense) of the reference models are not part of the encoders:
the probe and the on-device head read the encoder's feature maps. TensorFlow's 'same'
padding is asymmetric for even kernels and strided convs; here padding is symmetric with the
same output sizes (one extra zero row or column on the leading edge where TF puts it last).
"""

from __future__ import annotations

import math

from edge.errors import EdgeError
from edge.layers import BatchNorm, Conv, Flatten, Linear, MaxPool, ReLU, ReLU6
from edge.nets.block import Block
from edge.nets.spec import NetSpec

Shape = tuple[int, ...]
PRESETS = ("vgg6", "digits", "mnist", "mlp", "resnet8", "dscnn", "mobilenetv1-0.25",
           "mobilenetv2-0.35")


def vgg(channels: list[int], pools: list[int], in_shape: Shape, name: str = "vgg") -> NetSpec:
    """3x3/padding-1 conv + ReLU blocks, `channels[i]` outputs at block i, a 2x2 max-pool
    after the 1-based `pools`."""
    blocks, c = [], in_shape[0]
    for i, out in enumerate(channels):
        body = [Conv(c, out, 3, 1, 1), ReLU()]
        if i + 1 in pools:
            body.append(MaxPool(2))
        blocks.append(Block(tuple(body)))
        c = out
    return NetSpec(name, tuple(in_shape), tuple(blocks))


def mlp(hidden: list[int], in_shape: Shape, name: str = "mlp") -> NetSpec:
    blocks, f = [], math.prod(in_shape)
    for i, out in enumerate(hidden):
        body = ([Flatten()] if i == 0 and len(in_shape) > 1 else []) + [Linear(f, out), ReLU()]
        blocks.append(Block(tuple(body)))
        f = out
    return NetSpec(name, tuple(in_shape), tuple(blocks))


def conv_bn(cin: int, cout: int, k, s=1, p=0, groups: int = 1, act=ReLU) -> list:
    out = [Conv(cin, cout, k, s, p, groups), BatchNorm(cout)]
    return out + ([act()] if act is not None else [])


def resnet8(in_shape: Shape, width: float = 1.0) -> NetSpec:
    sc = _scaler(width)
    c0 = sc(16)
    blocks = [Block(tuple(conv_bn(in_shape[0], c0, 3, 1, 1)))]
    c = c0
    for out, stride in ((sc(16), 1), (sc(32), 2), (sc(64), 2)):
        body = conv_bn(c, out, 3, stride, 1) + conv_bn(out, out, 3, 1, 1, act=None)
        shortcut = () if (stride, c) == (1, out) else (Conv(c, out, 1, stride, 0),)
        blocks.append(Block(tuple(body), shortcut, (ReLU(),)))
        c = out
    return NetSpec("resnet8", tuple(in_shape), tuple(blocks))


def ds_pair(c: int, out: int, stride: int, act=ReLU) -> list:
    """Depthwise 3x3 (stride) + BN + act, then pointwise 1x1 + BN + act."""
    return conv_bn(c, c, 3, stride, 1, groups=c, act=act) + conv_bn(c, out, 1, act=act)


def dscnn(in_shape: Shape, width: float = 1.0) -> NetSpec:
    sc = _scaler(width)
    c = sc(64)
    blocks = [Block(tuple(conv_bn(in_shape[0], c, (10, 4), 2, (5, 1))))]
    blocks += [Block(tuple(ds_pair(c, c, 1))) for _ in range(4)]
    return NetSpec("dscnn", tuple(in_shape), tuple(blocks))


MOBILENETV1 = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
               (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


def mobilenetv1(in_shape: Shape, alpha: float = 0.25, width: float = 1.0) -> NetSpec:
    sc = _scaler(width)
    c = sc(int(32 * alpha))
    blocks = [Block(tuple(conv_bn(in_shape[0], c, 3, 2, 1)))]
    for filters, stride in MOBILENETV1:
        out = sc(int(filters * alpha))
        blocks.append(Block(tuple(ds_pair(c, out, stride))))
        c = out
    return NetSpec(f"mobilenetv1-{alpha:g}", tuple(in_shape), tuple(blocks))


MOBILENETV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))  # (expansion t, channels c, repeats n, stride s)


def make_divisible(v: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: nearest multiple of `divisor`, never 10 % below v."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def mobilenetv2(in_shape: Shape, alpha: float = 0.35, width: float = 1.0) -> NetSpec:
    sc = _scaler(width)
    c = sc(make_divisible(32 * alpha))
    blocks = [Block(tuple(conv_bn(in_shape[0], c, 3, 2, 1, act=ReLU6)))]
    for t, ch, n, s in MOBILENETV2:
        out = sc(make_divisible(ch * alpha))
        for r in range(n):
            stride, hidden = (s if r == 0 else 1), c * t
            body = conv_bn(c, hidden, 1, act=ReLU6) if t != 1 else []
            body += conv_bn(hidden, hidden, 3, stride, 1, groups=hidden, act=ReLU6)
            body += conv_bn(hidden, out, 1, act=None)
            shortcut = () if (stride, c) == (1, out) else None
            blocks.append(Block(tuple(body), shortcut))
            c = out
    last = sc(1280)  # not scaled down for alpha < 1 (the reference keeps 1280)
    blocks.append(Block(tuple(conv_bn(c, last, 1, act=ReLU6))))
    return NetSpec(f"mobilenetv2-{alpha:g}", tuple(in_shape), tuple(blocks))


def _scaler(width: float):
    return lambda c: max(1, round(c * width))


def preset(name: str, in_shape: Shape, width: float = 1.0) -> NetSpec:
    """A named network for inputs of `in_shape`, channels scaled by `width`."""
    if not width > 0:
        raise EdgeError(f"width must be positive, got {width}")
    sc = _scaler(width)
    if name == "vgg6":
        return vgg([sc(c) for c in (128, 256, 256, 512, 1024, 1024)], [2, 4, 5, 6], in_shape,
                   "vgg6")
    if name == "digits":
        return vgg([sc(c) for c in (32, 64, 128)], [2, 3], in_shape, "digits")
    if name == "mnist":
        return vgg([sc(c) for c in (32, 64, 128)], [1, 2, 3], in_shape, "mnist")
    if name == "mlp":
        return mlp([sc(256), sc(256)], in_shape, "mlp")
    if name in ("resnet8", "dscnn", "mobilenetv1-0.25", "mobilenetv2-0.35") and len(in_shape) != 3:
        raise EdgeError(f"{name} needs image-like (C, H, W) inputs, got {in_shape}")
    if name == "resnet8":
        return resnet8(in_shape, width)
    if name == "dscnn":
        return dscnn(in_shape, width)
    if name == "mobilenetv1-0.25":
        return mobilenetv1(in_shape, 0.25, width)
    if name == "mobilenetv2-0.35":
        return mobilenetv2(in_shape, 0.35, width)
    raise EdgeError(f"unknown network {name!r}; valid: {', '.join(PRESETS)}, or a .toml spec")


def default_preset(data: str) -> str:
    return {"digits": "digits", "mnist": "mnist"}.get(data, "vgg6")
