"""The integer arithmetic of the quantized update: exact in eager torch, explicit in ONNX.

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
* `int_matmul(a, b)`, `int_conv2d(x, w)`, `int_conv2d_weight(x, e)`: products of 8-bit
  tensors (uint8 / int8), exact int64 results (the forward convolution: its int32
  accumulator, bounded at plan time). ONNX: MatMulInteger / ConvInteger (int32
  accumulators), split into chunks whose int32 sums cannot overflow, the chunks added in
  int64. A uint8 x int8 matmul is emitted as int8 x int8 plus 128 x the other operand's
  sums: onnxruntime's u8s8 MatMulInteger saturates int16 pair sums on AVX2 CPUs.
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


@_floor_div.register_fake
@_floor_mod.register_fake
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


def floor_shift(x: Tensor, k: int) -> Tensor:
    """floor(x / 2^k) for k > 0 (arithmetic shift right, rounds toward -inf); x * 2^-k else."""
    if k <= 0:
        return x * (1 << -k)
    return floor_div(x, 1 << k)


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
    """An int32 accumulator with saturation: the exact (int64) sum clipped to the int32 range."""
    return saturate(x, INT32_MIN, INT32_MAX)


def narrow(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Saturate to `dtype`'s range, then cast (Clip before Cast)."""
    info = torch.iinfo(dtype)
    return saturate(x, info.min, info.max).to(dtype)


def stochastic_shift(x: Tensor, k: int, noise: Tensor, noise_bits: int = NOISE_BITS) -> Tensor:
    """Unbiased stochastic rounding of x / 2^k with explicit random bits.

    `noise` holds integers uniform in [0, 2^noise_bits), one per element of x (any integer
    dtype). For 0 < k <= noise_bits the top k bits of the noise give r uniform in [0, 2^k) and
    the result is floor((x + r) / 2^k), whose mean is exactly x / 2^k. For k > noise_bits the
    low k - noise_bits bits of x are first dropped by a floor shift (a bias below 2^-noise_bits
    of one output unit). For k <= 0 the result is exact (x * 2^-k) and the noise is unused.
    """
    if k <= 0:
        return x * (1 << -k)
    r = widen(noise)
    if k > noise_bits:
        x = floor_shift(x, k - noise_bits)
        k = noise_bits
    else:
        r = floor_shift(r, noise_bits - k)
    return floor_shift(x + r, k)


# ---------------------------------------------------------------- exact eager products


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


