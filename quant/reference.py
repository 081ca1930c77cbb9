"""A pure-integer NumPy reference of the integer training step, written apart from the torch code.

It checks `quant.integer.integer_step` (and every primitive's integer form) bit for bit, so it
shares none of its arithmetic: NumPy int64 arrays only, no floats anywhere in the arithmetic
path and no torch (it reads only plain data: the `NetSpec`, its blocks' primitive fields, the
`QuantPlan`). Rounding is spelled out on remainders (half to even: up where r > d - r, or
r == d - r and the quotient is odd), shifts are `>>` on int64, convolutions and their
adjoints are shifted tensor contractions (`np.einsum` per kernel offset), the max-pool is an
argmax over the stacked window positions, an activation followed by a max-pool is
differentiated unfused (route to the argmax, then mask at the full map: the fusion the torch
blocks make must give the same integers). Static error factors (1/(2N), 1/k^2) are exact
`Fraction`s that never enter the integers.

    Q(t, f, dtype, c)        an integer array t (int64) at real value t * 2^-f * c; `dtype`
                             names the width the value has in the step (uint8, int8, int32,
                             int64), which the max-pool padding, casts and 8-bit products read
    Env(plan, noise)         the plan's exponents and the step's random bits by key
    forward(prim, env, key, p, x) -> (y, saved);  adjoint(prim, env, key, p, saved, g, need_gx)
                             -> ({param: Q}, Q | None): every primitive, as the torch forms
    param_values(plan, qparams, key, prim) -> {short: Q}: forward values of the stores
    reference_forward(net, plan, qparams, x) -> [Q]: every block's 8-bit output
    reference_step(net, rule, plan, qparams, x1, x2, noise) -> (new qparams, [BlockLoss])
                             one CLAPP-family step (clapp, clapp++, clapp++dfb, clapp++both;
                             `rule`: a rule object, its integer form, a name, or `RuleTerms`)

The step, as `edge.step.local_step` runs it: both views stacked as one batch [x1; x2]; the top
code (feedback terms) from a forward pass with the incoming stores; then block by block:
forward, the hinge's error at the block's code, the block adjoint over row chunks of one view
(each chunk's Hebbian sums saturate at int32 on their own, the chunks are added in int64, and
every chunk reads the same random bits of its error roundings), then the block's updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np

from edge.errors import EdgeError
from edge.layers import Identity
from edge.nets import NetSpec
from quant.plan import QuantPlan

I64 = np.int64
NOISE_BITS = 16
W_MAX = 127  # signed 8-bit intermediates, weights and errors: [-127, 127]
RANGE = {"uint8": (0, 255), "int8": (-128, 127), "int16": (-(2**15), 2**15 - 1),
         "int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
NP_DTYPE = {"uint8": np.uint8, "int8": np.int8, "int16": np.int16, "int32": np.int32}
INT32_MIN, INT32_MAX = RANGE["int32"]
TERMS = {"clapp": (("", "same"),), "clapp++": (("", "same"),), "clapp++dfb": (("fb.", "top"),),
         "clapp++both": (("", "same"), ("fb.", "top"))}
Arrays = dict[str, np.ndarray]
Pair = tuple[int, int]


class Q(NamedTuple):
    """Integer values t (int64) whose real value is t * 2^-f * c, of width `dtype`."""

    t: np.ndarray
    f: int
    dtype: str = "int64"
    c: Fraction = Fraction(1)


def ints(x: Any) -> np.ndarray:
    """Any integer array as int64 (refuses floats: nothing here is ever rounded from one)."""
    a = np.asarray(x)
    if a.dtype.kind not in "iub":
        raise TypeError(f"the integer reference takes integer arrays, got {a.dtype}")
    return a.astype(I64)


# ------------------------------------------------------------------ elementwise integer ops


def floor_shift(x: np.ndarray, k: int) -> np.ndarray:
    """floor(x / 2^k) for k > 0 (arithmetic shift), x * 2^-k exactly for k <= 0."""
    return x >> k if k > 0 else x << -k


def div_round(x: np.ndarray, d: int) -> np.ndarray:
    """x / d rounded to nearest, ties to even: q + 1 where r > d - r, or r == d - r, q odd."""
    if d < 1:
        raise ValueError(f"divisor must be positive, got {d}")
    q, r = np.divmod(x, I64(d))
    return q + ((r > d - r) | ((r == d - r) & (q % 2 == 1)))


def round_shift(x: np.ndarray, k: int) -> np.ndarray:
    return x << -k if k <= 0 else div_round(x, 1 << k)


def stochastic_shift(x: np.ndarray, k: int, noise: np.ndarray) -> np.ndarray:
    """floor((x + r) / 2^k), r the top k of NOISE_BITS random bits (k > NOISE_BITS: the low
    k - NOISE_BITS bits of x dropped first); exact for k <= 0."""
    if k <= 0:
        return x << -k
    r = ints(noise)
    if k > NOISE_BITS:
        return ((x >> (k - NOISE_BITS)) + r) >> NOISE_BITS
    return (x + (r >> (NOISE_BITS - k))) >> k


def clip(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.minimum(np.maximum(x, lo), hi)


def narrow(x: np.ndarray, dtype: str) -> Q:
    """Saturate to `dtype`'s range (exponent 0: callers set theirs)."""
    return Q(clip(x, *RANGE[dtype]), 0, dtype)


