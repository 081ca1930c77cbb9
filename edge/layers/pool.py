"""Pooling: MaxPool and AvgPool (k x k, stride, padding) and GlobalAvgPool.

Windows. Output cell (h, v) reads the k x k window of the padded input at (h s, v s);
window position q = i kw + j (row major) is element xpad[h s + i, v s + j]. `_slices` gives,
for every q, the strided view of the input holding that position of every window, and
`_place` is its adjoint: it puts one pooled-size tensor per q back at those positions,
adding where windows overlap. Both are dtype-agnostic (float and integer forms share them);
`_place` writes into strided views in eager mode and builds the map from stack + transpose
(or zero-interleave + pad where windows overlap) when traced, which exports to plain ONNX.

MaxPool. y = max of each window. The argmax is kept as the window offset q of the first
maximum in row-major order (one uint8 per pooled value; ties go to the first, the choice
torch's own max-pool makes). Adjoint: each window's error goes to its argmax,
    dL/dx = place_q( g * [off == q] ).
Integer form: the same, on integer values (the max is taken with comparisons only).
Eager float kernels: aten's max-pool with indices (one pass; on the channels-last maps the
eager convs produce, several times faster than the per-offset comparisons) keeps the argmax
as its flat index within the H x W plane, narrowed to int16 (int32 past 2^15 positions):
two bytes per pooled value, never the int64 the kernel returns. The adjoint is aten's
max-pool backward (one zero-fill-and-scatter pass) into a channels-last map. Same argmax
(torch's first maximum), same routed values.

AvgPool (count_include_pad). y = (1/k^2) sum of each window. Adjoint: dL/dx = place_q(g) /
k^2. Integer form: y = round_half_even(window sum / k^2) at the input's exponent; adjoint:
place_q(g), the 1/k^2 carried in the error's static factor c (never rounded away).

GlobalAvgPool: (N, C, H, W) -> (N, C), the mean over positions; adjoint g / (H W) at every
position; integer form as AvgPool with the whole map as the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from edge.errors import EdgeError
from edge.layers import intops
from edge.layers.base import QT, Primitive, Shape, pair, window_out


def _pad_value(t: Tensor) -> float | int:
    return float("-inf") if t.is_floating_point() else torch.iinfo(t.dtype).min


def _slices(x: Tensor, k, s, p, out_hw, fill) -> list[Tensor]:
    """For each window position q: the (N, C, H', W') strided view of the padded input."""
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    oh, ow = out_hw
    xp = F.pad(x, (pw, pw, ph, ph), value=fill) if ph or pw else x
    return [xp[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
            for i in range(kh) for j in range(kw)]


def _interleave(t: Tensor, axis: int, s: int, size: int) -> Tensor:
    """s - 1 zeros after every entry along `axis`, cut to `size` (traceable)."""
    if s == 1:
        return t
    shape = list(intops.dims(t))
    pad = [0, 0] * (len(shape) - axis - 1) + [0, s - 1]
    u = F.pad(t.unsqueeze(axis + 1), pad)
    shape[axis] *= s
    return u.reshape(shape).narrow(axis, 0, size)


def _place(ex, part, kk: int, k, s, p, hw) -> Tensor:
    """The adjoint of `_slices`: sum over q of part(q, out) put at window position q, cropped
    to hw. `part(q, out)` returns the pooled-size tensor of position q, written into `out`
    (a strided view of the map) when `out` is given: eager mode writes in place."""
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    first = part(0, None)
    n, c, oh, ow = intops.dims(first)
    h, w = hw
    full_h, full_w = h + 2 * ph, w + 2 * pw
    disjoint = (kh, kw) == (sh, sw)
    if ex.traced and disjoint:  # interleaved by concats at rank <= 4 (what NPUs take)
        parts = [first] + [part(q, None) for q in range(1, kk)]
        rows = [torch.cat([parts[i * kw + j].reshape(-1, ow, 1) for j in range(kw)], 2)
                .reshape(-1, 1, ow * kw) for i in range(kh)]
        t = torch.cat(rows, 1).reshape(n, c, oh * kh, ow * kw)
        t = F.pad(t, (0, full_w - ow * kw, 0, full_h - oh * kh))
    elif ex.traced:
        t = None
        for q in range(kk):
            i, j = divmod(q, kw)
            d = first if q == 0 else part(q, None)
            d = _interleave(_interleave(d, 2, sh, sh * (oh - 1) + 1), 3, sw, sw * (ow - 1) + 1)
            d = F.pad(d, (j, full_w - j - d.shape[3], i, full_h - i - d.shape[2]))
            t = d if t is None else t + d
    else:
        cover = disjoint and full_h == oh * kh and full_w == ow * kw  # every cell written once
        t = (first.new_empty if cover else first.new_zeros)(n, c, full_h, full_w)
        for q in range(kk):
            i, j = divmod(q, kw)
            view = t[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
            if disjoint:
                r = first if q == 0 else part(q, view)
                if r is not view:
                    view.copy_(r)
            else:
                view.add_(first if q == 0 else part(q, None))
    if ph or pw:
        t = t[:, :, ph : ph + h, pw : pw + w]
    return t


@dataclass(frozen=True)
class _Window(Primitive):
    k: int | tuple[int, int] = 2
    stride: int | tuple[int, int] | None = None  # None: the kernel (non-overlapping)
    padding: int | tuple[int, int] = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", pair(self.k, "k"))
        stride = self.k if self.stride is None else self.stride
        object.__setattr__(self, "stride", pair(stride, "stride"))
        object.__setattr__(self, "padding", pair(self.padding, "padding"))
        if min(self.k) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise EdgeError(f"pool kernel and stride must be >= 1, padding >= 0, got "
                            f"k={self.k} stride={self.stride} padding={self.padding}")
        if any(p > k // 2 for p, k in zip(self.padding, self.k, strict=True)):
            raise EdgeError(f"pool padding {self.padding} must be at most half the kernel")

    def to_dict(self):
        d = {"op": self.op, "k": list(self.k)}
        if self.stride != self.k:
            d["stride"] = list(self.stride)
        if any(self.padding):
            d["padding"] = list(self.padding)
        return d

    def out_shape(self, shape: Shape) -> Shape:
        if len(shape) != 3:
            raise EdgeError(f"{self.op} expects a (C, H, W) map, got shape {shape}")
        (kh, kw), (sh, sw), (ph, pw) = self.k, self.stride, self.padding
        return (shape[0], window_out(shape[1], kh, sh, ph, self.op),
                window_out(shape[2], kw, sw, pw, self.op))

    def _out_hw(self, x: Tensor) -> tuple[int, int]:
        return self.out_shape(tuple(intops.dims(x)[1:]))[1:]


@dataclass(frozen=True)
class MaxPool(_Window):
    op = "maxpool"

    def _max(self, ex, x: Tensor) -> tuple[Tensor, Tensor]:
        """(y, first-argmax offsets as uint8)."""
        kk = self.k[0] * self.k[1]
        if kk > 256:
            raise EdgeError(f"max-pool window {self.k} has more than 256 positions")
        sl = _slices(x, self.k, self.stride, self.padding, self._out_hw(x), _pad_value(x))
        if x.is_floating_point():
            y = F.max_pool2d(x, self.k, self.stride, self.padding)
        else:
            y = sl[0]
            for t in sl[1:]:
                y = torch.maximum(y, t)
        off = torch.full(intops.dims(y), kk - 1, dtype=torch.uint8, device=y.device)
        for q in range(kk - 2, -1, -1):  # lowest offset written last: it wins ties
            if ex.traced:
                off = torch.where(sl[q] == y, torch.tensor(q, dtype=torch.uint8), off)
            else:
                off.masked_fill_(sl[q] == y, q)
        return y, off

    def _route(self, ex, g: Tensor, off: Tensor, hw) -> Tensor:
        zero = torch.zeros((), dtype=g.dtype)

        def part(q, out):
            if out is None:
                return torch.where(off == q, g, zero)
            return torch.mul(g, off == q, out=out)

        return _place(ex, part, self.k[0] * self.k[1], self.k, self.stride, self.padding, hw)

    def _eager_max(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(y, flat argmax within the plane as int16/int32): the eager float kernel."""
        y, idx = F.max_pool2d(x, self.k, self.stride, self.padding, return_indices=True)
        h, w = intops.dims(x)[2:]
        return y, idx.to(torch.int16 if h * w <= 1 << 15 else torch.int32)

    def _eager_route(self, g: Tensor, idx: Tensor, hw) -> Tensor:
        """Each window's error at its argmax (flat indices), written into a channels-last
        map by aten's max-pool backward (which zero-fills it first)."""
        n, c = g.shape[:2]
        shape = (n, c, *hw)
        out = torch.empty(shape, dtype=g.dtype, device=g.device,
                          memory_format=torch.channels_last)
        like = g.new_empty(()).expand(shape)  # only its shape is read
        return torch.ops.aten.max_pool2d_with_indices_backward.grad_input(
            g, like, list(self.k), list(self.stride), list(self.padding), [1, 1], False,
            idx.long(), grad_input=out)

    def forward(self, ex, p, x):
        y, off = self._max(ex, x) if ex.traced else self._eager_max(x)
        return y, (off, intops.dims(x)[2:], y)

    def adjoint(self, ex, p, saved, g, need_gx):
        off, hw, _ = saved
        if off.dtype != torch.uint8:  # flat indices of the eager kernel
            return {}, self._eager_route(g, off, hw)
        return {}, self._route(ex, g, off, hw)

    def int_forward(self, ex, key, p, x):
        y, off = self._max(ex, x.t)
        out = QT(y, x.f)
        return out, (off, intops.dims(x.t)[2:], out)

    def int_adjoint(self, ex, key, p, saved, g, need_gx):
        off, hw, _ = saved
        return {}, QT(self._route(ex, g.t, off, hw), g.f, g.c)


