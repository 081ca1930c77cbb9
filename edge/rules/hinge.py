"""The contrastive bilinear hinge of the CLAPP family: float closed form and integer form.

Anchor z (one view's pooled code of a block's output) predicts context c (the other view, or
the top block's code, detached) through a bilinear score u = z^T B c. Positive pair: the two
views of image i. Negative: the anchor of image i against the context of image i+1 (mod N).
Both views serve as anchor:

    L = 1/(2N) sum_i [ relu(1 - z1_i^T B c2_i) + relu(1 + z1_i^T B c2_{i+1})
                     + relu(1 - z2_i^T B c1_i) + relu(1 + z2_i^T B c1_{i+1}) ]

Three factors make the update: the per-sample modulator m = dL/du (-1/(2N) while a positive
scores below 1, +1/(2N) while a negative scores above -1), the prediction B c, and the
Hebbian outer product:

    dL/dz_i = sum_terms m * B c          dL/dB = sum_terms m * z c^T

B is `full` (D x Dc) or low rank B = U V^T (U: D x r, V: Dc x r): dL/dU = (dL/dB) V and
dL/dV = (dL/dB)^T U, computed without forming dL/dB.

`HingeRule` is the family's shared machinery: a rule file sets how each block's code is pooled
(`code_kernel`) and which hinge terms it sums (`terms`: predictor key prefix and context,
"same" = this block's other view, "top" = the top block's code from a forward pass before the
step). Its integer form (`IntHinge`) runs the same terms in integer arithmetic:

  q   = requant_8(c B^T)                 int8; low rank: t = requant_8(c V), q = requant_8(t U^T)
  u   = sum_d z_d q_d                    int32 at f_z + f_q: real u < 1 iff u < 2^(f_z + f_q)
  m   = -1 / 0 / +1                      exact integer comparisons against that threshold
  gz  = sum over terms of m q            aligned to the finest term exponent F (exact shifts)
  e   = stochastic_shift(gz, s)          int8 at F - s, s = ceil(log2 sum_t 2 * 2^(F - f_t)):
                                         no saturation possible; static factor c = 1/(2N)
  gB  = A^T C (A = rows m z, C contexts) int32 saturating;  low rank: gU = Z^T (m T),
                                         gV = C^T requant_8(m (Z U))
Every requant_8 rounds half to even, clips to [-127, 127], and takes its exponent from the
plan (calibrated: the maximum over the calibration batch, one bit of headroom). The 1/(2N)
and the code's 1/k^2 live in the gradients' static factors, never in the integers.

Negatives from memory (`negatives=K`, for batch 1 and streams). Instead of image i+1 of the
batch, the negative context of every anchor comes from a FIFO of the last K context codes:
`mem.rule.{i}.z` (K x D) per block for same-block terms, `mem.rule.top` (K x Dc) for
feedback terms, both step state (inputs and outputs of an exported step, bound to each
other). Anchor i of a batch takes entry i mod K, oldest first: at batch 1 the negative is the
sample seen K steps back (K = 1: the previous sample, as in the original time-contrastive
CLAPP). After the step the batch's view-2 codes are pushed, the oldest dropped. Entries start
at zero, and a zero context is inert: its prediction B 0 = 0 moves nothing until real codes
replace it. The loss keeps its form: one positive and one negative per anchor.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from edge.errors import EdgeError
from edge.layers import intops
from edge.layers.base import QT
from edge.nets import NetSpec
from edge.rules.base import Code, LocalRule

PREDICTORS = ("auto", "full", "lowrank")
Term = tuple[str, str]  # (predictor key prefix, context: "same" | "top")


def predictor_keys(kind: str) -> tuple[str, ...]:
    return ("B",) if kind == "full" else ("U", "V")


def choose_kind(kind: str, d: int, dc: int, rank: int) -> str:
    """`auto`: low rank when that is smaller than the full matrix."""
    if kind != "auto":
        return kind
    return "lowrank" if rank * (d + dc) < d * dc else "full"


def init_predictor(
    kind: str, d: int, dc: int, rank: int, gen: torch.Generator
) -> dict[str, Tensor]:
    """Scores start near +-1 for O(1) activations: B entries have std 1/sqrt(d * dc)."""
    if kind == "full":
        return {"B": torch.randn(d, dc, generator=gen) / math.sqrt(d * dc)}
    s = (d * dc * rank) ** -0.25
    return {
        "U": torch.randn(d, rank, generator=gen) * s,
        "V": torch.randn(dc, rank, generator=gen) * s,
    }


def predict(P: dict[str, Tensor], c: Tensor) -> Tensor:
    """B c for every row of c: (N, Dc) -> (N, D)."""
    if "B" in P:
        return c @ P["B"].t()
    return (c @ P["V"]) @ P["U"].t()


def negative_rows(mem: Tensor, n: int) -> Tensor:
    """The memory entries the n anchors of a batch take as negatives: row i mod K."""
    k = int(mem.shape[0])
    idx = [i % k for i in range(n)]
    return mem[idx[0] : idx[0] + 1] if n == 1 else mem[torch.tensor(idx)]


def push(mem: Tensor, codes: Tensor) -> Tensor:
    """The FIFO after the step: the newest codes appended, the oldest dropped."""
    k = int(mem.shape[0])
    return torch.cat((mem, codes.detach().to(mem.dtype)))[-k:]


def _quads(z1, z2, c1, c2, neg1, neg2):
    """(anchor, context, sign, view) of the four terms: pos/neg for each view as anchor; the
    negative contexts are the batch rolled by one unless given (memory)."""
    neg1 = torch.roll(c2, -1, 0) if neg1 is None else neg1
    neg2 = torch.roll(c1, -1, 0) if neg2 is None else neg2
    return ((z1, c2, 1.0, 0), (z1, neg1, -1.0, 0), (z2, c1, 1.0, 1), (z2, neg2, -1.0, 1))


def hinge_loss(z1: Tensor, z2: Tensor, c1: Tensor, c2: Tensor, P: dict[str, Tensor],
               neg1: Tensor | None = None, neg2: Tensor | None = None) -> Tensor:
    """The loss as a plain expression (differentiable; the reference for the closed form)."""
    n = z1.shape[0]
    total = sum(F.relu(1 - sign * (z * predict(P, c)).sum(1)).sum()
                for z, c, sign, _ in _quads(z1, z2, c1, c2, neg1, neg2))
    return total / (2 * n)


def hinge_grads(
    z1: Tensor, z2: Tensor, c1: Tensor, c2: Tensor, P: dict[str, Tensor],
    neg1: Tensor | None = None, neg2: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """Loss, dL/dz1, dL/dz2 and dL/dP in closed form.

    The four terms run stacked (anchors Z = [z1; z1; z2; z2] against contexts
    C = [c2; neg1; c1; neg2], signs [+, -, +, -]): one score, one modulator and one Hebbian
    product for all of them, and the low-rank factor c V computed once per context."""
    n = z1.shape[0]
    s = 1.0 / (2 * n)
    low = "B" not in P
    t = torch.cat((c1, c2)) @ P["V"] if low else None  # (2N, r): c V for both views
    q = t @ P["U"].t() if low else torch.cat((c1, c2)) @ P["B"].t()  # B c, both views
    q1, q2 = q[:n], q[n:]
    if neg1 is None:  # in-batch negatives: the rolled rows of what is already computed
        nq1, nq2 = torch.roll(q2, -1, 0), torch.roll(q1, -1, 0)
    else:
        nq1, nq2 = predict(P, neg1), predict(P, neg2)
    Z = torch.cat((z1, z1, z2, z2))
    Q = torch.cat((q2, nq1, q1, nq2))
    sign = torch.cat((z1.new_ones(n), -z1.new_ones(n))).repeat(2)[:, None]  # (4N, 1)
    margin = 1 - sign * (Z * Q).sum(1, keepdim=True)
    loss = F.relu(margin).sum() * s
    m = (-s * sign) * (margin > 0).to(Z.dtype)  # dL/du per term: the modulating factor
    G = m * Q
    gz1, gz2 = G[:n] + G[n : 2 * n], G[2 * n : 3 * n] + G[3 * n :]
    A = m * Z
    C = torch.cat([c for _, c, _, _ in _quads(z1, z2, c1, c2, neg1, neg2)])
    if not low:
        return loss, gz1, gz2, {"B": A.t() @ C}
    t1, t2 = t[:n], t[n:]
    if neg1 is None:
        nt1, nt2 = torch.roll(t2, -1, 0), torch.roll(t1, -1, 0)
    else:
        nt1, nt2 = neg1 @ P["V"], neg2 @ P["V"]
    CV = torch.cat((t2, nt1, t1, nt2))  # C V, from the factors already computed
    return loss, gz1, gz2, {"U": A.t() @ CV, "V": C.t() @ (A @ P["U"])}


class HingeRule(LocalRule):
    """The CLAPP family: a hinge (or two) at every block's pooled code (see the module
    docstring). Subclasses set `terms` and `code_kernel`."""

    terms: ClassVar[tuple[Term, ...]] = (("", "same"),)
    predictor: str = "full"
    rank: int = 32
    negatives: int = 0  # K: negatives from a memory of K past codes (0: the batch's images)

    def _set_negatives(self, negatives: int) -> None:
        if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 0:
            raise EdgeError(f"negatives must be a memory size K >= 0 (0: in-batch), got "
                            f"{negatives!r}")
        self.negatives = negatives

    @property
    def min_batch(self) -> int:
        return 1 if self.negatives else 2

    def mem_key(self, i: int, kind: str) -> str:
        return f"mem.rule.{i}.z" if kind == "same" else "mem.rule.top"

    def init_state(self, net: NetSpec) -> dict[str, Tensor]:
        """The negatives' memories (zeros: inert until filled), if `memory`."""
        self.check(net)
        if not self.negatives:
            return {}
        out = {}
        for i in range(len(self.codes)):
            for _, kind in self.terms:
                dim = self.codes[-1 if kind == "top" else i].dim
                out[self.mem_key(i, kind)] = torch.zeros(self.negatives, dim)
        return out

    def code_kernel(self, i: int, shape: tuple[int, ...], n_blocks: int) -> int | None:
        """Average-pool kernel of block i's code; None: the global average."""
        raise NotImplementedError

    @property
    def needs_top(self) -> bool:
        return any(ctx == "top" for _, ctx in self.terms)

    @property
    def needs_context(self) -> bool:
        return self.needs_top

    def check(self, net: NetSpec) -> None:
        if self.needs_top and len(net.blocks) < 2:
            raise EdgeError(
                f"{self.name} needs at least 2 layers (each layer predicts the top one), got 1; "
                "use clapp++ or clapp, or a deeper --net"
            )
        shapes = net.shapes()
        self.codes = [Code(s, self.code_kernel(i, s, len(shapes))) for i, s in enumerate(shapes)]

    def predictor_dims(self, i: int) -> dict[str, tuple[int, int]]:
        """Key prefix -> (D, Dc) of every predictor of block i."""
        d = self.codes[i].dim
        return {p: (d, self.codes[-1].dim if ctx == "top" else d) for p, ctx in self.terms}

    def init(self, net: NetSpec, gen: torch.Generator) -> dict[str, Tensor]:
        self.check(net)
        params = {}
        for i in range(len(self.codes)):
            for prefix, (d, dc) in self.predictor_dims(i).items():
                kind = choose_kind(self.predictor, d, dc, self.rank)
                for key, t in init_predictor(kind, d, dc, self.rank, gen).items():
                    params[f"rule.{i}.{prefix}{key}"] = t
        return params

    def _pred(self, i: int, prefix: str, params: dict[str, Tensor], ex=None) -> dict[str, Tensor]:
        """Block i's predictor of one term as the step multiplies by it (QAT: fake-quantized
        through the executor's weight hook)."""
        key = f"rule.{i}.{prefix}"
        return {k: params[key + k] if ex is None else ex.weight(key[:-1], k, params[key + k])
                for k in ("B", "U", "V") if key + k in params}

    def context(self, net: NetSpec, ex, params: dict[str, Tensor], x: Tensor) -> Any:
        """Both views' top-block codes (stacked, detached) from a forward pass with the
        incoming weights, if a term needs them."""
        if not self.needs_top:
            return None
        with torch.no_grad():
            for i, b in enumerate(net.blocks):
                x, _ = b.forward(ex, i, params, x)
            return self.codes[-1].forward(ex, x)[0].detach()

    def _contexts(self, kind: str, z: Tensor, ctx: Any) -> Tensor:
        return z.detach() if kind == "same" else ctx

    def _negatives(self, i: int, kind: str, n: int, state) -> Tensor | None:
        if not self.negatives:
            return None
        return negative_rows(state[self.mem_key(i, kind)], n)

    def _pushed(self, i: int, z: Tensor, ctx: Any, state, n_blocks: int) -> dict[str, Tensor]:
        """The memories after block i: its own view-2 codes (same terms); the top's once,
        at the top block (feedback terms)."""
        if not self.negatives:
            return {}
        out, n = {}, z.shape[0] // 2
        for _, kind in self.terms:
            key = self.mem_key(i, kind)
            if kind == "same":
                out[key] = push(state[key], z[n:])
            elif i == n_blocks - 1:
                out[key] = push(state[key], ctx[n:])
        return out

    def output_grads(self, i, ex, y, params, ctx, state=None):
        code = self.codes[i]
        z, zs = code.forward(ex, y)
        n = z.shape[0] // 2
        loss, gz1, gz2, grads = z.new_zeros(()), 0, 0, {}
        for prefix, kind in self.terms:
            c = self._contexts(kind, z, ctx)
            P = self._pred(i, prefix, params, ex)
            neg = self._negatives(i, kind, n, state)
            term, g1, g2, gP = hinge_grads(z[:n], z[n:], c[:n], c[n:], P, neg, neg)
            loss, gz1, gz2 = loss + term, gz1 + g1, gz2 + g2
            grads.update({f"rule.{i}.{prefix}{k}": g for k, g in gP.items()})
        new = self._pushed(i, z, ctx, state, len(self.codes))
        return loss, code.adjoint(ex, zs, torch.cat((gz1, gz2))), grads, new

    def layer_loss(self, i, y, params, ctx, state=None):
        from edge.layers import EAGER

        z = self.codes[i].forward(EAGER, y)[0]
        n = z.shape[0] // 2
        total = z.new_zeros(())
        for prefix, kind in self.terms:
            c = self._contexts(kind, z, ctx)
            neg = self._negatives(i, kind, n, state)
            total = total + hinge_loss(z[:n], z[n:], c[:n], c[n:], self._pred(i, prefix, params),
                                       neg, neg)
        return total

    def integer_form(self, net: NetSpec) -> IntHinge:
        self.check(net)
        return IntHinge(self)