def sat32(x: np.ndarray) -> np.ndarray:
    """Gradient saturation: symmetric, 2^16 inside the int32 range."""
    return clip(x, -(INT32_MAX - 2**16), INT32_MAX - 2**16)


def _eight_bit(*qs: Q) -> None:
    for q in qs:
        if q.dtype not in ("uint8", "int8"):
            raise TypeError(f"integer products take 8-bit operands, got {q.dtype}")


def matmul(a: Q, b: Q) -> np.ndarray:
    """Exact a @ b of 8-bit operands (int64)."""
    _eight_bit(a, b)
    return a.t @ b.t


def shift_pow2(six: int, f: int, up: bool) -> int:
    """6 * 2^f rounded down (up=False) or up, in integers."""
    if f >= 0:
        return six << f
    return -((-six) >> -f) if up else six >> -f


# ------------------------------------------------------------------ windows and convolutions


def _out(size: int, k: int, s: int, p: int) -> int:
    n = (size + 2 * p - k) // s + 1
    if size + 2 * p < k or n < 1:
        raise EdgeError(f"a window of {k} (padding {p}) does not fit a size of {size}")
    return n


def _offsets(k: Pair, s: Pair, out_hw: Pair):
    """(q, row slice, column slice) of every window position q = i kw + j, row major."""
    (kh, kw), (sh, sw), (oh, ow) = k, s, out_hw
    for i in range(kh):
        for j in range(kw):
            yield (i * kw + j, slice(i, i + sh * (oh - 1) + 1, sh),
                   slice(j, j + sw * (ow - 1) + 1, sw))


def _pad(x: np.ndarray, p: Pair, fill: int = 0) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])), constant_values=fill)


def _out_hw(hw: tuple[int, ...], k: Pair, s: Pair, p: Pair) -> Pair:
    return _out(hw[0], k[0], s[0], p[0]), _out(hw[1], k[1], s[1], p[1])


def windows(x: np.ndarray, k: Pair, s: Pair, p: Pair, fill: int = 0) -> np.ndarray:
    """(kh kw, N, C, H', W'): position q of every window of the padded map, stacked."""
    out_hw = _out_hw(x.shape[2:], k, s, p)
    xp = _pad(x, p, fill)
    return np.stack([xp[:, :, r, c] for _, r, c in _offsets(k, s, out_hw)])


def place(parts: np.ndarray, k: Pair, s: Pair, p: Pair, hw: Pair) -> np.ndarray:
    """The adjoint of `windows`: parts[q] (N, C, H', W') added back at window position q of
    a zero map, cropped to hw."""
    _, n, c, oh, ow = parts.shape
    t = np.zeros((n, c, hw[0] + 2 * p[0], hw[1] + 2 * p[1]), I64)
    for q, r, cc in _offsets(k, s, (oh, ow)):
        t[:, :, r, cc] += parts[q]
    return t[:, :, p[0] : p[0] + hw[0], p[1] : p[1] + hw[1]]