@dataclass(frozen=True)
class AvgPool(_Window):
    op = "avgpool"

    def forward(self, ex, p, x):
        return F.avg_pool2d(x, self.k, self.stride, self.padding), intops.dims(x)[1:]

    def adjoint(self, ex, p, shape, g, need_gx):
        kk = self.k[0] * self.k[1]
        if not ex.traced:
            return {}, self._eager_adjoint(g, shape)
        gk = g / kk
        return {}, _place(ex, lambda q, out: gk, kk, self.k, self.stride, self.padding, shape[1:])

    def _eager_adjoint(self, g: Tensor, shape) -> Tensor:
        """Eager: windows that tile the map exactly (the rules' code pools) spread g / k^2
        by a nearest upsampling into a channels-last map, the eager convs' layout (one
        pass; aten's avg-pool backward would build NCHW and copy); others use that backward."""
        (kh, kw), (sh, sw) = self.k, self.stride
        oh, ow = intops.dims(g)[2:]
        tiles = (kh, kw) == (sh, sw) and not any(self.padding)
        if tiles and (oh * kh, ow * kw) == tuple(shape[1:]):
            gk = (g / (kh * kw)).contiguous(memory_format=torch.channels_last)
            return F.interpolate(gk, scale_factor=(kh, kw), mode="nearest")
        like = g.new_empty(()).expand(g.shape[0], *shape)  # only its shape is read
        return torch.ops.aten.avg_pool2d_backward(g, like, list(self.k), list(self.stride),
                                                  list(self.padding), False, True, None)

    def int_forward(self, ex, key, p, x):
        sl = _slices(x.t, self.k, self.stride, self.padding, self._out_hw(x.t), 0)
        total = intops.widen(sl[0])
        for t in sl[1:]:
            total = total + intops.widen(t)
        y = intops.div_round(total, self.k[0] * self.k[1]).to(x.t.dtype)
        return QT(y, x.f), intops.dims(x.t)[1:]

    def int_adjoint(self, ex, key, p, shape, g, need_gx):
        kk = self.k[0] * self.k[1]
        t = _place(ex, lambda q, out: g.t, kk, self.k, self.stride, self.padding, shape[1:])
        return {}, QT(t, g.f, g.c / kk)


@dataclass(frozen=True)
class GlobalAvgPool(Primitive):
    """(N, C, H, W) -> (N, C): the mean over all positions."""

    op = "gap"

    def out_shape(self, shape: Shape) -> Shape:
        if len(shape) != 3:
            raise EdgeError(f"gap expects a (C, H, W) map, got shape {shape}")
        return (shape[0],)

    def forward(self, ex, p, x):
        return x.mean((2, 3)), intops.dims(x)[1:]

    def adjoint(self, ex, p, shape, g, need_gx):
        c, h, w = shape
        return {}, (g / (h * w))[:, :, None, None].expand(-1, c, h, w)

    def int_forward(self, ex, key, p, x):
        _, c, h, w = intops.dims(x.t)
        total = intops.widen(x.t).sum((2, 3))
        return QT(intops.div_round(total, h * w).to(x.t.dtype), x.f), (c, h, w)

    def int_adjoint(self, ex, key, p, shape, g, need_gx):
        c, h, w = shape
        return {}, QT(g.t[:, :, None, None].expand(-1, c, h, w), g.f, g.c / (h * w))
