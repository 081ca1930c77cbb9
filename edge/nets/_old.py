"""Networks as plain specs plus pure functions over a flat parameter dict.

A network is a `NetSpec`: a tuple of `LayerSpec`s (3x3 conv with padding 1 or a linear
layer, then ReLU, then an optional 2x2 max-pool). There is no `nn.Module`: parameters live in
a flat `dict[str, Tensor]` keyed `"enc.{i}.w"` / `"enc.{i}.b"`, so the same functions serve
the torch loop, the ONNX exporter and the integer mode.

Presets: `vgg6` is the paper's VGG-like encoder (128-256-256-512-1024-1024, pools after layers
2, 4, 5 and 6; no BatchNorm) with a width multiplier; `digits` and `mnist` are small conv
stacks for 8x8 and 28x28 inputs; `mlp` is a plain stack of linear layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from edge.errors import EdgeError

KINDS = ("conv", "linear")


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # "conv" (3x3, padding 1) or "linear"
    in_features: int  # input channels (conv) or input features (linear)
    out_features: int
    pool: bool = False  # 2x2 max-pool after the ReLU (conv only)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise EdgeError(f"unknown layer kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.in_features <= 0 or self.out_features <= 0:
            raise EdgeError(
                f"layer sizes must be positive, got {self.in_features}->{self.out_features}"
            )
        if self.pool and self.kind != "conv":
            raise EdgeError("only conv layers can pool")


@dataclass(frozen=True)
class NetSpec:
    name: str
    in_shape: tuple[int, ...]  # (C, H, W)
    layers: tuple[LayerSpec, ...]

    def __post_init__(self) -> None:
        if not self.layers:
            raise EdgeError("a network needs at least one layer")
        shape = self.in_shape
        for i, layer in enumerate(self.layers):
            want = shape[0] if layer.kind == "conv" else math.prod(shape)
            if layer.kind == "conv" and len(shape) != 3:
                raise EdgeError(f"layer {i}: a conv layer cannot follow a linear layer")
            if layer.in_features != want:
                raise EdgeError(f"layer {i}: expects {layer.in_features} inputs, gets {want}")
            shape = _out_shape(layer, shape, i)

    def shapes(self) -> list[tuple[int, ...]]:
        """Output shape (without batch) of every layer."""
        out, shape = [], self.in_shape
        for i, layer in enumerate(self.layers):
            shape = _out_shape(layer, shape, i)
            out.append(shape)
        return out

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "in_shape": list(self.in_shape),
            "layers": [
                {"kind": s.kind, "in": s.in_features, "out": s.out_features, "pool": s.pool}
                for s in self.layers
            ],
        }

    @staticmethod
    def from_dict(d: dict) -> NetSpec:
        layers = tuple(LayerSpec(x["kind"], x["in"], x["out"], x["pool"]) for x in d["layers"])
        return NetSpec(d["name"], tuple(d["in_shape"]), layers)


def _out_shape(layer: LayerSpec, shape: tuple[int, ...], i: int) -> tuple[int, ...]:
    if layer.kind == "linear":
        return (layer.out_features,)
    _, h, w = shape
    if layer.pool:
        if h < 2 or w < 2:
            raise EdgeError(f"layer {i}: cannot 2x2-pool a {h}x{w} feature map")
        h, w = h // 2, w // 2
    return (layer.out_features, h, w)


def vgg(
    channels: list[int], pools: list[int], in_shape: tuple[int, ...], name: str = "vgg"
) -> NetSpec:
    """Conv stack: `channels[i]` outputs at layer i, a 2x2 max-pool after the 1-based `pools`."""
    layers, c = [], in_shape[0]
    for i, out in enumerate(channels):
        layers.append(LayerSpec("conv", c, out, pool=(i + 1) in pools))
        c = out
    return NetSpec(name, tuple(in_shape), tuple(layers))


def mlp(hidden: list[int], in_shape: tuple[int, ...], name: str = "mlp") -> NetSpec:
    layers, f = [], math.prod(in_shape)
    for out in hidden:
        layers.append(LayerSpec("linear", f, out))
        f = out
    return NetSpec(name, tuple(in_shape), tuple(layers))


PRESETS = ("vgg6", "digits", "mnist", "mlp")


def preset(name: str, in_shape: tuple[int, ...], width: float = 1.0) -> NetSpec:
    """A named network for inputs of `in_shape`, channels scaled by `width`."""
    if width <= 0:
        raise EdgeError(f"width must be positive, got {width}")

    def sc(cs: list[int]) -> list[int]:
        return [max(1, round(c * width)) for c in cs]

    if name == "vgg6":
        return vgg(sc([128, 256, 256, 512, 1024, 1024]), [2, 4, 5, 6], in_shape, "vgg6")
    if name == "digits":
        return vgg(sc([32, 64, 128]), [2, 3], in_shape, "digits")
    if name == "mnist":
        return vgg(sc([32, 64, 128]), [1, 2, 3], in_shape, "mnist")
    if name == "mlp":
        return mlp(sc([256, 256]), in_shape, "mlp")
    raise EdgeError(f"unknown network {name!r}; valid: {', '.join(PRESETS)}")


def default_preset(data: str) -> str:
    return {"digits": "digits", "mnist": "mnist"}.get(data, "vgg6")


def init_params(net: NetSpec, gen: torch.Generator) -> dict[str, Tensor]:
    """He-normal weights (fan-in, ReLU gain), zero biases; drawn from `gen` only."""
    params: dict[str, Tensor] = {}
    for i, layer in enumerate(net.layers):
        if layer.kind == "conv":
            shape = (layer.out_features, layer.in_features, 3, 3)
        else:
            shape = (layer.out_features, layer.in_features)
        fan_in = math.prod(shape[1:])
        w = torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)
        params[f"enc.{i}.w"] = w
        params[f"enc.{i}.b"] = torch.zeros(layer.out_features)
    return params


def layer_params(params: dict[str, Tensor], i: int) -> tuple[Tensor, Tensor]:
    return params[f"enc.{i}.w"], params[f"enc.{i}.b"]


@dataclass
class LayerOut:
    """What one layer's forward pass leaves for its own local update.

    No pre-activation is kept: the ReLU's derivative is read off the output (y > 0), which
    is exact at the max-pool's argmax too (the max of a window is positive iff the chosen
    unit's pre-activation is), so the full-resolution pre-activation dies in the forward.
    Where the argmax is kept differs by path: traced for ONNX, the max-pool's int64 indices
    (the graph's standard MaxPool output); eager, a uint8 offset within each 2x2 window.
    """

    x: Tensor  # the layer's input (flattened for linear layers)
    y: Tensor  # output: ReLU, then max-pool if the layer pools
    pool_idx: Tensor | None  # traced for ONNX: int64 argmax indices per channel plane
    pool_off: Tensor | None = None  # eager: uint8 argmax offset in its 2x2 window (0..3)


def layer_forward(layer: LayerSpec, w: Tensor, b: Tensor, x: Tensor) -> LayerOut:
    if layer.kind == "linear":
        x = x.flatten(1)
        return LayerOut(x, F.relu(F.linear(x, w, b)), None)
    z = F.relu(F.conv2d(x, w, b, padding=1), inplace=True)  # no second full-size buffer
    if not layer.pool:
        return LayerOut(x, z, None)
    if torch.onnx.is_in_onnx_export():
        y, idx = F.max_pool2d(z, 2, return_indices=True)
        return LayerOut(x, y, idx)
    # Eager, the argmax lives on as its offset within the 2x2 window: one byte per pooled
    # unit instead of int64 indices' eight. The offset is the first window position (row
    # major) equal to the max, the unit torch's max-pool picks on ties too.
    y = F.max_pool2d(z, 2)
    hp, wp = y.shape[2], y.shape[3]
    off = torch.full(y.shape, 3, dtype=torch.uint8, device=y.device)
    for k in (2, 1, 0):  # lowest offset written last: it wins ties
        dy, dx = divmod(k, 2)
        off.masked_fill_(z[:, :, dy : 2 * hp : 2, dx : 2 * wp : 2] == y, k)
    return LayerOut(x, y, None, off)


def layer_backward(layer: LayerSpec, out: LayerOut, gy: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form dL/dW, dL/db of one layer from dL/dy, its input and its own output.

    The ReLU mask (y > 0), then back through the max-pool (each gradient to its argmax),
    then the Hebbian post x pre product: e^T x for linear layers; for 3x3/stride-1/padding-1
    convs the correlation of the input with the error. Eager, that correlation is torch's
    conv weight-gradient kernel (`torch.nn.grad.conv2d_weight`, a plain op, no autograd
    graph: the kernel backprop's baselines run); traced for ONNX, which has no such op, it is
    itself a convolution of the input by the error with the batch as the channel axis (the
    transposed-conv trick: no unfold buffer; `export.passes` turns it into GEMMs). Both are
    the same sums, up to float rounding.
    """
    if layer.kind == "linear":
        g = gy * (out.y > 0).to(gy.dtype)
        return g.t() @ out.x, g.sum(0)
    if torch.onnx.is_in_onnx_export():
        return _conv_backward_traced(out, gy)
    e = gy * (out.y > 0).to(gy.dtype)
    o, c = layer.out_features, layer.in_features
    if out.pool_off is None:
        gw = torch.nn.grad.conv2d_weight(out.x, (o, c, 3, 3), e, padding=1)
        return gw, e.sum((0, 2, 3))
    # Pooled: each window's error goes to its argmax; written offset by offset into the
    # strided views of one full-size map (e where the offset matches, else 0), then one
    # correlation. (Four stride-2 correlations of the pooled-size errors would skip that
    # map, 1/4 of this layer's working set, but run 1.2-1.4x slower in torch on CPU.)
    hp, wp = e.shape[2], e.shape[3]
    h, w = out.x.shape[2], out.x.shape[3]
    # An odd last row/column is outside every window: zero it; the rest is all written.
    full = (e.new_empty if h % 2 == 0 and w % 2 == 0 else e.new_zeros)(e.shape[0], o, h, w)
    for k in range(4):
        dy, dx = divmod(k, 2)
        torch.mul(e, out.pool_off == k, out=full[:, :, dy : 2 * hp : 2, dx : 2 * wp : 2])
    gw = torch.nn.grad.conv2d_weight(out.x, (o, c, 3, 3), full, padding=1)
    return gw, e.sum((0, 2, 3))


def _conv_backward_traced(out: LayerOut, gy: Tensor) -> tuple[Tensor, Tensor]:
    # The error is built directly in (C, N, H, W) layout, the weight-gradient conv's weight
    # layout, so no full-size transposed copy of it is ever made.
    n, c = gy.shape[:2]
    gT = gy.transpose(0, 1) * (out.y.transpose(0, 1) > 0).to(gy.dtype)
    if out.pool_idx is not None:
        h, w = out.x.shape[2], out.x.shape[3]
        idxT = out.pool_idx.transpose(0, 1).reshape(c, n, -1)
        eT = torch.zeros(c, n, h * w, dtype=gy.dtype, device=gy.device)
        eT = eT.scatter_(2, idxT, gT.reshape(c, n, -1)).view(c, n, h, w)
    else:
        eT = gT.contiguous()
    gw = F.conv2d(out.x.transpose(0, 1), eT, padding=1).transpose(0, 1)
    return gw, eT.sum((1, 2, 3))


def encode(net: NetSpec, params: dict[str, Tensor], x: Tensor) -> list[Tensor]:
    """Every layer's output for input `x` (no gradients kept)."""
    outs = []
    with torch.no_grad():
        for i, layer in enumerate(net.layers):
            w, b = layer_params(params, i)
            x = layer_forward(layer, w, b, x).y
            outs.append(x)
    return outs
