"""A pure-integer NumPy reference of the integer step, written apart from the torch code.

NumPy int64 only (no floats anywhere, no torch): shifts are `>>` on int64 arrays, rounding is
spelled out on remainders, convolutions are nine shifted tensor contractions, the max-pool
is an argmax over the four window positions. It reads the same `QuantPlan` and must give
the torch step's result bit for bit (`tests/test_quant_integer.py`).

`reference_step(net, plan, qparams, x1, x2, noise) -> (new_qparams, layer_loss_int)`, all
arrays numpy; layer_loss_int[i] is the integer hinge sum (real loss = it / (thr * 2N)).
"""

from __future__ import annotations

import numpy as np

from edge.nets import NetSpec
from quant.plan import QuantPlan

I64 = np.int64
LO32, HI32 = -(2**31), 2**31 - 1
Arrays = dict[str, np.ndarray]


def rshift_floor(x: np.ndarray, k: int) -> np.ndarray:
    return x >> k if k > 0 else x << (-k)


def rshift_round_even(x: np.ndarray, k: int) -> np.ndarray:
    if k <= 0:
        return x << (-k)
    q = x >> k
    r = x & ((1 << k) - 1)
    half = 1 << (k - 1)
    return q + ((r > half) | ((r == half) & ((q & 1) == 1))).astype(I64)


def div_round_even(x: np.ndarray, d: int) -> np.ndarray:
    q = np.floor_divide(x, d)
    r = x - q * d
    return q + ((2 * r > d) | ((2 * r == d) & (np.mod(q, 2) == 1))).astype(I64)


def stochastic(x: np.ndarray, k: int, noise: np.ndarray, bits: int = 16) -> np.ndarray:
    if k <= 0:
        return x << (-k)
    noise = noise.astype(I64)
    if k > bits:
        return ((x >> (k - bits)) + noise) >> bits
    return (x + (noise >> (bits - k))) >> k


def conv3x3(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    n, _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd), I64)
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i : i + h, j : j + wd], w[:, :, i, j])
    return out


