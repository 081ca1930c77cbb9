"""Integer forms of the local rules: the CLAPP family's bilinear hinge in integer arithmetic.

One form serves clapp, clapp++, clapp++dfb and clapp++both: they differ only in how the code
z is pooled (a kh x kw window average; clapp: the whole map) and in which contexts the hinge
terms score against ("same": the other view's code of this layer; "top": the other view's
top-layer code, from an integer forward pass before the step). Both live in the plan
(`LayerPlan.window`, `LayerPlan.terms`). A rule with no entry here has no integer form.

Integer hinge of layer i (N images per view, uint8 codes z at f_y, contexts c at f_c):
  q   = requant(c B^T)                   int8 at f_q, c B^T accumulated in int32
        low rank: t = requant(c V) (int8 at f_t), q = requant(t U^T)
  u   = sum_d z_d q_d                    int32 at f_y + f_q: real u = u / 2^(f_y + f_q)
  m   = -1 where a positive scores u < 1, +1 where a negative scores u > -1, else 0
        (an exact integer comparison against the threshold 2^(f_y + f_q))
  gz  = sum of m q over the terms        |gz| <= 254 per term
  e   = stochastic_shift(gz, e_shift)    int8: the error at the code, unbiased (explicit
                                         random bits), spread over the window
  gB  = A^T C, A = rows m z, C = the contexts     int32 (saturating)
        low rank: gU = A^T T (T = the rows' t), gV = C^T requant(A U) (int8 at f_au)
The 1/(2N) of the loss and the 1/(kh kw) of the average live in the gradients' scales (and
so in the learning-rate shifts), never in the integers. The prediction B c is integer
(int8), like every other operand: no tensor of the step is kept at higher precision.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.nets import LayerSpec, NetSpec
from quant.integer import (
    IntLayerOut,
    int_layer_backward,
    integer_forward,
    window_code,
    window_spread,
)
from quant.intops import (
    dims,
    int_matmul,
    narrow,
    round_shift,
    saturate,
    saturate32,
    stochastic_shift,
    widen,
)
from quant.plan import W_MAX, LayerPlan, QuantPlan, forward_value

TERMS = {
    "clapp": (("", "same"),),
    "clapp++": (("", "same"),),
    "clapp++dfb": (("fb.", "top"),),
    "clapp++both": (("fb.", "top"), ("", "same")),
}


def has_integer_form(rule) -> bool:
    return getattr(rule, "name", None) in TERMS


def family_layout(rule, net: NetSpec) -> list[tuple[tuple[int, int], tuple[tuple[str, str], ...]]]:
    """(window, terms) of every layer for a CLAPP-family rule; EdgeError for any other rule."""
    if not has_integer_form(rule):
        raise EdgeError(
            f"rule {getattr(rule, 'name', rule)!r} has no integer form; "
            f"integer mode supports {', '.join(TERMS)} (use --mode qat for the others)"
        )
    rule.check(net)
    out = []
    for i, shape in enumerate(net.shapes()):
        if len(shape) == 1:
            window = (1, 1)
        elif rule.name == "clapp":
            window = (shape[1], shape[2])
        else:
            window = (rule.kernels[i], rule.kernels[i])
        out.append((window, TERMS[rule.name]))
    return out


def predictor(
    i: int, prefix: str, plan: QuantPlan, qparams: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Forward (int8) predictor matrices of one term, keyed B or U, V."""
    out = {}
    for k in ("B", "U", "V"):
        name = f"rule.{i}.{prefix}{k}"
        if name in qparams:
            out[k] = narrow(forward_value(qparams[name], plan.params[name]), torch.int8)
    return out


def _requant(acc: Tensor, shift: int) -> Tensor:
    """An accumulator requantized to int8 [-127, 127] (clipped, then cast)."""
    return saturate(round_shift(acc, shift), -W_MAX, W_MAX).to(torch.int8)


def predict(
    P: dict[str, Tensor], f: dict[str, int], lp: LayerPlan, c: Tensor, f_c: int
) -> tuple[Tensor, Tensor | None]:
    """q = requant(B c) (int8 at f_q) for every row of the uint8 codes c; low rank also
    returns t = requant(c V) (int8 at f_t)."""
    if "B" in P:
        return _requant(int_matmul(c, P["B"].t()), f_c + f["B"] - lp.f_q), None
    t = _requant(int_matmul(c, P["V"]), f_c + f["V"] - lp.f_t)
    return _requant(int_matmul(t, P["U"].t()), lp.f_t + f["U"] - lp.f_q), t


def threshold(e: int) -> tuple[int, int]:
    """(thr, unit): real u < 1 iff u_int * unit < thr, for u_int at scale 2^-e."""
    return (1 << e, 1) if e >= 0 else (1, 1 << -e)


def roll(x: Tensor) -> Tensor:
    """Row i gets row i+1 (mod N): the negative pairs."""
    return torch.roll(x, -1, 0)