def threshold(e: int) -> tuple[int, int]:
    """(thr, unit): real u < 1 iff u_int * unit < thr, for u_int at scale 2^-e."""
    return (1 << e, 1) if e >= 0 else (1, 1 << -e)


def requant8(ex, key: str, acc: QT, headroom: int = 1) -> QT:
    """An accumulator requantized to int8 [-127, 127] at its plan exponent."""
    f = ex.int8_exponent(key, acc, headroom)
    t = intops.saturate(intops.round_shift(intops.widen(acc.t), acc.f - f), -127, 127)
    return QT(t.to(torch.int8), f)


def _roll(x: Tensor) -> Tensor:
    return torch.roll(x, -1, 0)  # row i gets row i+1 (mod N): the negative pairs


class IntHinge:
    """The integer form of a `HingeRule` (module docstring); the step interface over QT."""

    streams = 2

    def __init__(self, rule: HingeRule):
        self.rule, self.name = rule, rule.name

    def inputs(self, x1: QT, x2: QT) -> QT:
        return QT(torch.cat((x1.t, x2.t)), x1.f)

    def next_input(self, i: int, y: QT) -> QT:
        return y

    def context(self, net: NetSpec, ex, params: dict[str, Tensor], x: QT) -> QT | None:
        if not self.rule.needs_top:
            return None
        for i, b in enumerate(net.blocks):
            x, _ = b.forward(ex, i, params, x)
        return self.rule.codes[-1].int_forward(ex, x)[0]

    def _predict(self, ex, key: str, P: dict[str, QT], c: QT) -> tuple[QT, QT | None]:
        if "B" in P:
            return requant8(ex, key + "q", QT(intops.int_matmul(c.t, P["B"].t.t()),
                                               c.f + P["B"].f)), None
        t = requant8(ex, key + "t", QT(intops.int_matmul(c.t, P["V"].t), c.f + P["V"].f))
        q = requant8(ex, key + "q", QT(intops.int_matmul(t.t, P["U"].t.t()), t.f + P["U"].f))
        return q, t

    def init_state(self, net: NetSpec, outputs: list[QT]) -> dict[str, Tensor]:
        """The negatives' memories as 8-bit codes (zeros) in each code's own dtype;
        `outputs`: the blocks' integer outputs on any input (`quant.integer.rule_state`)."""
        rule = self.rule
        if not rule.negatives:
            return {}
        from edge.layers import EAGER

        dtypes = [rule.codes[i].int_forward(EAGER, y)[0].t.dtype for i, y in enumerate(outputs)]
        out = {}
        for i in range(len(rule.codes)):
            for _, kind in rule.terms:
                j = -1 if kind == "top" else i
                out[rule.mem_key(i, kind)] = torch.zeros(rule.negatives, rule.codes[j].dim,
                                                         dtype=dtypes[j])
        return out

    def _memory(self, key: str, like: Tensor, state) -> Tensor:
        """A memory, or inert zeros where the state has none (calibration)."""
        if state is not None and key in state:
            return state[key]
        return torch.zeros((self.rule.negatives, int(like.shape[1])), dtype=like.dtype)

    def output_grads(self, i, ex, y: QT, params, ctx, state=None):
        code = self.rule.codes[i]
        z, zs = code.int_forward(ex, y)
        n = z.t.shape[0] // 2
        z1, z2 = z.t[:n], z.t[n:]
        grads: dict[str, QT] = {}
        new_state: dict[str, Tensor] = {}
        loss = torch.zeros((), dtype=torch.float64)
        parts = []  # (gz per view (2N, D) int64, its exponent)
        for prefix, kind in self.rule.terms:
            c = z if kind == "same" else ctx
            key = f"rule.{i}.{prefix}"
            P = ex.rule_params(key, params)
            q, t = self._predict(ex, key, P, c)
            q1, q2 = q.t[:n], q.t[n:]
            c1, c2 = c.t[:n], c.t[n:]
            if self.rule.negatives:  # negatives: memory entries i mod K, the same for both views
                mkey = self.rule.mem_key(i, kind)
                mem = self._memory(mkey, c.t, state)
                neg = negative_rows(mem, n)
                qn, tn = self._predict(ex, key, P, QT(neg, c.f))
                nq1 = nq2 = qn.t
                nc1 = nc2 = neg
                nt1 = nt2 = None if tn is None else tn.t
                if kind == "same" or i == len(self.rule.codes) - 1:
                    new_state[mkey] = push(mem, c2)
            else:
                nq1, nq2, nc1, nc2 = _roll(q2), _roll(q1), _roll(c2), _roll(c1)
                nt1 = nt2 = None
            thr, unit = threshold(z.f + q.f)
            anchors, preds = (z1, z1, z2, z2), (q2, nq1, q1, nq2)
            gz = [torch.zeros(intops.dims(z1), dtype=torch.int64) for _ in range(2)]
            signs, term_loss = [], torch.zeros((), dtype=torch.int64)
            for j, (a, p) in enumerate(zip(anchors, preds, strict=True)):
                p = intops.widen(p)
                u = (intops.widen(a) * p).sum(1) * unit
                margin = thr - u if j % 2 == 0 else thr + u
                m = (margin > 0).to(torch.int64)
                m = -m if j % 2 == 0 else m  # positives: -1 while u < 1; negatives: +1
                term_loss = term_loss + torch.clamp(margin, min=0).sum()
                gz[j // 2] = gz[j // 2] + m[:, None] * p
                signs.append(m)
            loss = loss + term_loss.to(torch.float64) / (thr * 2 * n)
            parts.append((torch.cat(gz), q.f))
            M = torch.cat(signs)[:, None]
            C = torch.cat((c2, nc1, c1, nc2))
            s = 1.0 / (2 * n)
            if "B" in P:  # A^T C = (rows m = +1)^T C - (rows m = -1)^T C, 8-bit operands
                act = [intops.narrow(intops.widen(a) * m.abs()[:, None], a.dtype)
                       for a, m in zip(anchors, signs, strict=True)]
                blocks = [C[j * n : (j + 1) * n] for j in range(4)]
                up = intops.int_matmul(torch.cat((act[1], act[3])).t(),
                                       torch.cat((blocks[1], blocks[3])))
                down = intops.int_matmul(torch.cat((act[0], act[2])).t(),
                                         torch.cat((blocks[0], blocks[2])))
                grads[key + "B"] = QT(intops.saturate32(up - down), z.f + c.f, s)
            else:  # A U = m (Z U) and A^T T = Z^T (m T): the sign moves onto an 8-bit factor
                Z = torch.cat(anchors)
                t1, t2 = t.t[:n], t.t[n:]
                if nt1 is None:
                    nt1, nt2 = _roll(t2), _roll(t1)
                T = torch.cat((t2, nt1, t1, nt2))
                au = requant8(ex, key + "au", QT(M * intops.int_matmul(Z, P["U"].t),
                                                 z.f + P["U"].f), headroom=0)
                mt = intops.narrow(M * intops.widen(T), torch.int8)
                grads[key + "U"] = QT(intops.saturate32(intops.int_matmul(Z.t(), mt)),
                                      z.f + t.f, s)
                grads[key + "V"] = QT(intops.saturate32(intops.int_matmul(C.t(), au.t)),
                                      c.f + au.f, s)
        top = max(f for _, f in parts)
        gz = None
        for g, f in parts:
            g = g * (1 << (top - f))
            gz = g if gz is None else gz + g
        shift = math.ceil(math.log2(sum(2 * 2 ** (top - f) for _, f in parts)))
        e = intops.stochastic_shift(gz, shift, ex.noise(f"err.{i}.z", gz))
        e = QT(intops.saturate(e, -127, 127).to(torch.int32), top - shift, 1.0 / (2 * n))
        return loss.float(), code.int_adjoint(ex, zs, e), grads, new_state