def conv3x3_weight_grad(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    _, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    g = np.zeros((e.shape[1], c, 3, 3), I64)
    for i in range(3):
        for j in range(3):
            g[:, :, i, j] = np.einsum("nohw,nchw->oc", e, xp[:, :, i : i + h, j : j + wd])
    return g


def pool_first_max(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, c, h, w = a.shape
    hp, wp = h // 2, w // 2
    win = a[:, :, : 2 * hp, : 2 * wp].reshape(n, c, hp, 2, wp, 2).transpose(0, 1, 2, 4, 3, 5)
    win = win.reshape(n, c, hp, wp, 4)  # positions (0,0), (0,1), (1,0), (1,1)
    idx = np.argmax(win, axis=-1)  # the first maximum
    return np.take_along_axis(win, idx[..., None], -1)[..., 0], idx


def unpool_first_max(g: np.ndarray, idx: np.ndarray, h: int, w: int) -> np.ndarray:
    n, c, hp, wp = g.shape
    out = np.zeros((n, c, h, w), I64)
    for pos in range(4):
        i, j = divmod(pos, 2)
        out[:, :, i : 2 * hp : 2, j : 2 * wp : 2] = np.where(idx == pos, g, 0)
    return out


def code(y: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    if y.ndim == 2:
        return y
    n, c, h, w = y.shape
    kh, kw = window
    hp, wp = h // kh, w // kw
    s = y[:, :, : hp * kh, : wp * kw].reshape(n, c, hp, kh, wp, kw).sum(axis=(3, 5))
    return div_round_even(s.reshape(n, -1), kh * kw)


def spread(g: np.ndarray, shape: tuple[int, ...], window: tuple[int, int]) -> np.ndarray:
    if len(shape) == 2:
        return g
    n, c, h, w = shape
    kh, kw = window
    hp, wp = h // kh, w // kw
    out = np.zeros(shape, I64)
    blocks = np.repeat(np.repeat(g.reshape(n, c, hp, wp), kh, axis=2), kw, axis=3)
    out[:, :, : hp * kh, : wp * kw] = blocks
    return out


def fwd(plan: QuantPlan, q: Arrays, i: int, name: str) -> np.ndarray:
    return rshift_floor(q[name].astype(I64), plan.params[name].shift)


def layer(net: NetSpec, plan: QuantPlan, q: Arrays, i: int, x: np.ndarray):
    """-> (input as used, uint8 output values, pool argmax or None, pre-pool (H, W))."""
    lp, spec = plan.layers[i], net.layers[i]
    w, b = fwd(plan, q, i, f"enc.{i}.w"), fwd(plan, q, i, f"enc.{i}.b")
    idx, hw = None, None
    if spec.kind == "linear":
        x = x.reshape(x.shape[0], -1)
        acc = x @ w.T + b
    else:
        acc = conv3x3(x, w) + b[None, :, None, None]
        if spec.pool:
            hw = acc.shape[2:]
            acc, idx = pool_first_max(acc)
    y = np.clip(rshift_round_even(acc, lp.f_x + lp.f_w - lp.f_y), 0, 255)
    return x, y, idx, hw


def requant8(acc: np.ndarray, k: int) -> np.ndarray:
    return np.clip(rshift_round_even(acc, k), -127, 127)


def hinge(plan: QuantPlan, q: Arrays, i: int, z: np.ndarray, top: np.ndarray | None):
    """-> (error at the codes (2N, D), predictor gradients, integer loss)."""
    lp, n = plan.layers[i], plan.batch
    e = lp.f_y + lp.f_q
    thr, unit = (1 << e, 1) if e >= 0 else (1, 1 << -e)
    z1, z2 = z[:n], z[n:]
    g1, g2 = np.zeros_like(z1), np.zeros_like(z2)
    grads, loss = {}, 0
    for prefix, kind in lp.terms:
        if kind == "same":
            c1, c2, f_c = z1, z2, lp.f_y
        else:
            c1, c2, f_c = top[:n], top[n:], plan.layers[-1].f_y
        key = f"rule.{i}.{prefix}"
        low = key + "U" in q
        if low:
            U, V = fwd(plan, q, i, key + "U"), fwd(plan, q, i, key + "V")
            fU = plan.params[key + "U"].exponent - plan.params[key + "U"].shift
            fV = plan.params[key + "V"].exponent - plan.params[key + "V"].shift
            t1 = requant8(c1 @ V, f_c + fV - lp.f_t)
            t2 = requant8(c2 @ V, f_c + fV - lp.f_t)
            p1 = requant8(t1 @ U.T, lp.f_t + fU - lp.f_q)
            p2 = requant8(t2 @ U.T, lp.f_t + fU - lp.f_q)
        else:
            B = fwd(plan, q, i, key + "B")
            fB = plan.params[key + "B"].exponent - plan.params[key + "B"].shift
            p1, p2 = requant8(c1 @ B.T, f_c + fB - lp.f_q), requant8(c2 @ B.T, f_c + fB - lp.f_q)
        nxt = lambda a: np.concatenate((a[1:], a[:1]))  # noqa: E731  row i <- row i + 1
        rows, ctxs, ts = [], [], []
        t1, t2 = (t1, t2) if low else (c1, c2)  # unused for a full B
        for anchor, pred, ctx, t, sign, g in (
            (z1, p2, c2, t2, 1, g1),
            (z1, nxt(p2), nxt(c2), nxt(t2), -1, g1),
            (z2, p1, c1, t1, 1, g2),
            (z2, nxt(p1), nxt(c1), nxt(t1), -1, g2),
        ):
            u = (anchor * pred).sum(axis=1) * unit
            margin = thr - sign * u
            active = (margin > 0).astype(I64)
            loss += int(np.maximum(margin, 0).sum())
            m = -sign * active
            g += m[:, None] * pred
            rows.append(m[:, None] * anchor)
            ctxs.append(ctx)
            ts.append(t)
        A, C = np.concatenate(rows), np.concatenate(ctxs)
        if low:
            au = requant8(A @ U, lp.f_y + fU - lp.f_au)
            grads[key + "U"] = np.clip(A.T @ np.concatenate(ts), LO32, HI32)
            grads[key + "V"] = np.clip(C.T @ au, LO32, HI32)
        else:
            grads[key + "B"] = np.clip(A.T @ C, LO32, HI32)
    return np.concatenate((g1, g2)), grads, loss


def reference_step(
    net: NetSpec, plan: QuantPlan, qparams: Arrays, x1: np.ndarray, x2: np.ndarray, noise: Arrays
) -> tuple[Arrays, list[int]]:
    q = {k: np.asarray(v) for k, v in qparams.items()}
    new = dict(q)
    x = np.concatenate((x1, x2)).astype(I64)
    top = None
    if any(kind == "top" for lp in plan.layers for _, kind in lp.terms):
        t = x
        for i in range(len(net.layers)):
            t = layer(net, plan, q, i, t)[1]
        top = code(t, plan.layers[-1].window)
    losses = []
    for i, spec in enumerate(net.layers):
        lp = plan.layers[i]
        xin, y, idx, hw = layer(net, plan, q, i, x)
        gz, grads, loss = hinge(plan, q, i, code(y, lp.window), top)
        e = np.clip(stochastic(gz, lp.e_shift, noise[f"err.{i}.z"]), -127, 127)
        e = spread(e, y.shape, lp.window) * (y > 0)
        if spec.kind == "linear":
            gw, gb = e.T @ xin, e.sum(axis=0)
        else:
            if idx is not None:
                e = unpool_first_max(e, idx, *hw)
            gw, gb = conv3x3_weight_grad(xin, e), e.sum(axis=(0, 2, 3))
        grads[f"enc.{i}.w"], grads[f"enc.{i}.b"] = np.clip(gw, LO32, HI32), np.clip(gb, LO32, HI32)
        for name, g in grads.items():
            pp = plan.params[name]
            upd = q[name].astype(I64) + stochastic(-g, pp.lr_shift, noise[name])
            new[name] = np.clip(upd, pp.lo, pp.hi).astype(q[name].dtype)
        losses.append(loss)
        x = y
    return new, losses
