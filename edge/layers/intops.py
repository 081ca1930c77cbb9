"""The integer arithmetic of the integer forms: exact in eager torch, explicit in ONNX.

Every primitive takes integer tensors and Python-int shifts / divisors, with no branching on
tensor values. The ones the exporter must not lower on its own (it lowers floor division to
a truncating Div plus a sign fix-up, `>>` to a truncating shift, and has no integer matmul
or convolution) are `torch.library` custom ops with two implementations: an eager one, fast
and exact, and an ONNX symbolic made of standard integer ops. The tests hold the two to each
other and to the NumPy reference, bit for bit.

* `floor_div(x, d)`, `floor_mod(x, d)`: floor(x / d) and x - d floor(x / d) in [0, d), d > 0.
  ONNX: r = Mod(x, d) (integer Mod takes the divisor's sign), q = Div(x - r, d), exact
  because x - r is a multiple of d. `floor_shift(x, k)` = floor_div(x, 2^k), the arithmetic
  shift right (-3 >> 1 == -2); k <= 0 shifts left.
* `div_round(x, d)`: x / d rounded half to even (the rule of `quant.spec.quantize` and of
  ONNX QuantizeLinear), `round_shift(x, k)` its power-of-two case. Written as floors only:
  d odd: floor((x + (d-1)/2) / d); d even: floor((x + d/2 - 1 + (floor(x/d) mod 2)) / d).
* `stochastic_shift(x, k, noise)`: floor((x + r) / 2^k) with r uniform in [0, 2^k) taken from
  explicit random bits, an unbiased rounding of x / 2^k.
* `saturate(x, lo, hi)`: the clamp (ONNX Clip) that precedes every narrowing cast.
* `int_matmul(a, b)`, `int_conv2d(x, w, conv)`, `int_conv2d_weight(x, e, conv)`,
  `int_conv2d_input(e, w, conv, hw)`: products of 8-bit tensors (uint8 / int8) for any
  kernel, stride, padding and groups (`ConvGeom`), exact int64 results (the forward
  convolution: its int32 accumulator, bounded at plan time). ONNX: MatMulInteger /
  ConvInteger (int32 accumulators), split into chunks whose int32 sums cannot overflow, the
  chunks added in int64. The weight gradient is a ConvInteger of the input by the error with
  the batch as the channel axis and the stride as dilation; the input gradient (a transposed
  convolution, which ONNX has only for floats) is a ConvInteger of the zero-interleaved error
  by the flipped kernel. A uint8 x int8 matmul is emitted as int8 x int8 plus 128 x the
  other operand's sums: onnxruntime's u8s8 MatMulInteger saturates int16 pair sums on AVX2 CPUs.
  Eager: float32 arithmetic split so that no partial sum can reach 2^24 (every partial sum
  is then an exact integer, whatever the summation order), chunks added in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
NOISE_BITS = 16  # random bits per element for stochastic rounding, drawn uniform in [0, 2^16)
F32_EXACT = 1 << 24  # float32 holds every integer of magnitude <= 2^24
EIGHT_BIT = (torch.uint8, torch.int8)
OPSET = 10  # the symbolics hold from opset 10 (MatMulInteger, ConvInteger) on


def dims(t: Tensor) -> tuple[int, ...]:
    """A tensor's shape as plain Python ints. Traced code must compute chunk bounds, crops and
    reshapes from these: arithmetic on traced sizes is exported as graph ops, and the
    exporter's integer division of sizes goes through float32 (1023.99... folds to 1024)."""
    return tuple(int(d) for d in t.shape)


def widen(x: Tensor) -> Tensor:
    """Any integer tensor as int64 (the working width of the elementwise steps)."""
    return x.to(torch.int64)


def _max_abs(t: Tensor | torch.dtype) -> int:
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    if dtype not in EIGHT_BIT:
        raise TypeError(f"integer products take uint8 / int8 operands, got {dtype}")
    return 255 if dtype == torch.uint8 else 128


# ------------------------------------------------------------------ elementwise custom ops


@torch.library.custom_op("edge_int::floor_div", mutates_args=())
def _floor_div(x: Tensor, d: int) -> Tensor:
    if d & (d - 1) == 0:
        return x >> (d.bit_length() - 1)
    return torch.div(x, d, rounding_mode="floor")