class ClappFamilyInt:
    """The integer form shared by the CLAPP family (stateless; everything is in the plan)."""

    def context(
        self, net: NetSpec, plan: QuantPlan, qparams: dict[str, Tensor], x1: Tensor, x2: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """Both views' top-layer codes (uint8 values) if any term needs them, from an integer
        forward pass with the incoming weights; else None."""
        if not any(ctx == "top" for lp in plan.layers for _, ctx in lp.terms):
            return None
        top = integer_forward(net, plan, qparams, torch.cat((x1, x2)))[-1]
        c = window_code(top, plan.layers[-1].window)
        return c[: plan.batch], c[plan.batch :]

    def layer_grads(
        self,
        i: int,
        layer: LayerSpec,
        plan: QuantPlan,
        out: IntLayerOut,
        qparams: dict[str, Tensor],
        ctx: tuple[Tensor, Tensor] | None,
        err_noise: Tensor,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Integer gradients (int32 values, int64 dtype) of layer i's parameters and its loss
        (float, dequantized from the integer margins). `err_noise`: random bits (2N, D) for
        the stochastic rounding of the error (`quant.integer.make_noise`, key `err_key(i)`)."""
        lp, n = plan.layers[i], plan.batch
        z = window_code(out.y, lp.window)  # uint8
        z1, z2 = z[:n], z[n:]
        thr, unit = threshold(lp.f_y + lp.f_q)
        gz = [torch.zeros(dims(z1), dtype=torch.int64), torch.zeros(dims(z2), dtype=torch.int64)]
        loss = torch.zeros((), dtype=torch.int64)
        grads: dict[str, Tensor] = {}
        for prefix, kind in lp.terms:
            if kind == "same":
                c1, c2, f_c = z1, z2, lp.f_y
            else:
                c1, c2 = ctx
                f_c = plan.layers[-1].f_y
            P = predictor(i, prefix, plan, qparams)
            f = {
                k: plan.params[f"rule.{i}.{prefix}{k}"].exponent
                - plan.params[f"rule.{i}.{prefix}{k}"].shift
                for k in P
            }
            q1, t1 = predict(P, f, lp, c1, f_c)
            q2, t2 = predict(P, f, lp, c2, f_c)
            anchors = (z1, z1, z2, z2)
            preds = (q2, roll(q2), q1, roll(q1))
            signs = []  # m per row block: -1 / 0 on positive pairs, 0 / +1 on negative ones
            for j, (a, q) in enumerate(zip(anchors, preds, strict=True)):
                q = widen(q)
                u = (widen(a) * q).sum(1) * unit
                if j % 2 == 0:  # positive pair: m = -1 while u < 1
                    margin = thr - u
                    m = -(margin > 0).to(torch.int64)
                else:  # negative pair: m = +1 while u > -1
                    margin = thr + u
                    m = (margin > 0).to(torch.int64)
                loss = loss + torch.clamp(margin, min=0).sum()
                gz[j // 2] = gz[j // 2] + m[:, None] * q
                signs.append(m)
            # rows of A = m z (9-bit); every product below keeps 8-bit operands
            M = torch.cat(signs)[:, None]
            Z = torch.cat(anchors)
            C = torch.cat((c2, roll(c2), c1, roll(c1)))
            key = f"rule.{i}.{prefix}"
            if "B" in P:  # A^T C = (rows with m = +1)^T C - (rows with m = -1)^T C, uint8 x uint8
                act = [
                    narrow(widen(a) * m.abs()[:, None], torch.uint8)
                    for a, m in zip(anchors, signs, strict=True)
                ]
                blocks = [C[j * n : (j + 1) * n] for j in range(4)]
                # negative pairs (blocks 1, 3) have m = +1, positive pairs (0, 2) m = -1
                up = int_matmul(torch.cat((act[1], act[3])).t(), torch.cat((blocks[1], blocks[3])))
                down = int_matmul(
                    torch.cat((act[0], act[2])).t(), torch.cat((blocks[0], blocks[2]))
                )
                grads[key + "B"] = saturate32(up - down)
            else:  # A U = m (Z U) and A^T T = Z^T (m T): the sign moves onto an 8-bit factor
                T = torch.cat((t2, roll(t2), t1, roll(t1)))
                au = _requant(M * int_matmul(Z, P["U"]), lp.f_y + f["U"] - lp.f_au)
                grads[key + "U"] = saturate32(int_matmul(Z.t(), narrow(M * widen(T), torch.int8)))
                grads[key + "V"] = saturate32(int_matmul(C.t(), au))
        e = stochastic_shift(torch.cat(gz), lp.e_shift, err_noise)
        e = saturate(e, -W_MAX, W_MAX).to(torch.int32)  # int8 values, carried back as int32
        e = window_spread(e, out.y.shape, lp.window)
        gw, gb = int_layer_backward(layer, out, e)
        grads = {f"enc.{i}.w": gw, f"enc.{i}.b": gb, **grads}
        return grads, (loss.to(torch.float64) / (thr * 2 * n)).float()


_FORM = ClappFamilyInt()


def integer_form(rule) -> ClappFamilyInt:
    """The integer form of `rule`; EdgeError if it has none."""
    if not has_integer_form(rule):
        family_layout(rule, None)  # raises the one-line error
    return _FORM


def error_shift(n_terms: int) -> int:
    """Bits to drop so that the sum of 2 * n_terms int8 predictions fits int8 again."""
    return math.ceil(math.log2(2 * n_terms)) if n_terms else 0
