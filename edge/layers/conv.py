"""Conv: 2-D convolution, k x k with stride, padding and groups (depthwise and pointwise too).

Forward (x: N x C x H x W, w: O x C/G x kh x kw, b: O; G groups, stride s, padding p):
    y[n, o, h, v] = b[o] + sum_{c, i, j} w[o, c, i, j] xpad[n, grp(o) C/G + c, h s + i, v s + j]
Closed-form local adjoint from g = dL/dy:
    dL/dw[o, c, i, j] = sum_{n, h, v} g[n, o, h, v] xpad[n, grp(o) C/G + c, h s + i, v s + j]
    dL/db[o]          = sum_{n, h, v} g[n, o, h, v]
    dL/dx             = the transposed convolution of g by w (only inside a block: a block's
                        first primitive never needs it)
Kernels. Eager: aten's convolution_backward with only the wanted outputs (the kernel
backprop's baselines run, called as a plain op: no autograd graph). Stride-1 convs run on
channels-last maps: oneDNN runs NHWC natively, where NCHW maps are reordered to its blocked
layout at every call (several times slower on the first, few-channel layers), and the pools
and activations between convs keep the layout. Strided convs stay NCHW, input and error
alike: torch 2.13's CPU weight gradient of a channels-last 1x1 stride-2 conv is wrong for
some inputs (and for a channels-last input with an NCHW error). Weight gradients come back
contiguous. Traced: ONNX has no
weight-gradient op; the weight gradient is one GEMM per kernel offset, (O_g x NH'W') @
(NH'W' x C/G) over the input's strided window at that offset (no unfold buffer), the input
transposed once (NHWC; depthwise: GNHW) so each window is a Slice that reshapes to the
operand with no per-offset Transpose; dx is ConvTranspose. Same sums, up to float rounding order.

Integer form (x 8-bit at 2^-f_x, w int8 at 2^-f_w, b int32 at 2^-(f_x + f_w)):
    acc = conv(x, w) + b                          int32, exponent f_x + f_w (ConvInteger)
    dW  = Hebbian(x, e), db = sum e               int32, saturating; e int8 at (f_e, c)
    dx  = requant_8(conv_transpose(e, w))         int8 at the plan's f_gx, stochastically
                                                  rounded with explicit random bits
Initialisation: He-normal over the fan-in (C/G kh kw), zero bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from edge.errors import EdgeError
from edge.layers import intops
from edge.layers.base import QT, Primitive, Shape, he_normal, pair, window_out


@dataclass(frozen=True)
class Conv(Primitive):
    op = "conv"
    has_weights = True
    trainable = ("w", "b")

    cin: int
    cout: int
    k: int | tuple[int, int] = 3
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    groups: int = 1

    def __post_init__(self) -> None:
        for name in ("k", "stride", "padding"):
            object.__setattr__(self, name, pair(getattr(self, name), name))
        if self.cin < 1 or self.cout < 1:
            raise EdgeError(f"channels must be positive, got {self.cin}->{self.cout}")
        if min(self.k) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise EdgeError(f"kernel and stride must be >= 1 and padding >= 0, got k={self.k} "
                            f"stride={self.stride} padding={self.padding}")
        if self.groups < 1 or self.cin % self.groups or self.cout % self.groups:
            raise EdgeError(f"groups={self.groups} must divide both {self.cin} input and "
                            f"{self.cout} output channels")

    @property
    def geom(self) -> intops.ConvGeom:
        return intops.ConvGeom(self.k, self.stride, self.padding, self.groups)

    def out_shape(self, shape: Shape) -> Shape:
        if len(shape) != 3 or shape[0] != self.cin:
            raise EdgeError(f"conv expects a {self.cin}-channel map, got shape {shape}")
        (kh, kw), (sh, sw), (ph, pw) = self.k, self.stride, self.padding
        return (self.cout, window_out(shape[1], kh, sh, ph, "conv"),
                window_out(shape[2], kw, sw, pw, "conv"))

    def param_shapes(self) -> dict[str, Shape]:
        return {"w": (self.cout, self.cin // self.groups, *self.k), "b": (self.cout,)}

    def init(self, gen: torch.Generator) -> dict[str, Tensor]:
        shape = self.param_shapes()["w"]
        return {"w": he_normal(shape, shape[1] * shape[2] * shape[3], gen),
                "b": torch.zeros(self.cout)}

    def macs(self, shape: Shape) -> int:
        o, h, w = self.out_shape(shape)
        return o * h * w * (self.cin // self.groups) * self.k[0] * self.k[1]

    @property
    def _layout(self) -> torch.memory_format:
        """The eager kernels' layout of the input and the error (module docstring)."""
        if self.stride == (1, 1):
            return torch.channels_last
        return torch.contiguous_format

    # ------------------------------------------------------------------ float
    def forward(self, ex, p, x):
        if not ex.traced:
            x = x.contiguous(memory_format=self._layout)  # a no-op after a stride-1 eager conv
        y = F.conv2d(x, p["w"], p["b"], self.stride, self.padding, 1, self.groups)
        return y, x

    def adjoint(self, ex, p, x, g, need_gx):
        w = p["w"]
        if not ex.traced:
            # materialized: an expanded (stride-0) g gets a wrong bias gradient from aten
            g = g.contiguous(memory_format=self._layout)
            gx, gw, gb = torch.ops.aten.convolution_backward(
                g, x, w, [self.cout], list(self.stride), list(self.padding), [1, 1], False,
                [0, 0], self.groups, [need_gx, True, True])
            return {"w": gw.contiguous(), "b": gb}, gx
        gx = None
        if need_gx:
            h, wd = x.shape[2], x.shape[3]
            oh, ow = g.shape[2], g.shape[3]
            (kh, kw), (sh, sw), (ph, pw) = self.k, self.stride, self.padding
            opad = (int(h) - ((int(oh) - 1) * sh - 2 * ph + kh),
                    int(wd) - ((int(ow) - 1) * sw - 2 * pw + kw))
            gx = F.conv_transpose2d(g, w, None, self.stride, self.padding, opad, self.groups)
        return {"w": self._weight_grad_gemm(x, g), "b": g.sum((0, 2, 3))}, gx

    def _weight_grad_gemm(self, x: Tensor, g: Tensor) -> Tensor:
        """dL/dw as one grouped GEMM per kernel offset (the traced kernel)."""
        n, c = intops.dims(x)[:2]
        o, oh, ow = intops.dims(g)[1:]
        grp, cg, og = self.groups, c // self.groups, o // self.groups
        k = n * oh * ow
        gm = g.transpose(0, 1).reshape(grp, og, k)  # G, O_g, K
        if grp == 1 or cg == 1:
            # the input transposed once, so that every offset's window is a slice that
            # reshapes to the GEMM operand (a per-offset transpose costs as much as the GEMM)
            (kh, kw), (sh, sw), (ph, pw) = self.k, self.stride, self.padding
            xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
            xt = xp.permute(0, 2, 3, 1) if grp == 1 else xp.transpose(0, 1)  # NHWC / GNHW
            cols = []
            for i in range(kh):
                for j in range(kw):
                    hs = slice(i, i + sh * (oh - 1) + 1, sh)
                    ws = slice(j, j + sw * (ow - 1) + 1, sw)
                    if grp == 1:
                        xm = xt[:, hs, ws, :].reshape(k, c)  # K, C
                        cols.append((gm[0] @ xm).reshape(o, c, 1))
                    else:
                        xm = xt[:, :, hs, ws].reshape(grp, k, 1)  # G, K, 1
                        cols.append((gm @ xm).reshape(o, 1, 1))
            return torch.cat(cols, 2).reshape(o, cg, *self.k)
        cols = []
        for _, _, xs in intops._windows(x, self.geom, oh, ow):
            xm = xs.permute(0, 2, 3, 1).reshape(k, grp, cg).transpose(0, 1)  # G, K, C_g
            cols.append((gm @ xm).reshape(o, cg, 1))
        return torch.cat(cols, 2).reshape(o, cg, *self.k)

    # ------------------------------------------------------------------ integer
    def int_forward(self, ex, key, p, x):
        w, b = p["w"], p["b"]
        acc = intops.int_conv2d(x.t, w.t, self.geom) + b.t.to(torch.int32)[None, :, None, None]
        return QT(acc, x.f + w.f), x

    def int_adjoint(self, ex, key, p, x, g, need_gx):
        e8 = intops.narrow(g.t, torch.int8)
        gw = intops.saturate32(intops.int_conv2d_weight(x.t, e8, self.geom))
        gb = intops.saturate32(intops.widen(e8).sum((0, 2, 3)))
        grads = {"w": QT(gw, x.f + g.f, g.c), "b": QT(gb, g.f, g.c)}
        gx = None
        if need_gx:
            w = p["w"]
            hw = intops.dims(x.t)[2:]
            acc = intops.int_conv2d_input(e8, w.t, self.geom, hw)
            gx = ex.requant_error(key, QT(acc, g.f + w.f, g.c))
        return grads, gx