@torch.library.custom_op("edge_int::floor_mod", mutates_args=())
def _floor_mod(x: Tensor, d: int) -> Tensor:
    if d & (d - 1) == 0:
        return x & (d - 1)
    return torch.remainder(x, d)


@torch.library.custom_op("edge_int::div_nonneg", mutates_args=())
def _div_nonneg(x: Tensor, d: int) -> Tensor:
    return x >> (d.bit_length() - 1) if d & (d - 1) == 0 else torch.div(x, d, rounding_mode="floor")


@_floor_div.register_fake
@_floor_mod.register_fake
@_div_nonneg.register_fake
def _(x: Tensor, d: int) -> Tensor:
    return torch.empty_like(x)


def floor_div(x: Tensor, d: int) -> Tensor:
    """floor(x / d) for a positive Python int d (int64 in, int64 out)."""
    if d < 1:
        raise ValueError(f"divisor must be positive, got {d}")
    return x if d == 1 else _floor_div(x, d)


def floor_mod(x: Tensor, d: int) -> Tensor:
    """x mod d in [0, d) for a positive Python int d."""
    if d < 1:
        raise ValueError(f"divisor must be positive, got {d}")
    return torch.zeros_like(x) if d == 1 else _floor_mod(x, d)


def floor_shift(x: Tensor, k: int, nonneg: bool = False) -> Tensor:
    """floor(x / 2^k) for k > 0 (arithmetic shift right, rounds toward -inf); x * 2^-k else.
    `nonneg`: the caller guarantees x >= 0, where floor is truncation (ONNX: one Div)."""
    if k <= 0:
        return x * (1 << -k)
    return _div_nonneg(x, 1 << k) if nonneg else floor_div(x, 1 << k)


def div_round(x: Tensor, d: int) -> Tensor:
    """x / d rounded to the nearest integer, ties to even; d a positive Python int.

    With q = floor(x / d), r = x - q d in [0, d): the result is q + [r > d/2] + [r == d/2][q
    odd] = q + floor((r + c) / d) for c = (d-1)/2 (d odd: no ties) or c = d/2 - 1 + (q mod 2)
    (d even): r + c reaches d exactly when the rounding goes up. Nothing grows beyond |x|,
    so the same arithmetic is exact in int32.
    """
    if d == 1:
        return x
    q, r = floor_div(x, d), floor_mod(x, d)
    c = (d - 1) // 2 if d % 2 else d // 2 - 1 + floor_mod(q, 2)
    return q + floor_div(r + c, d)


def round_shift(x: Tensor, k: int) -> Tensor:
    """x / 2^k rounded half to even for k > 0; x * 2^-k (exact) for k <= 0."""
    if k <= 0:
        return x * (1 << -k)
    return div_round(x, 1 << k)


def saturate(x: Tensor, lo: int, hi: int) -> Tensor:
    """Clip to [lo, hi]: done before any cast to a narrower type, so nothing wraps."""
    return torch.clamp(x, lo, hi)


def saturate32(x: Tensor) -> Tensor:
    """A gradient accumulator with saturation, as int32: the exact sum clipped to the
    symmetric range [-GRAD_MAX, GRAD_MAX] (2^16 below the int32 limits), so that its
    negation plus any rounding offset of 16 random bits is an int32 too."""
    return saturate(x, -GRAD_MAX, GRAD_MAX).to(torch.int32)