def _mm_eager(a: Tensor, b: Tensor, bound: int) -> Tensor:
    """a @ b exact: float32 with the K axis cut into chunks of at most 2^24 / bound terms
    (bound = max |a_ik b_kj|), the chunks' float32 results added in float64."""
    k = a.shape[1]
    if not _fast_f32(a):
        return _to_int(a.double() @ b.double())
    kc = max(1, F32_EXACT // bound)
    if k <= kc:
        return _to_int(a.float() @ b.float())
    n = -(-k // kc)
    af = F.pad(a.float(), (0, n * kc - k))  # zero terms add nothing
    bf = F.pad(b.float(), (0, 0, 0, n * kc - k))
    parts = torch.bmm(af.reshape(a.shape[0], n, kc).transpose(0, 1), bf.reshape(n, kc, -1))
    return _to_int(parts.double().sum(0))


def _conv_eager(x: Tensor, w: Tensor) -> Tensor:
    """3x3 / padding-1 convolution, exact: float32 convolutions over groups of input channels
    small enough that 9 x channels x max|x| x max|w| < 2^24, added in float64."""
    if not _fast_f32(x):
        return _to_int(F.conv2d(x.double(), w.double(), padding=1)).to(torch.int32)
    cc = max(1, F32_EXACT // (9 * _max_abs(x) * _max_abs(w)))
    parts = [
        F.conv2d(x[:, c : c + cc].float(), w[:, c : c + cc].float(), padding=1)
        for c in range(0, x.shape[1], cc)
    ]
    if len(parts) == 1:  # one group: its float32 result is exact as it stands
        return parts[0].to(torch.int32)
    out = parts[0].double()
    for part in parts[1:]:
        out += part
    return _to_int(out).to(torch.int32)


def _conv_weight_eager(x: Tensor, e: Tensor) -> Tensor:
    """gW[o, c, i, j] = sum_{n,h,w} e[n,o,h,w] x[n,c,h+i-1,w+j-1], exact: for each of the nine
    kernel offsets one (O x NHW) @ (NHW x C) product; float32 with K cut into blocks whose
    sums stay below 2^24 (zero-padded once, shared by the nine), blocks added in float64."""
    n, c, h, w = x.shape
    o, k = e.shape[1], n * h * w
    g = torch.empty((o, c, 3, 3), dtype=torch.int64, device=x.device)
    if not _fast_f32(x):
        xp = F.pad(x.double(), (1, 1, 1, 1)).permute(0, 2, 3, 1)  # N, H+2, W+2, C
        em = e.double().permute(1, 0, 2, 3).reshape(o, k)
        for i in range(3):
            for j in range(3):
                g[:, :, i, j] = _to_int(em @ xp[:, i : i + h, j : j + w].reshape(k, c))
        return g
    kc = max(1, F32_EXACT // (_max_abs(x) * _max_abs(e)))
    chunks = -(-k // kc)
    em = torch.zeros((o, chunks * kc), dtype=torch.float32, device=x.device)
    em[:, :k].view(o, n, h, w).copy_(e.transpose(0, 1))  # converts while it copies
    em = em.reshape(o, chunks, kc).transpose(0, 1).contiguous()  # chunks, O, kc
    xp = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).contiguous()  # N, H+2, W+2, C, 8-bit
    xs = torch.zeros((chunks * kc, c), dtype=torch.float32, device=x.device)
    for i in range(3):
        for j in range(3):
            xs[:k].view(n, h, w, c).copy_(xp[:, i : i + h, j : j + w])
            g[:, :, i, j] = _to_int(torch.bmm(em, xs.view(chunks, kc, c)).double().sum(0))
    return g


# --------------------------------------------------------------- product custom ops


@torch.library.custom_op("edge_int::matmul", mutates_args=())
def _matmul(a: Tensor, b: Tensor) -> Tensor:
    return _mm_eager(a, b, _max_abs(a) * _max_abs(b))


@torch.library.custom_op("edge_int::conv3x3", mutates_args=())
def _conv3x3(x: Tensor, w: Tensor) -> Tensor:
    return _conv_eager(x, w)


@torch.library.custom_op("edge_int::conv3x3_weight", mutates_args=())
def _conv3x3_weight(x: Tensor, e: Tensor) -> Tensor:
    return _conv_weight_eager(x, e)


@_matmul.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int64)


@_conv3x3.register_fake
def _(x: Tensor, w: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], w.shape[0], x.shape[2], x.shape[3]), dtype=torch.int32)


@_conv3x3_weight.register_fake
def _(x: Tensor, e: Tensor) -> Tensor:
    return x.new_empty((e.shape[1], x.shape[1], 3, 3), dtype=torch.int64)


MATMUL_CHUNK = INT32_MAX // (2 * 128 * 256)  # K per MatMulInteger (its u8 x s8 form's worst case)


def _sum64(parts: list[Tensor]) -> Tensor:
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for 8-bit integer matrices (M, K) x (K, N): int64 result, exact (one
    MatMulInteger per MATMUL_CHUNK of K, whose int32 sum cannot overflow)."""
    _max_abs(a), _max_abs(b)
    k = dims(a)[1]
    return _sum64(
        [
            _matmul(a[:, s : s + MATMUL_CHUNK], b[s : s + MATMUL_CHUNK])
            for s in range(0, k, MATMUL_CHUNK)
        ]
    )


def int_conv2d(x: Tensor, w: Tensor) -> Tensor:
    """3x3, stride 1, padding 1 convolution of 8-bit x (N, C, H, W) by int8 w (O, C, 3, 3):
    an int32 accumulator, exact while fan-in x max|x| x max|w| < 2^31 (the plan checks it;
    ConvInteger's int32 output as it stands)."""
    _max_abs(x), _max_abs(w)
    return _conv3x3(x, w)


def conv_weight_chunk(h: int, w: int, x_max: int = 256, e_max: int = 128) -> int:
    """Images per ConvInteger such that one chunk's Hebbian sum stays inside int32."""
    return max(1, INT32_MAX // (h * w * x_max * e_max))


def int_conv2d_weight(x: Tensor, e: Tensor) -> Tensor:
    """The Hebbian product of a 3x3/padding-1 conv: gW[o, c, i, j] = sum_{n, h, w}
    e[n, o, h, w] * x[n, c, h + i - 1, w + j - 1] (zero outside), shape (O, C, 3, 3), int64,
    exact. x 8-bit, e int8. ONNX: a ConvInteger of the input by the error with the batch as
    the channel axis (the transposed-conv trick of `edge.nets.layer_backward`), one per chunk
    of the batch whose int32 sum cannot overflow, the chunks added in int64."""
    _max_abs(x), _max_abs(e)
    n, c, h, w = dims(x)
    step = conv_weight_chunk(h, w)
    parts = [_conv3x3_weight(x[s : s + step], e[s : s + step]) for s in range(0, n, step)]
    return _sum64(parts).reshape(dims(e)[1], c, 3, 3)  # a static shape for the checkers


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

    def scalar(v) -> str:
        return v.type().scalarType()  # "Byte" (uint8) | "Char" (int8)

    def to64(g, x):
        return g.op("Cast", x, to_i=sh.cast_pytorch_to_onnx["Long"])

    def as_int8(g, x):
        """uint8 -> x - 128 as int8 (in range by construction; clipped before the cast)."""
        x32 = g.op("Cast", x, to_i=sh.cast_pytorch_to_onnx["Int"])
        s = g.op("Sub", x32, const(g, 128, torch.int32))
        s = g.op("Clip", s, const(g, -128, torch.int32), const(g, 127, torch.int32))
        return g.op("Cast", s, to_i=sh.cast_pytorch_to_onnx["Char"])

    def sum32(g, x, axis):
        x32 = g.op("Cast", x, to_i=sh.cast_pytorch_to_onnx["Int"])
        return g.op("ReduceSum", x32, const(g, [axis]), keepdims_i=1)

    def mm_chunk(g, a, b):
        """One MatMulInteger (int32); u8 x s8 via int8 x int8 + 128 x column sums."""
        ta, tb = scalar(a), scalar(b)
        if ta == tb:
            return g.op("MatMulInteger", a, b)
        if ta == "Byte":  # (a - 128) b + 128 1 b
            return g.op(
                "Add",
                g.op("MatMulInteger", as_int8(g, a), b),
                g.op("Mul", const(g, 128, torch.int32), sum32(g, b, 0)),
            )
        return g.op(
            "Add",
            g.op("MatMulInteger", a, as_int8(g, b)),
            g.op("Mul", const(g, 128, torch.int32), sum32(g, a, 1)),
        )

    def matmul_sym(g, a, b):
        return to64(g, mm_chunk(g, a, b))

    def conv_sym(g, x, w):
        return g.op("ConvInteger", x, w, pads_i=[1, 1, 1, 1])

    def conv_weight_sym(g, x, e):
        xt = g.op("Transpose", x, perm_i=[1, 0, 2, 3])
        et = g.op("Transpose", e, perm_i=[1, 0, 2, 3])
        gw = g.op("ConvInteger", xt, et, pads_i=[1, 1, 1, 1])  # (C, O, 3, 3)
        return to64(g, g.op("Transpose", gw, perm_i=[1, 0, 2, 3]))

    for name, fn in (
        ("floor_div", floor_div_sym),
        ("floor_mod", floor_mod_sym),
        ("matmul", matmul_sym),
        ("conv3x3", conv_sym),
        ("conv3x3_weight", conv_weight_sym),
    ):
        register_custom_op_symbolic(f"edge_int::{name}", fn, OPSET)


_symbolics()