def conv2d(x: np.ndarray, w: np.ndarray, s: Pair, p: Pair, groups: int) -> np.ndarray:
    """y[n, o] = sum_{c, i, j} w[o, c, i, j] xpad[n, grp(o) Cg + c, h s + i, v s + j]."""
    n, _, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh, ow = _out_hw((h, wd), (kh, kw), s, p)
    xp, wg = _pad(x, p), w.reshape(groups, o // groups, cg, kh, kw)
    y = np.zeros((n, groups, o // groups, oh, ow), I64)
    for q, r, c in _offsets((kh, kw), s, (oh, ow)):
        xs = xp[:, :, r, c].reshape(n, groups, cg, oh, ow)
        y += np.einsum("ngchw,goc->ngohw", xs, wg[..., q // kw, q % kw])
    return y.reshape(n, o, oh, ow)


def conv2d_weight(x: np.ndarray, e: np.ndarray, k: Pair, s: Pair, p: Pair,
                  groups: int) -> np.ndarray:
    """gW[o, c, i, j] = sum_{n, h, v} e[n, o, h, v] xpad[n, grp(o) Cg + c, h s + i, v s + j]."""
    n, c, _, _ = x.shape
    o, oh, ow = e.shape[1:]
    cg, og = c // groups, o // groups
    xp, eg = _pad(x, p), e.reshape(n, groups, og, oh, ow)
    gw = np.zeros((groups, og, cg, k[0], k[1]), I64)
    for q, r, cc in _offsets(k, s, (oh, ow)):
        xs = xp[:, :, r, cc].reshape(n, groups, cg, oh, ow)
        gw[..., q // k[1], q % k[1]] = np.einsum("ngohw,ngchw->goc", eg, xs)
    return gw.reshape(o, cg, k[0], k[1])


def conv2d_input(e: np.ndarray, w: np.ndarray, s: Pair, p: Pair, groups: int,
                 hw: Pair) -> np.ndarray:
    """dx (N, C, H, W): every e[n, o, h, v] w[o, c, i, j] added at xpad[h s + i, v s + j]."""
    n, o, oh, ow = e.shape
    _, cg, kh, kw = w.shape
    eg, wg = e.reshape(n, groups, o // groups, oh, ow), w.reshape(groups, o // groups, cg, kh, kw)
    dx = np.zeros((n, groups, cg, hw[0] + 2 * p[0], hw[1] + 2 * p[1]), I64)
    for q, r, c in _offsets((kh, kw), s, (oh, ow)):
        dx[..., r, c] += np.einsum("ngohw,goc->ngchw", eg, wg[..., q // kw, q % kw])
    return dx.reshape(n, groups * cg, *dx.shape[3:])[:, :, p[0] : p[0] + hw[0],
                                                     p[1] : p[1] + hw[1]]


def max_pool(x: np.ndarray, k: Pair, s: Pair, p: Pair, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, off): each window's maximum and the first row-major position holding it (the
    padding holds `fill`, the minimum of the input's width)."""
    sl = windows(x, k, s, p, fill)
    off = np.argmax(sl, axis=0)  # numpy's argmax: the first maximum
    return np.take_along_axis(sl, off[None], 0)[0], off


def route(g: np.ndarray, off: np.ndarray, k: Pair, s: Pair, p: Pair, hw: Pair) -> np.ndarray:
    """Each window's error to its argmax position (added where windows overlap)."""
    parts = np.stack([np.where(off == q, g, 0) for q in range(k[0] * k[1])])
    return place(parts, k, s, p, hw)


def avg_pool(x: np.ndarray, k: Pair, s: Pair, p: Pair) -> np.ndarray:
    """round_half_even(window sum / (kh kw)), zero padding counted."""
    return div_round(windows(x, k, s, p).sum(0), k[0] * k[1])


def spread(g: np.ndarray, k: Pair, s: Pair, p: Pair, hw: Pair) -> np.ndarray:
    """The window sum's adjoint: g at every position of its window."""
    return place(np.broadcast_to(g, (k[0] * k[1], *g.shape)), k, s, p, hw)


# ------------------------------------------------------------------ plan, noise, parameters


class Env:
    """The plan's exponents and the step's random bits (name -> int array), checked by key."""

    def __init__(self, plan: QuantPlan, noise: Arrays | None = None):
        self.plan, self.noise = plan, noise or {}

    def exp(self, key: str) -> int:
        if key not in self.plan.exps:
            raise EdgeError(f"reference: the plan has no exponent for {key!r}")
        return int(self.plan.exps[key])

    def bits(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.noise:
            raise EdgeError(f"reference: no random bits for {key!r}")
        r = ints(self.noise[key])
        if r.shape != tuple(shape):
            raise EdgeError(f"reference: random bits {key!r} have shape {r.shape}, need {shape}")
        if r.min(initial=0) < 0 or r.max(initial=0) >= 1 << NOISE_BITS:
            raise EdgeError(f"reference: random bits {key!r} outside [0, 2^{NOISE_BITS})")
        return r

    def requant_error(self, key: str, acc: Q) -> Q:
        """An inner gradient as int8 [-127, 127] at `<key>.gx`, stochastically rounded with
        the bits `err.<key without enc.>.gx`."""
        f = self.exp(key + ".gx")
        bits = self.bits("err." + key.removeprefix("enc.") + ".gx", acc.t.shape)
        return Q(clip(stochastic_shift(acc.t, acc.f - f, bits), -W_MAX, W_MAX), f, "int32", acc.c)

    def requant8(self, key: str, acc: Q) -> Q:
        """A prediction accumulator as int8 [-127, 127] at its exponent (half to even)."""
        f = self.exp(key)
        return Q(clip(round_shift(acc.t, acc.f - f), -W_MAX, W_MAX), f, "int8")


def store_value(plan: QuantPlan, qparams: Arrays, name: str) -> Q:
    """What the forward pass multiplies by: floor_shift(store, shift), int8 (int32 biases)."""
    pp = plan.params[name]
    dtype = "int32" if pp.dtype == "int32" else "int8"
    t = narrow(floor_shift(ints(qparams[name]), pp.shift), dtype).t
    return Q(t, pp.exponent - pp.shift, dtype)


def param_values(plan: QuantPlan, qparams: Arrays, key: str, prim: Any) -> dict[str, Q]:
    if prim.op == "bn":
        raise EdgeError(f"{key}: BatchNorm has no integer form; fold it first "
                        "(edge.nets.fold_batchnorm)")
    names = {"conv": ("w", "b"), "linear": ("w", "b")}.get(prim.op, ())
    return {s: store_value(plan, qparams, f"{key}.{s}") for s in names}


def apply_update(plan: QuantPlan, name: str, store: np.ndarray, grad: np.ndarray,
                 noise: np.ndarray) -> np.ndarray:
    """store' = clip(store + stochastic_shift(-G, K), lo, hi) in the store's dtype."""
    pp = plan.params[name]
    new = ints(store) + stochastic_shift(-grad, pp.lr_shift, noise)
    return clip(new, pp.lo, pp.hi).astype(NP_DTYPE[pp.dtype])


# ------------------------------------------------------------------ primitives


ACTIVATIONS = ("relu", "relu6", "identity", "leakyrelu")
WEIGHTED = ("conv", "linear")


def act_range(op: str, f: int) -> Pair:
    if op in ("identity", "leakyrelu"):
        return RANGE["int8"]
    return (0, min(255, shift_pow2(6, f, up=False))) if op == "relu6" else (0, 255)


def leaky_shift(slope: float) -> int:
    k = -math.log2(slope)
    if k != int(k):
        raise EdgeError(f"leakyrelu slope {slope} has no integer form")
    return int(k)


def act_mask(op: str, y: Q) -> np.ndarray | None:
    """Where an activation passes the error, read off its 8-bit output (None: everywhere)."""
    if op == "relu":
        return y.t > 0
    if op == "relu6":
        six = shift_pow2(6, y.f, up=True)  # y < 6 * 2^f exactly for integers y
        return (y.t > 0) & (y.t < six) if six <= 255 else y.t > 0
    return None


def forward(prim: Any, env: Env, key: str, p: dict[str, Q], x: Q) -> tuple[Q, Any]:
    """The integer forward of one primitive: (y, what its adjoint reads)."""
    op = prim.op
    if op == "conv":
        _eight_bit(x, p["w"])
        acc = conv2d(x.t, p["w"].t, prim.stride, prim.padding, prim.groups)
        acc = acc + p["b"].t[None, :, None, None]
        if acc.size and (acc.min() < INT32_MIN or acc.max() > INT32_MAX):
            raise EdgeError(f"{key}: the conv accumulator leaves int32")
        return Q(acc, x.f + p["w"].f, "int32"), x
    if op == "linear":
        acc = matmul(x, Q(p["w"].t.T, 0, p["w"].dtype)) + p["b"].t
        return Q(acc, x.f + p["w"].f), x
    if op == "leakyrelu":  # slope 2^-k: the negative side k bits further down
        f, k = env.exp(key), leaky_shift(prim.slope)
        t = np.where(x.t >= 0, round_shift(x.t, x.f - f), round_shift(x.t, x.f - f + k))
        out = Q(clip(t, *act_range(op, f)), f, "int8")
        return out, out
    if op in ACTIVATIONS:
        f = env.exp(key)
        y = clip(round_shift(x.t, x.f - f), *act_range(op, f))
        out = Q(y, f, "int8" if op == "identity" else "uint8")
        return out, out
    if op == "maxpool":
        if prim.k[0] * prim.k[1] > 256:
            raise EdgeError(f"{key}: max-pool window {prim.k} has more than 256 positions")
        y, off = max_pool(x.t, prim.k, prim.stride, prim.padding, RANGE[x.dtype][0])
        return Q(y, x.f, x.dtype), (off, x.t.shape[2:])
    if op == "avgpool":
        return Q(avg_pool(x.t, prim.k, prim.stride, prim.padding), x.f, x.dtype), x.t.shape[1:]
    if op == "gap":
        _, c, h, w = x.t.shape
        return Q(div_round(x.t.sum((2, 3)), h * w), x.f, x.dtype), (c, h, w)
    if op == "flatten":
        return Q(x.t.reshape(x.t.shape[0], -1), x.f, x.dtype), x.t.shape[1:]
    if op == "bn":
        raise EdgeError(f"{key}: BatchNorm has no integer form; fold it first")
    raise EdgeError(f"{key}: no integer reference for op {op!r}")


def adjoint(prim: Any, env: Env, key: str, p: dict[str, Q], saved: Any, g: Q,
            need_gx: bool) -> tuple[dict[str, Q], Q | None]:
    """The integer adjoint of one primitive: ({param: gradient}, input gradient or None)."""
    op = prim.op
    if op in WEIGHTED:
        x, w = saved, p["w"]
        # the int8 error e feeds all three products, as documented (dW = Hebbian(x, e), db =
        # sum e, dx = requant(e W)); the torch forms sum the unsaturated g into db
        e8 = Q(narrow(g.t, "int8").t, g.f, "int8", g.c)
        if op == "conv":
            gw = conv2d_weight(x.t, e8.t, prim.k, prim.stride, prim.padding, prim.groups)
            gb = e8.t.sum((0, 2, 3))
        else:
            gw, gb = matmul(Q(e8.t.T, 0, "int8"), x), e8.t.sum(0)
        _eight_bit(x)
        grads = {"w": Q(sat32(gw), x.f + g.f, "int32", g.c),
                 "b": Q(sat32(gb), g.f, "int32", g.c)}
        if not need_gx:
            return grads, None
        if op == "conv":
            acc = conv2d_input(e8.t, w.t, prim.stride, prim.padding, prim.groups,
                               x.t.shape[2:])
        else:
            acc = matmul(e8, w)
        return grads, env.requant_error(key, Q(acc, g.f + w.f, "int64", g.c))
    if op == "leakyrelu":
        low = round_shift(g.t, leaky_shift(prim.slope))
        return {}, Q(np.where(saved.t > 0, g.t, low), g.f, g.dtype, g.c)
    if op in ACTIVATIONS:
        m = act_mask(op, saved)
        return {}, g if m is None else Q(np.where(m, g.t, 0), g.f, g.dtype, g.c)
    if op == "maxpool":
        off, hw = saved
        return {}, Q(route(g.t, off, prim.k, prim.stride, prim.padding, hw), g.f, g.dtype, g.c)
    if op == "avgpool":
        kk = prim.k[0] * prim.k[1]
        t = spread(g.t, prim.k, prim.stride, prim.padding, saved[1:])
        return {}, Q(t, g.f, g.dtype, g.c / kk)
    if op == "gap":
        c, h, w = saved
        t = np.broadcast_to(g.t[:, :, None, None], (g.t.shape[0], c, h, w))
        return {}, Q(t, g.f, g.dtype, g.c / (h * w))
    if op == "flatten":
        return {}, Q(g.t.reshape(-1, *saved), g.f, g.dtype, g.c)
    raise EdgeError(f"{key}: no integer reference for op {op!r}")


# ------------------------------------------------------------------ blocks

Chain = list[tuple[str, Any]]


def chains(block: Any, i: int) -> tuple[Chain, Chain | None, Chain]:
    """Block i's body, shortcut (None: no residual) and post as the quantized step runs them:
    an Identity `<key>.q` after every conv / linear that no activation follows, and
    `enc.{i}.add.q` after a residual add unless post starts with an activation."""

    def lower(chain: Chain, first: str | None = None) -> Chain:
        out: Chain = []
        if first is not None and not (chain and chain[0][1].op in ACTIVATIONS):
            out.append((first, Identity()))
        for j, (key, prim) in enumerate(chain):
            out.append((key, prim))
            nxt = chain[j + 1][1].op if j + 1 < len(chain) else None
            if prim.op in WEIGHTED and nxt not in ACTIVATIONS:
                out.append((f"{key}.q", Identity()))
        return out

    for p in (*block.body, *(block.shortcut or ()), *block.post):
        if p.op == "bn":
            raise EdgeError(f"block {i}: BatchNorm has no integer form; fold it into the conv "
                            "before it first (edge.nets.fold_batchnorm)")
    body = lower([(f"enc.{i}.{j}", p) for j, p in enumerate(block.body)])
    if block.shortcut is None:
        return body, None, lower([(f"enc.{i}.p{j}", p) for j, p in enumerate(block.post)])
    short = lower([(f"enc.{i}.s{j}", p) for j, p in enumerate(block.shortcut)])
    post = lower([(f"enc.{i}.p{j}", p) for j, p in enumerate(block.post)], f"enc.{i}.add.q")
    return body, short, post


def _values(env: Env, qparams: Arrays, chain: Chain) -> dict[str, dict[str, Q]]:
    return {key: param_values(env.plan, qparams, key, prim) for key, prim in chain}


def _run(env: Env, vals: dict, chain: Chain, x: Q) -> tuple[Q, list]:
    saved = []
    for key, prim in chain:
        x, s = forward(prim, env, key, vals[key], x)
        saved.append(s)
    return x, saved


def _back(env: Env, vals: dict, chain: Chain, saved: list, g: Q,
          need_first: bool) -> tuple[dict[str, Q], Q]:
    """Reverse through a chain; a primitive gives its input gradient when one before it in
    the chain has parameters (or need_first, for the chain after a residual add)."""
    grads: dict[str, Q] = {}
    for j in range(len(chain) - 1, -1, -1):
        key, prim = chain[j]
        need = need_first or any(p.trainable for _, p in chain[:j])
        gp, gx = adjoint(prim, env, key, vals[key], saved[j], g, need)
        grads.update({f"{key}.{s}": v for s, v in gp.items()})
        if gx is None:
            break
        g = gx
    return grads, g


def add(a: Q, b: Q) -> Q:
    """The residual add at the finer exponent (exact left shifts); int32 wide while the
    shift is at most 22 bits, else int64."""
    f = max(a.f, b.f)
    wide = "int32" if abs(a.f - b.f) <= 22 else "int64"
    return Q((a.t << (f - a.f)) + (b.t << (f - b.f)), f, wide)


def block_forward(env: Env, qparams: Arrays, block: Any, i: int, x: Q) -> tuple[Q, dict]:
    body, short, post = chains(block, i)
    vals = _values(env, qparams, body + (short or []) + post)
    h, sb = _run(env, vals, body, x)
    saved: dict[str, Any] = {"vals": vals, "body": sb}
    if short is not None:
        s, saved["short"] = _run(env, vals, short, x)
        h = add(h, s)
    y, saved["post"] = _run(env, vals, post, h)
    return y, saved


def block_adjoint(env: Env, block: Any, i: int, saved: dict, g: Q) -> dict[str, Q]:
    body, short, post = chains(block, i)
    vals = saved["vals"]
    grads, g = _back(env, vals, post, saved["post"], g, True)
    if short is not None and short:
        grads.update(_back(env, vals, short, saved["short"], g, False)[0])
    grads.update(_back(env, vals, body, saved["body"], g, False)[0])
    return grads


def _rows(saved: Any, a: int, b: int) -> Any:
    """`saved` restricted to batch rows [a, b) (Q and arrays with the batch first)."""
    if isinstance(saved, Q):
        return Q(saved.t[a:b], saved.f, saved.dtype, saved.c)
    if isinstance(saved, np.ndarray) and saved.ndim >= 2:
        return saved[a:b]
    if isinstance(saved, dict):
        return {k: v if k == "vals" else _rows(v, a, b) for k, v in saved.items()}
    if isinstance(saved, list):
        return [_rows(v, a, b) for v in saved]
    if isinstance(saved, tuple) and saved and isinstance(saved[0], np.ndarray):
        return (_rows(saved[0], a, b), *saved[1:])  # max-pool: (offsets, hw)
    return saved


def reference_forward(net: NetSpec, plan: QuantPlan, qparams: Arrays, x: np.ndarray) -> list[Q]:
    """Every block's output for the int8 input x at 2^-f_in."""
    env, h, outs = Env(plan), Q(ints(x), plan.f_in, "int8"), []
    for i, b in enumerate(net.blocks):
        h, _ = block_forward(env, qparams, b, i, h)
        outs.append(h)
    return outs


# ------------------------------------------------------------------ the CLAPP-family hinge


@dataclass(frozen=True)
class RuleTerms:
    """What the reference needs of a CLAPP-family rule: its hinge terms (predictor key prefix,
    context "same" | "top") and every block's code pooling (None: the global average of a map;
    k: k x k average, stride k, floor crop; 1: none; flat outputs are used as they are)."""

    terms: tuple[tuple[str, str], ...]
    kernels: tuple[int | None, ...]


def rule_terms(rule: Any, net: NetSpec) -> RuleTerms:
    """RuleTerms of a rule object (or its integer form), a rule name (default pooling), or
    RuleTerms as they are."""
    if isinstance(rule, RuleTerms):
        return rule
    shapes = net.shapes()
    if isinstance(rule, str):
        if rule not in TERMS:
            raise EdgeError(f"reference: no integer rule {rule!r}; valid: {', '.join(TERMS)}")
        if rule == "clapp":
            return RuleTerms(TERMS[rule], tuple(None for _ in shapes))
        return RuleTerms(TERMS[rule], tuple(1 if len(s) == 1 else max(1, min(s[1:]) // 2)
                                            for s in shapes))
    rule = getattr(rule, "rule", rule)  # IntHinge -> its HingeRule
    return RuleTerms(tuple(rule.terms), tuple(rule.code_kernel(i, s, len(shapes))
                                              for i, s in enumerate(shapes)))


def code_forward(y: Q, k: int | None) -> tuple[Q, Any]:
    """The pooled code, flattened: (z, what its adjoint reads)."""
    if y.t.ndim == 2 or k == 1:
        return Q(y.t.reshape(y.t.shape[0], -1), y.f, y.dtype), (y.t.shape[1:], None)
    if k is None:
        z = div_round(y.t.sum((2, 3)), y.t.shape[2] * y.t.shape[3])
    else:
        z = avg_pool(y.t, (k, k), (k, k), (0, 0))
    return Q(z.reshape(z.shape[0], -1), y.f, y.dtype), (z.shape[1:], y.t.shape[1:])


def code_adjoint(gz: Q, saved: Any, k: int | None) -> Q:
    zshape, yshape = saved
    g = gz.t.reshape(-1, *zshape)
    if yshape is None:
        return Q(g, gz.f, gz.dtype, gz.c)
    c, h, w = yshape
    if k is None:
        return Q(np.broadcast_to(g[:, :, None, None], (g.shape[0], c, h, w)), gz.f, gz.dtype,
                 gz.c / (h * w))
    return Q(spread(g, (k, k), (k, k), (0, 0), (h, w)), gz.f, gz.dtype, gz.c / (k * k))


class BlockLoss(NamedTuple):
    """One block's integer hinge: per term, the sum of the positive margins over the 4N pairs
    and its threshold thr (a margin of thr is 1 in real units); n images per view."""

    margins: tuple[int, ...]
    thresholds: tuple[int, ...]
    n: int

    @property
    def exact(self) -> Fraction:
        return sum((Fraction(m, t * 2 * self.n) for m, t in zip(self.margins, self.thresholds,
                                                                strict=True)), Fraction(0))

    @property
    def value(self) -> float:
        """The loss as the torch step reports it (float64 per term, summed, float32)."""
        total = np.float64(0)
        for m, t in zip(self.margins, self.thresholds, strict=True):
            total = total + np.float64(m) / np.float64(t * 2 * self.n)
        return float(np.float32(total))


def threshold(e: int) -> Pair:
    """(thr, unit): real u < 1 iff u_int * unit < thr for u_int at 2^-e."""
    return (1 << e, 1) if e >= 0 else (1, 1 << -e)


def _roll(a: np.ndarray) -> np.ndarray:
    return np.roll(a, -1, axis=0)  # row i gets row i + 1 (mod N): the negative pairs


def hinge(env: Env, qparams: Arrays, spec: RuleTerms, i: int, y: Q,
          top: Q | None) -> tuple[BlockLoss, Q, dict[str, Q]]:
    """Block i's integer hinge terms: (loss, dL/dy as an int32 error, predictor gradients)."""
    k = spec.kernels[i]
    z, zs = code_forward(y, k)
    n = z.t.shape[0] // 2
    z1, z2 = z.t[:n], z.t[n:]
    grads: dict[str, Q] = {}
    margins, thrs, parts = [], [], []
    for prefix, kind in spec.terms:
        c = z if kind == "same" else top
        if c is None:
            raise EdgeError("reference: a feedback term needs the top code")
        key = f"rule.{i}.{prefix}"
        lowrank = key + "U" in qparams
        if lowrank:
            U, V = (store_value(env.plan, qparams, key + s) for s in "UV")
            t = env.requant8(key + "t", Q(matmul(c, V), c.f + V.f))
            q = env.requant8(key + "q", Q(matmul(t, Q(U.t.T, 0, "int8")), t.f + U.f))
        else:
            B = store_value(env.plan, qparams, key + "B")
            q = env.requant8(key + "q", Q(matmul(c, Q(B.t.T, 0, "int8")), c.f + B.f))
        thr, unit = threshold(z.f + q.f)
        q1, q2, c1, c2 = q.t[:n], q.t[n:], c.t[:n], c.t[n:]
        anchors, preds = (z1, z1, z2, z2), (q2, _roll(q2), q1, _roll(q1))
        gz, signs, total = np.zeros((2 * n, z.t.shape[1]), I64), [], 0
        for j, (a, pr) in enumerate(zip(anchors, preds, strict=True)):
            u = np.einsum("nd,nd->n", a, pr) * unit
            margin = thr - u if j % 2 == 0 else thr + u  # positive pairs, then negative
            m = (margin > 0).astype(I64) * (-1 if j % 2 == 0 else 1)
            total += int(np.maximum(margin, 0).sum())
            gz[(j // 2) * n : (j // 2 + 1) * n] += m[:, None] * pr
            signs.append(m)
        margins.append(total)
        thrs.append(thr)
        parts.append((gz, q.f))
        M = np.concatenate(signs)[:, None]
        C = Q(np.concatenate((c2, _roll(c2), c1, _roll(c1))), c.f, c.dtype)
        Z = Q(np.concatenate(anchors), z.f, z.dtype)
        s = Fraction(1, 2 * n)
        if lowrank:
            t1, t2 = t.t[:n], t.t[n:]
            mt = Q(narrow(M * np.concatenate((t2, _roll(t2), t1, _roll(t1))), "int8").t, t.f,
                   "int8")
            au = env.requant8(key + "au", Q(M * matmul(Z, U), z.f + U.f))
            grads[key + "U"] = Q(sat32(matmul(Q(Z.t.T, 0, Z.dtype), mt)), z.f + t.f, "int32", s)
            grads[key + "V"] = Q(sat32(matmul(Q(C.t.T, 0, C.dtype), au)), c.f + au.f, "int32",
                                 s)
        else:
            _eight_bit(Z, C)
            A = M * Z.t  # rows m z (the step splits the sign off: 8-bit products)
            grads[key + "B"] = Q(sat32(A.T @ C.t), z.f + c.f, "int32", s)
    fine = max(f for _, f in parts)
    gz = sum(g << (fine - f) for g, f in parts)
    shift = (sum(2 << (fine - f) for _, f in parts) - 1).bit_length()  # ceil(log2(sum))
    e = stochastic_shift(gz, shift, env.bits(f"err.{i}.z", gz.shape))
    e = Q(clip(e, -W_MAX, W_MAX), fine - shift, "int32", Fraction(1, 2 * n))
    return BlockLoss(tuple(margins), tuple(thrs), n), code_adjoint(e, zs, k), grads


def reference_step(net: NetSpec, rule: Any, plan: QuantPlan, qparams: Arrays, x1: np.ndarray,
                   x2: np.ndarray, noise: Arrays) -> tuple[Arrays, list[BlockLoss]]:
    """One integer CLAPP-family step: (stores, int8 views at 2^-f_in, random bits) -> (new
    stores in their plan dtypes, every block's integer hinge)."""
    spec = rule_terms(rule, net)
    env = Env(plan, noise)
    x = Q(np.concatenate((ints(x1), ints(x2))), plan.f_in, "int8")
    n = x.t.shape[0] // 2
    top = None
    if any(kind == "top" for _, kind in spec.terms):
        h = x
        for i, b in enumerate(net.blocks):
            h, _ = block_forward(env, qparams, b, i, h)
        top = code_forward(h, spec.kernels[-1])[0]
    new = {k: np.array(v) for k, v in qparams.items()}
    losses = []
    for i, b in enumerate(net.blocks):
        y, saved = block_forward(env, qparams, b, i, x)
        loss, gy, grads = hinge(env, qparams, spec, i, y, top)
        for a in range(0, 2 * n, n):  # one view's rows per adjoint chunk
            part = block_adjoint(env, b, i, _rows(saved, a, a + n),
                                 Q(gy.t[a : a + n], gy.f, gy.dtype, gy.c))
            for name, g in part.items():
                grads[name] = g if name not in grads else Q(grads[name].t + g.t, g.f, g.dtype,
                                                            g.c)
        for name, g in grads.items():
            new[name] = apply_update(plan, name, qparams[name], g.t,
                                     env.bits(name, qparams[name].shape))
        losses.append(loss)
        x = y
    return new, losses