def narrow(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Saturate to `dtype`'s range, then cast (Clip before Cast)."""
    info = torch.iinfo(dtype)
    return saturate(x, info.min, info.max).to(dtype)


GRAD_MAX = INT32_MAX - (1 << NOISE_BITS)  # gradients saturate here: room for rounding bits


def stochastic_shift(x: Tensor, k: int, noise: Tensor, noise_bits: int = NOISE_BITS,
                     bounded: bool = False) -> Tensor:
    """Unbiased stochastic rounding of x / 2^k with explicit random bits.

    `noise` holds integers uniform in [0, 2^noise_bits), one per element of x (any integer
    dtype). For 0 < k <= noise_bits the top k bits of the noise give r uniform in [0, 2^k) and
    the result is floor((x + r) / 2^k), whose mean is exactly x / 2^k. For k > noise_bits the
    low k - noise_bits bits of x are first dropped by a floor shift (a bias below 2^-noise_bits
    of one output unit). For k <= 0 the result is exact (x * 2^-k) and the noise is unused.
    int32 x is computed in int32: `bounded` (|x| <= GRAD_MAX, e.g. a saturated gradient)
    forms x + r directly, else floor(x / 2^k) + floor((x mod 2^k + r) / 2^k), which never
    leaves int32; wider x in int64. The same values every way.
    """
    if k <= 0:
        return widen(x) * (1 << -k)
    narrow32 = x.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32)
    r = noise.to(torch.int32) if narrow32 else widen(noise)
    if k > noise_bits:
        x = floor_shift(x, k - noise_bits)
        k = noise_bits
    else:
        r = floor_shift(r, noise_bits - k, nonneg=True)
    if narrow32 and not bounded:
        x = x.to(torch.int32)
        return floor_shift(x, k) + floor_shift(floor_mod(x, 1 << k) + r, k, nonneg=True)
    return floor_shift(x + r, k)


# ---------------------------------------------------------------- exact eager products


class ConvGeom(tuple):
    """(kh, kw, sh, sw, ph, pw, groups) of a convolution, as plain ints (hashable, and a
    plain int list in the custom ops' schemas)."""

    def __new__(cls, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int], groups: int):
        return super().__new__(cls, (k[0], k[1], s[0], s[1], p[0], p[1], groups))


def _fast_f32(t: Tensor) -> bool:
    """float32 BLAS / oneDNN give exact integer sums below 2^24 on the CPU in IEEE mode (no
    reduced-precision math mode set by the user); anything else takes the float64 path."""
    return (
        t.device.type == "cpu"
        and torch.get_float32_matmul_precision() == "highest"
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and all(
            getattr(getattr(torch.backends.mkldnn, op, None), "fp32_precision", "none")
            in ("none", "ieee")
            for op in ("conv", "matmul")
        )
    )


def _to_int(y: Tensor) -> Tensor:
    """An integer-valued float tensor as int64. Off the CPU, whose float64 kernels may
    take non-direct algorithms (FFT, Winograd) with tiny errors, round first."""
    return torch.round(y).to(torch.int64) if y.device.type != "cpu" else y.to(torch.int64)


def _max_abs(t: Tensor | torch.dtype) -> int:
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    if dtype not in EIGHT_BIT:
        raise TypeError(f"integer products take uint8 / int8 operands, got {dtype}")
    return 255 if dtype == torch.uint8 else 128


def _mm_eager(a: Tensor, b: Tensor, bound: int) -> Tensor:
    """a @ b exact: float32 with the K axis cut into chunks of at most 2^24 / bound terms
    (bound = max |a_ik b_kj|), the chunks' float32 results added in float64."""
    k = a.shape[-1]
    if not _fast_f32(a):
        return _to_int(a.double() @ b.double())
    kc = max(1, F32_EXACT // bound)
    if k <= kc:
        return _to_int(a.float() @ b.float())
    n = -(-k // kc)
    af = F.pad(a.float(), (0, n * kc - k))  # zero terms add nothing
    bf = F.pad(b.float().transpose(-1, -2), (0, n * kc - k)).transpose(-1, -2)
    lead = af.shape[:-2]
    af = af.reshape(*lead, af.shape[-2], n, kc).movedim(-2, 0)  # n, ..., M, kc
    bf = bf.reshape(*lead, n, kc, bf.shape[-1]).movedim(-3, 0)  # n, ..., kc, N
    return _to_int((af @ bf).double().sum(0))


def _conv_eager(x: Tensor, w: Tensor, g: ConvGeom) -> Tensor:
    """Exact convolution: float32 convolutions over slices of each group's input channels
    small enough that kh kw channels max|x| max|w| < 2^24, added in float64."""
    kh, kw, sh, sw, ph, pw, groups = g
    args = {"stride": (sh, sw), "padding": (ph, pw), "groups": groups}
    if not _fast_f32(x):
        return _to_int(F.conv2d(x.double(), w.double(), **args)).to(torch.int32)
    cg = w.shape[1]  # input channels per group
    cc = max(1, F32_EXACT // (kh * kw * _max_abs(x) * _max_abs(w)))
    if cg <= cc:  # one slice: its float32 result is exact as it stands
        return F.conv2d(x.float(), w.float(), **args).to(torch.int32)
    n, c, h, wd = x.shape
    xg = x.view(n, groups, cg, h, wd)
    out = None
    for a in range(0, cg, cc):
        b = min(cg, a + cc)
        part = F.conv2d(xg[:, :, a:b].reshape(n, groups * (b - a), h, wd).float(),
                        w[:, a:b].float(), **args).double()
        out = part if out is None else out + part
    return _to_int(out).to(torch.int32)


def _windows(x: Tensor, g: ConvGeom, oh: int, ow: int):
    """(i, j, x_ij) for every kernel offset: x_ij[n, c, h, w] = xpad[n, c, h sh + i, w sw + j]."""
    kh, kw, sh, sw, ph, pw, _ = g
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]


def _conv_weight_eager(x: Tensor, e: Tensor, g: ConvGeom) -> Tensor:
    """gW[o, c, i, j] = sum_{n,h,w} e[n,o,h,w] xpad[n, grp(o) Cg + c, h sh + i, w sw + j],
    exact: for each kernel offset one grouped (O_g x NHW) @ (NHW x Cg) product, K cut into
    blocks whose sums stay below 2^24, blocks added in float64."""
    kh, kw, _, _, _, _, groups = g
    n, c = x.shape[:2]
    o, oh, ow = e.shape[1], e.shape[2], e.shape[3]
    cg, og, k = c // groups, o // groups, n * oh * ow
    em = e.permute(1, 0, 2, 3).reshape(groups, og, k)  # G, O_g, K
    out = torch.empty((o, cg, kh, kw), dtype=torch.int64, device=x.device)
    bound = _max_abs(x) * _max_abs(e)
    for i, j, xs in _windows(x, g, oh, ow):
        xm = xs.permute(0, 2, 3, 1).reshape(k, groups, cg).transpose(0, 1)  # G, K, Cg
        out[:, :, i, j] = _mm_eager(em, xm, bound).reshape(o, cg)
    return out


def _conv_input_eager(e: Tensor, w: Tensor, g: ConvGeom, h: int, wd: int) -> Tensor:
    """dx of a convolution: the transposed convolution of the error by the kernel, exact:
    float32 over slices of each group's output channels with O_slice kh kw max|e| max|w| <
    2^24, added in float64."""
    kh, kw, sh, sw, ph, pw, groups = g
    oh, ow = e.shape[2], e.shape[3]
    opad = (h - ((oh - 1) * sh - 2 * ph + kh), wd - ((ow - 1) * sw - 2 * pw + kw))
    args = {"stride": (sh, sw), "padding": (ph, pw), "output_padding": opad, "groups": groups}
    if not _fast_f32(e):
        return _to_int(F.conv_transpose2d(e.double(), w.double(), **args))
    og = w.shape[0] // groups
    cc = max(1, F32_EXACT // (kh * kw * _max_abs(e) * _max_abs(w)))
    if og <= cc:
        return _to_int(F.conv_transpose2d(e.float(), w.float(), **args))
    n = e.shape[0]
    eg = e.view(n, groups, og, oh, ow)
    wg = w.view(groups, og, *w.shape[1:])
    out = None
    for a in range(0, og, cc):
        b = min(og, a + cc)
        part = F.conv_transpose2d(eg[:, :, a:b].reshape(n, groups * (b - a), oh, ow).float(),
                                  wg[:, a:b].reshape(groups * (b - a), *w.shape[1:]).float(),
                                  **args).double()
        out = part if out is None else out + part
    return _to_int(out)


# --------------------------------------------------------------- product custom ops


@torch.library.custom_op("edge_int::matmul", mutates_args=())
def _matmul(a: Tensor, b: Tensor) -> Tensor:
    return _mm_eager(a, b, _max_abs(a) * _max_abs(b)).to(torch.int32)  # one chunk: fits


@torch.library.custom_op("edge_int::conv", mutates_args=())
def _conv(x: Tensor, w: Tensor, geom: list[int]) -> Tensor:
    return _conv_eager(x, w, ConvGeom(geom[0:2], geom[2:4], geom[4:6], geom[6]))


# The sizes the symbolics need travel as explicit int lists (`dims`: static Python ints at
# the call): the tracer does not always know a tensor's sizes.


@torch.library.custom_op("edge_int::conv_weight", mutates_args=())
def _conv_weight(x: Tensor, e: Tensor, geom: list[int], dims_: list[int]) -> Tensor:
    g = ConvGeom(geom[0:2], geom[2:4], geom[4:6], geom[6])
    return _conv_weight_eager(x, e, g).to(torch.int32)  # one chunk: its sums fit int32


@torch.library.custom_op("edge_int::conv_input", mutates_args=())
def _conv_input(e: Tensor, w: Tensor, geom: list[int], dims_: list[int]) -> Tensor:
    return _conv_input_eager(e, w, ConvGeom(geom[0:2], geom[2:4], geom[4:6], geom[6]),
                             dims_[0], dims_[1])


def _conv_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


@_matmul.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int32)


@_conv.register_fake
def _(x: Tensor, w: Tensor, geom: list[int]) -> Tensor:
    kh, kw, sh, sw, ph, pw, _ = geom
    return x.new_empty((x.shape[0], w.shape[0], _conv_out(x.shape[2], kh, sh, ph),
                        _conv_out(x.shape[3], kw, sw, pw)), dtype=torch.int32)


@_conv_weight.register_fake
def _(x: Tensor, e: Tensor, geom: list[int], dims_: list[int]) -> Tensor:
    return x.new_empty((e.shape[1], x.shape[1] // geom[6], geom[0], geom[1]), dtype=torch.int32)


@_conv_input.register_fake
def _(e: Tensor, w: Tensor, geom: list[int], dims_: list[int]) -> Tensor:
    return e.new_empty((e.shape[0], w.shape[1] * geom[6], dims_[0], dims_[1]), dtype=torch.int64)


MATMUL_CHUNK = INT32_MAX // (2 * 128 * 256)  # K per MatMulInteger (its u8 x s8 form's worst case)


def _sum64(parts: list[Tensor]) -> Tensor:
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for 8-bit integer matrices (M, K) x (K, N), exact: one MatMulInteger per
    MATMUL_CHUNK of K, whose int32 sum cannot overflow; int32 for one chunk, else the chunks
    added in int64."""
    _max_abs(a), _max_abs(b)
    k = dims(a)[1]
    parts = [_matmul(a[:, s : s + MATMUL_CHUNK], b[s : s + MATMUL_CHUNK])
             for s in range(0, k, MATMUL_CHUNK)]
    return parts[0] if len(parts) == 1 else _sum64([widen(p) for p in parts])


def int_conv2d(x: Tensor, w: Tensor, geom: ConvGeom) -> Tensor:
    """Convolution of 8-bit x (N, C, H, W) by int8 w (O, C/groups, kh, kw): an int32
    accumulator, exact while fan-in x max|x| x max|w| < 2^31 (the plan checks it;
    ConvInteger's int32 output as it stands)."""
    _max_abs(x), _max_abs(w)
    return _conv(x, w, list(geom))


def conv_weight_chunk(oh: int, ow: int, x_max: int = 256, e_max: int = 128) -> int:
    """Images per ConvInteger such that one chunk's Hebbian sum stays inside int32."""
    return max(1, INT32_MAX // (oh * ow * x_max * e_max))


def int_conv2d_weight(x: Tensor, e: Tensor, geom: ConvGeom) -> Tensor:
    """The Hebbian product of a convolution: gW[o, c, i, j] = sum_{n, h, w} e[n, o, h, w] *
    xpad[n, grp(o) Cg + c, h sh + i, w sw + j], shape (O, C/groups, kh, kw), exact. x 8-bit,
    e int8. ONNX: one ConvInteger per chunk of the batch whose int32 sum cannot overflow;
    int32 for one chunk, else the chunks added in int64."""
    _max_abs(x), _max_abs(e)
    n = dims(x)[0]
    step = conv_weight_chunk(dims(e)[2], dims(e)[3])
    c, h, w = dims(x)[1:]
    o, oh, ow = dims(e)[1:]
    parts = [_conv_weight(x[s : s + step], e[s : s + step], list(geom),
                          [min(step, n - s), c, h, w, o, oh, ow])
             for s in range(0, n, step)]
    kh, kw, groups = geom[0], geom[1], geom[6]
    total = parts[0] if len(parts) == 1 else _sum64([widen(p) for p in parts])
    return total.reshape(dims(e)[1], dims(x)[1] // groups, kh, kw)  # static shape


def int_conv2d_input(e: Tensor, w: Tensor, geom: ConvGeom, hw: tuple[int, int]) -> Tensor:
    """The input gradient of a convolution (its transposed convolution) for int8 e
    (N, O, H', W') and int8 w (O, C/groups, kh, kw): (N, C, H, W) int64, exact."""
    _max_abs(e), _max_abs(w)
    kh, kw, _, _, ph, pw, _ = geom
    if ph > kh - 1 or pw > kw - 1:
        raise ValueError(f"padding {ph, pw} beyond kernel - 1 has no integer input gradient")
    return _conv_input(e, w, list(geom), [int(hw[0]), int(hw[1]), *dims(e), dims(w)[1]])


# ---------------------------------------------------------------- ONNX symbolics


def _symbolics() -> None:
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx import symbolic_helper as sh

    def const(g, value, dtype=torch.int64):
        return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

    def like(g, x, value):  # a constant of x's integer type (int32 or int64)
        return const(g, value, torch.int32 if x.type().scalarType() == "Int" else torch.int64)

    def onnx_mod(g, x, d):
        return g.op("Mod", x, like(g, x, d), fmod_i=0)  # integer Mod: the divisor's sign

    @sh.parse_args("v", "i")
    def floor_div_sym(g, x, d):
        return g.op("Div", g.op("Sub", x, onnx_mod(g, x, d)), like(g, x, d))

    @sh.parse_args("v", "i")
    def floor_mod_sym(g, x, d):
        return onnx_mod(g, x, d)

    @sh.parse_args("v", "i")
    def div_nonneg_sym(g, x, d):
        return g.op("Div", x, like(g, x, d))  # x >= 0: truncation is the floor

    def scalar(v) -> str:
        return v.type().scalarType()  # "Byte" (uint8) | "Char" (int8)

    def cast(g, x, to):
        return g.op("Cast", x, to_i=sh.cast_pytorch_to_onnx[to])

    def as_int8(g, x):
        """uint8 -> x - 128 as int8 (in range by construction; clipped before the cast)."""
        s = g.op("Sub", cast(g, x, "Int"), const(g, 128, torch.int32))
        s = g.op("Clip", s, const(g, -128, torch.int32), const(g, 127, torch.int32))
        return cast(g, s, "Char")

    def sum32(g, x, axis):
        return g.op("ReduceSum", cast(g, x, "Int"), const(g, [axis]), keepdims_i=1)

    def mm_chunk(g, a, b):
        """One MatMulInteger (int32); u8 x s8 via int8 x int8 + 128 x column sums."""
        ta, tb = scalar(a), scalar(b)
        if ta == tb:
            return g.op("MatMulInteger", a, b)
        if ta == "Byte":  # (a - 128) b + 128 1 b
            return g.op("Add", g.op("MatMulInteger", as_int8(g, a), b),
                        g.op("Mul", const(g, 128, torch.int32), sum32(g, b, 0)))
        return g.op("Add", g.op("MatMulInteger", a, as_int8(g, b)),
                    g.op("Mul", const(g, 128, torch.int32), sum32(g, a, 1)))

    def matmul_sym(g, a, b):
        return mm_chunk(g, a, b)

    @sh.parse_args("v", "v", "is")
    def conv_sym(g, x, w, geom):
        kh, kw, sh_, sw, ph, pw, groups = geom
        return g.op("ConvInteger", x, w, kernel_shape_i=[kh, kw], strides_i=[sh_, sw],
                    pads_i=[ph, pw, ph, pw], group_i=groups)

    @sh.parse_args("v", "v", "is", "is")
    def conv_weight_sym(g, x, e, geom, d):
        # gW (O, Cg, kh, kw) as one ConvInteger: input x arranged (Cg, G N, H, W) (batch as
        # channels, grouped), weight e arranged (O, N, H', W') at dilation = stride.
        kh, kw, sh_, sw, ph, pw, groups = geom
        n, c, h, wd, o, oh, ow = d
        cg = c // groups
        xt = g.op("Reshape", x, const(g, [n, groups, cg, h, wd]))
        xt = g.op("Transpose", xt, perm_i=[2, 1, 0, 3, 4])
        xt = g.op("Reshape", xt, const(g, [cg, groups * n, h, wd]))
        et = g.op("Transpose", e, perm_i=[1, 0, 2, 3])
        gw = g.op("ConvInteger", xt, et, kernel_shape_i=[oh, ow], dilations_i=[sh_, sw],
                  pads_i=[ph, pw, ph, pw], group_i=groups)  # (Cg, O, >= kh, >= kw)
        full_h, full_w = h + 2 * ph - sh_ * (oh - 1), wd + 2 * pw - sw * (ow - 1)
        if (full_h, full_w) != (kh, kw):
            gw = g.op("Slice", gw, const(g, [0, 0]), const(g, [kh, kw]), const(g, [2, 3]))
        return g.op("Transpose", gw, perm_i=[1, 0, 2, 3])  # int32, as ConvInteger gives it

    def interleave(g, t, shape, axis, s, size):
        """Zeros between the entries of `t` (of `shape`) along `axis` (s - 1 of them), cut
        to `size`."""
        if s == 1:
            return t
        u = g.op("Unsqueeze", t, const(g, [axis + 1]))
        pads = [0] * (2 * (len(shape) + 1))
        pads[len(shape) + 1 + axis + 1] = s - 1  # after, on the new axis
        u = g.op("Pad", u, const(g, pads))
        merged = list(shape)
        merged[axis] = shape[axis] * s
        u = g.op("Reshape", u, const(g, merged))
        return g.op("Slice", u, const(g, [0]), const(g, [size]), const(g, [axis]))

    @sh.parse_args("v", "v", "is", "is")
    def conv_input_sym(g, e, w, geom, dd):
        # dx = ConvInteger(zero-interleaved e padded by k - 1 - p, flipped w with its
        # in/out channels swapped per group): the transposed convolution, exactly.
        kh, kw, sh_, sw, ph, pw, groups = geom
        h, wd, n, o, oh, ow, cg = dd
        lh = (oh - 1) * sh_ + 1
        d = interleave(g, e, [n, o, oh, ow], 2, sh_, lh)
        d = interleave(g, d, [n, o, lh, ow], 3, sw, (ow - 1) * sw + 1)
        extra_h = h - ((oh - 1) * sh_ - 2 * ph + kh)
        extra_w = wd - ((ow - 1) * sw - 2 * pw + kw)
        top, left = kh - 1 - ph, kw - 1 - pw
        d = g.op("Pad", d, const(g, [0, 0, top, left, 0, 0, top + extra_h, left + extra_w]))
        og = o // groups
        wt = g.op("Reshape", w, const(g, [groups, og, cg, kh, kw]))
        wt = g.op("Transpose", wt, perm_i=[0, 2, 1, 3, 4])
        wt = g.op("Reshape", wt, const(g, [groups * cg, og, kh, kw]))
        big = -(2**62)
        wt = g.op("Slice", wt, const(g, [-1, -1]), const(g, [big, big]), const(g, [2, 3]),
                  const(g, [-1, -1]))
        dx = g.op("ConvInteger", d, wt, kernel_shape_i=[kh, kw], group_i=groups)
        return cast(g, dx, "Long")

    for name, fn in (
        ("floor_div", floor_div_sym),
        ("floor_mod", floor_mod_sym),
        ("div_nonneg", div_nonneg_sym),
        ("matmul", matmul_sym),
        ("conv", conv_sym),
        ("conv_weight", conv_weight_sym),
        ("conv_input", conv_input_sym),
    ):
        register_custom_op_symbolic(f"edge_int::{name}", fn, OPSET)


_symbolics()
