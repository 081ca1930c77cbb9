"""The CLAPP family's dense-layer update in the form of Loihi 2's learning engine.

On-chip learning engines write a plasticity rule as a sum of products of pre-synaptic traces
(x1, x2), post-synaptic traces (y1, y2, y3; in a three-factor rule the post-synaptic neuron
sets them, so one of them can carry a third factor), gated by a dependency (x0: the
pre-synaptic neuron spiked this epoch, y0: the post-synaptic one did, u: every epoch), each
product scaled by S = mantissa * 2^exponent, summed into a narrow accumulator with saturation
and stochastically rounded into the weight at the end of every learning epoch. This module
writes edge's integer dense update in that form, simulates the engine bit for bit in NumPy,
and computes the same update with edge's own integer arithmetic at the engine's widths.

The update. A block Linear -> ReLU, y = relu(W x + b), gets from the hinge the error
r = dL/dy at its output (edge: int8 in [-127, 127], `IntHinge`: r = stochastic_shift(sum over
terms of m_t q_t), m_t the per-sample modulator -1 / 0 / +1 of term t, q_t = (B c_t) the int8
prediction of its context). The closed-form local update is dW = e^T x with e = [y > 0] r:

    dW_ij = sum_n  (sum_t m_nt q_ntj) * [y_nj > 0] * x_ni

    x_ni            pre-synaptic term: the input code of sample n (8-bit, after a ReLU)
    [y_nj > 0]      post-synaptic term: the ReLU gate of output j
    sum_t m q       third factor: the hinge's modulator times the prediction B c

As an engine rule (one sample per learning epoch; `DenseRule.expression()`, Lava's syntax):

    dw = S * x0 * x1 * y2 - S * x0 * x1 * y3          S = mantissa * 2^exponent (< 0: descent)

    x1 = round_half_even(x / 2)   the 7-bit pre trace: Lava's graded spike in OVERWRITE mode
                                  sets x1 to payload / 2 rounded (an 8-bit payload)
    x0 = [x > 0]                  the dependency: the pre neuron spiked in this epoch (a zero
                                  code sends no spike, and x1 keeps its old value: the gate)
    y2 = [y > 0] max(r, 0)        the third factor, split by sign into two unsigned 7-bit
    y3 = [y > 0] max(-r, 0)       post traces set by the post neuron (Loihi3FLearningRule);
                                  |r| <= 127 fits 7 bits exactly, so nothing is requantized

Per epoch, as Lava's bit-approximate model computes it (`engine_dense_update`): the
accumulator holds w << 7 (16-bit signed accumulator, 9-bit signed weight); each product is
x0 * x1 * y * mantissa (factors clipped to their widths), shifted right by
max(0, 7 + 7 + 4 - 15) = 3 (floor), shifted left by exponent + 7, clipped to the accumulator;
the accumulation is clipped after every product; then the stochastic rounding drops the low 7
bits (up iff a 7-bit random number < the dropped bits), and the weight is clipped to
[-256, 255]. Only one product is non-zero per synapse and epoch (y2 y3 = 0), so the change
of one epoch is, with G = x1 r [y > 0] the Hebbian product at batch 1,

    T   = clip16(floor(mantissa * G / 2^3) * 2^(exponent + 7))
    w'  = clip9(SR_7(clip16(w 2^7 + T)) / 2^7)

edge's side (`edge_dense_update`) computes it with edge's integer forms: the input narrowed to
7 bits (`intops.round_shift`, `intops.saturate`), the ReLU mask (`ReLU.int_adjoint`), the
Hebbian product (`Linear.int_adjoint`: saturate32(e^T x)), the engine's product truncation and
16-bit saturation (`intops.floor_shift`, `intops.saturate`) and edge's own update
(`quant.plan.apply_update`: store' = clamp(store + stochastic_shift(-G, 7, noise), lo, hi), its
random bits chosen as the engine's: noise = (127 - rand) << 9). The two agree bit for bit
(tests/test_loihi.py), the saturation cases included: clip16 of the weight-plus-change can
only bind where the clip of the 9-bit weight binds as well.

What is verified here and what is assumed (`describe_engine("loihi2")` lists it):
* Read in Lava's source (lava-nc, BSD-3; src/lava/magma/core/learning/constants.py,
  learning_rule_applier.py, product_series.py, random.py, utils.py; model/py/connection.py;
  proc/dense; utils/weightutils.py) and cross-checked once, outside the tests, by running
  lava-nc 0.10.0's own rule parser, graded-spike pre traces, LearningRuleApplierBitApprox
  and the learning phase of LearningConnectionModelBitApproximate on the same data (equal
  bit for bit, saturation included; `test_against_lava` repeats it wherever lava imports):
  the widths, the product arithmetic, the stochastic rounding, the weight clip.
* Lava says of that model that it "does not implement the exact behavior of Loihi" (its
  docstring): silicon's datapath is not public, so bit-exactness is to Lava's model. Intel's
  Loihi 2 brief (8-bit weights, stochastic rounding, three-factor rules) was not read here.
  Each row of WIDTH_ROWS names the file it comes from.
* Assumed: one sample per learning epoch, its pre trace held through the epoch (Lava's model
  decays traces stochastically; a very long time constant holds a value almost surely, as
  Lava's three-factor rule does for its post traces), the post neuron computing the gated
  third factor; the random numbers of the rounding are taken as explicit integers (Lava draws
  one float per epoch for all synapses; any per-synapse or shared draw is accepted here).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.layers import EAGER, Linear, ReLU, intops
from edge.layers.base import QT
from quant.plan import ParamPlan, apply_update

LAVA = "lava-nc (github.com/lava-nc/lava, BSD-3), src/lava/"
ERROR_BITS = 7  # edge's error: int8 in [-127, 127], a 7-bit magnitude


# ----------------------------------------------------------------------------- widths


@dataclass(frozen=True)
class EngineWidths:
    """The bit widths of a learning engine's update path (defaults: Loihi 2 as Lava models it).

    weight_bits   unsigned weight width; the learned weight is signed, one bit more:
                  [-2^weight_bits, 2^weight_bits - 1] (sign mode "mixed")
    frac_bits     accumulator bits below the weight's LSB: the accumulator holds
                  w << frac_bits and the stochastic rounding drops them
    trace_bits    pre and post trace width (factors clip to [-2^t, 2^t - 1])
    acc_bits      unsigned accumulator width: products and sums clip to
                  [-2^acc_bits - 1, 2^acc_bits - 1] (Lava's bounds)
    mant_bits     width of the scaling factor's mantissa (signed, [-2^(m-1), 2^(m-1) - 1])
    exp_min/max   the scaling factor's exponent range
    payload_bits  graded-spike payload width: trace = round(payload / 2^(payload - trace))
    """

    name: str = "loihi2"
    weight_bits: int = 8
    frac_bits: int = 7
    trace_bits: int = 7
    acc_bits: int = 15
    mant_bits: int = 4
    exp_min: int = -7
    exp_max: int = 8
    payload_bits: int = 8

    def __post_init__(self) -> None:
        if self.trace_bits < ERROR_BITS:
            raise EdgeError(f"{self.name}: a {self.trace_bits}-bit trace cannot hold edge's "
                            "int8 error magnitude (7 bits) without requantizing it")
        if self.payload_bits < self.trace_bits:
            raise EdgeError(f"{self.name}: payload narrower than the trace")
        if not 1 <= self.frac_bits <= intops.NOISE_BITS:
            raise EdgeError(f"{self.name}: frac_bits must be in [1, {intops.NOISE_BITS}] (edge's "
                            "random bits per rounding)")
        if not self.weight_bits + self.frac_bits <= self.acc_bits <= 30:
            raise EdgeError(f"{self.name}: the accumulator must hold w << frac_bits and fit "
                            "edge's int32 gradients (acc_bits <= 30)")
        if self.exp_min + self.frac_bits < 0 or self.exp_min > self.exp_max:
            raise EdgeError(f"{self.name}: exponent range [{self.exp_min}, {self.exp_max}]")

    @property
    def weight_lo(self) -> int:
        return -(1 << self.weight_bits)

    @property
    def weight_hi(self) -> int:
        return (1 << self.weight_bits) - 1

    @property
    def acc_lo(self) -> int:
        return -(1 << self.acc_bits) - 1  # Lava clips at -(2^15) - 1, one below int16

    @property
    def acc_hi(self) -> int:
        return (1 << self.acc_bits) - 1

    @property
    def trace_lo(self) -> int:
        return -(1 << self.trace_bits)

    @property
    def trace_hi(self) -> int:
        return (1 << self.trace_bits) - 1

    @property
    def payload_shift(self) -> int:
        return self.payload_bits - self.trace_bits

    def product_shift(self, factor_bits: int) -> int:
        """Right shift of a product whose factors sum to `factor_bits` (Lava: the widths of
        the factors plus the mantissa's, less the accumulator's, never negative)."""
        return max(0, factor_bits + self.mant_bits - self.acc_bits)


LOIHI2 = EngineWidths()
# edge's own widths on the same 9-bit store: 8-bit inputs, no product truncation, a 30-bit
# accumulator (edge's gradients are int32): the "full-width" update the engine narrows
WIDE = EngineWidths(name="edge-wide", trace_bits=8, acc_bits=30)

WIDTH_ROWS = (  # field, meaning, source, status
    ("weight_bits", "weight: 8-bit magnitude, 9-bit signed [-256, 255] in mixed sign mode",
     LAVA + "magma/core/learning/constants.py (W_WEIGHTS_U = 8, W_WEIGHTS_S = 9); "
     "utils/weightutils.py clip_weights (mixed: [-2^8, 2^8 - 1])", "read in Lava's model"),
    ("frac_bits", "accumulator bits below the weight LSB (w << 7), dropped by stochastic "
     "rounding", LAVA + "magma/core/model/py/connection.py _apply_learning_rules "
     "(shift W_ACCUMULATOR_S - W_WEIGHTS_S = 7), _stochastic_round_synaptic_variable "
     "(2^(W_ACCUMULATOR_U - W_WEIGHTS_U) = 2^7)", "read in Lava's model"),
    ("trace_bits", "pre traces x1, x2 and post traces y1, y2, y3: 7 bits",
     LAVA + "magma/core/learning/constants.py (W_TRACE = 7); connection.py (x1..y3 "
     "precision=7, s_in_y1..3 precision=7)", "read in Lava's model"),
    ("acc_bits", "update accumulator: 15-bit magnitude, 16-bit signed; Lava clips every "
     "product and every sum to [-(2^15) - 1, 2^15 - 1]",
     LAVA + "magma/core/learning/constants.py (W_ACCUMULATOR_U = 15, W_ACCUMULATOR_S = 16); "
     "learning_rule_applier.py LearningRuleApplierBitApprox.apply", "read in Lava's model"),
    ("mant_bits", "scaling factor S = mantissa * 2^exponent, 4-bit mantissa in [-8, 7]; a "
     "product is shifted right by max(0, sum of factor widths + 4 - 15)",
     LAVA + "magma/core/learning/constants.py (W_S_MANT = 4); product_series.py "
     "_generate_product; learning_rule_applier.py", "read in Lava's model"),
    ("exp_min", "scaling exponent >= -7 (stored as exponent + 7)",
     LAVA + "magma/core/learning/product_series.py _generate_product", "read in Lava's model"),
    ("exp_max", "scaling exponent <= 8", LAVA + "magma/core/learning/product_series.py",
     "read in Lava's model"),
    ("payload_bits", "graded spike into the pre trace: x1 = round(payload / 2) (OVERWRITE "
     "mode), an 8-bit payload",
     LAVA + "magma/core/model/py/connection.py LearningConnectionModelBitApproximate."
     "_process_pre_spikes (GradedSpikeCfg.OVERWRITE)", "read in Lava's model"),
)


# ----------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class DenseRule:
    """dw = S x0 x1 y2 - S x0 x1 y3, S = mantissa * 2^exponent, at `widths`.

    The mantissa is normalised as Lava's parser does (an even mantissa beyond 2^(m-1) - 1 is
    halved while the exponent rises), so the rule computes what the expression would; the
    second product carries the negated mantissa, so -2^(m-1) is refused where it stays."""

    mantissa: int = -1
    exponent: int = 0
    widths: EngineWidths = LOIHI2

    def __post_init__(self) -> None:
        m, e, w = self.mantissa, self.exponent, self.widths
        top = (1 << (w.mant_bits - 1)) - 1
        while abs(m) > top and m % 2 == 0 and e < w.exp_max:
            m, e = m // 2, e + 1
        if m == 0 or abs(m) > top:  # both products carry it, one negated: |m| <= 2^(m-1) - 1
            raise EdgeError(f"mantissa {self.mantissa} (and its negative) not representable in "
                            f"{w.mant_bits} bits at exponent {self.exponent}")
        if not w.exp_min <= e <= w.exp_max:
            raise EdgeError(f"exponent {e} outside [{w.exp_min}, {w.exp_max}]")
        object.__setattr__(self, "mantissa", m)
        object.__setattr__(self, "exponent", e)

    @property
    def scale(self) -> Fraction:
        return self.mantissa * Fraction(2) ** self.exponent

    @property
    def shift(self) -> int:
        """The right shift of each product (two trace factors): 3 on Loihi 2."""
        return self.widths.product_shift(2 * self.widths.trace_bits)

    def products(self) -> list[dict[str, Any]]:
        """The sum of products: (sign, dependency, factors) of each term."""
        return [{"mantissa": self.mantissa, "exponent": self.exponent, "dependency": "x0",
                 "factors": ["x1", "y2"]},
                {"mantissa": -self.mantissa, "exponent": self.exponent, "dependency": "x0",
                 "factors": ["x1", "y3"]}]

    def expression(self) -> str:
        """The rule in Lava's string syntax (LoihiLearningRule dw=...)."""
        m, e = self.mantissa, self.exponent
        return f"{m} * 2^{e} * x0 * x1 * y2 {'-' if m > 0 else '+'} {abs(m)} * 2^{e} * x0 * x1 * y3"


def rule_for_lr_shift(k: int, widths: EngineWidths = LOIHI2) -> DenseRule:
    """The engine rule whose mean step matches edge's update store' = store - G 2^-k on an
    8-bit signed store (edge int8 mode), G = e^T x at full width: the engine's weight has
    weight_bits + 1 bits (one more than edge's), its trace is x / 2^payload_shift and each
    product loses `shift` bits, so S = -2^(shift + payload_shift + weight_bits - 7 - k):
    on Loihi 2 S = -2^(5 - k), representable for k in [-3, 12]. The steps agree in the mean,
    not bit for bit (the trace rounds x / 2, the shift floors the product)."""
    probe = DenseRule(-1, 0, widths)
    e = probe.shift + widths.payload_shift + widths.weight_bits - 7 - k
    if not widths.exp_min <= e <= widths.exp_max:
        lo = probe.shift + widths.payload_shift + widths.weight_bits - 7 - widths.exp_max
        hi = lo + widths.exp_max - widths.exp_min
        raise EdgeError(f"learning-rate shift {k} has no scale on {widths.name}: exponent {e} "
                        f"outside [{widths.exp_min}, {widths.exp_max}] (shifts {lo}..{hi} fit); "
                        "rescale the weights (Loihi's weight exponent) or the traces")
    return DenseRule(-1, e, widths)


# ----------------------------------------------------------------- the engine, in NumPy


class EngineRun(NamedTuple):
    weights: np.ndarray  # (fout, fin) int64, the learned weights after every epoch
    x1: np.ndarray  # (fin,) the pre traces after the last epoch
    clipped: int  # products or sums the accumulator clipped, over all epochs


def _i64(a: Any) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iub":
        raise TypeError(f"integer arrays only, got {a.dtype}")
    return a.astype(np.int64)


def _round_half_even(x: np.ndarray, k: int) -> np.ndarray:
    """x / 2^k rounded half to even, on integers (Lava: np.round(payload / 2))."""
    if k == 0:
        return x
    q, r = np.divmod(x, np.int64(1 << k))
    half = 1 << (k - 1)
    return q + ((r > half) | ((r == half) & (q % 2 == 1)))


def pre_trace(x: Any, widths: EngineWidths = LOIHI2) -> np.ndarray:
    """The trace a graded spike of payload x writes (OVERWRITE): round(x / 2^shift); Lava
    stores it as uint8 (255 -> 128), the product clips it to the trace width."""
    return _round_half_even(_i64(x), widths.payload_shift)


def post_factors(y: Any, r: Any) -> tuple[np.ndarray, np.ndarray]:
    """(y2, y3): the gated third factor [y > 0] r split by sign into two unsigned traces."""
    g = np.where(_i64(y) > 0, _i64(r), 0)
    return np.maximum(g, 0), np.maximum(-g, 0)


def engine_dense_update(weights: Any, x: Any, y: Any, r: Any, rule: DenseRule, rand: Any,
                        x1: Any | None = None) -> EngineRun:
    """The learning engine running `rule` for N epochs, one sample each, bit for bit as Lava's
    bit-approximate model computes a learning epoch.

    weights (fout, fin) ints in the weight range; x (N, fin) 8-bit pre-synaptic payloads (the
    input codes, >= 0); y (N, fout) the post neurons' outputs (their ReLU gate); r (N, fout)
    the third factor (edge's int8 error, |r| <= 127); rand (N,) or (N, fout, fin) integers in
    [0, 2^frac_bits), the stochastic rounding's random numbers (Lava: one per epoch, shared);
    x1 the pre traces before the first epoch (zeros if None)."""
    wd = rule.widths
    w = _i64(weights)
    x, y, r = _i64(x), _i64(y), _i64(r)
    fout, fin = w.shape
    n = x.shape[0]
    if x.shape != (n, fin) or y.shape != (n, fout) or r.shape != (n, fout):
        raise EdgeError(f"shapes: weights {w.shape}, x {x.shape}, y {y.shape}, r {r.shape}")
    if (x < 0).any() or (x >= 1 << wd.payload_bits).any():
        raise EdgeError(f"pre-synaptic payloads must be unsigned {wd.payload_bits}-bit codes")
    if (np.abs(r) > (1 << ERROR_BITS) - 1).any():
        raise EdgeError("the third factor must be edge's int8 error in [-127, 127]")
    if (w < wd.weight_lo).any() or (w > wd.weight_hi).any():
        raise EdgeError(f"weights outside [{wd.weight_lo}, {wd.weight_hi}]")
    rand = _i64(rand)
    if rand.ndim == 1:
        rand = np.broadcast_to(rand[:, None, None], (n, fout, fin))
    if rand.shape != (n, fout, fin):
        raise EdgeError(f"random numbers: shape (N,) or (N, fout, fin), got {rand.shape}")
    if (rand < 0).any() or (rand >= 1 << wd.frac_bits).any():
        raise EdgeError(f"random numbers must be in [0, 2^{wd.frac_bits})")
    trace = np.zeros(fin, np.int64) if x1 is None else _i64(x1).copy()
    lo, hi = wd.acc_lo, wd.acc_hi
    frac = 1 << wd.frac_bits
    clipped = 0
    for t in range(n):
        spiked = x[t] > 0  # a zero payload is no spike: the trace keeps its value
        trace[spiked] = pre_trace(x[t][spiked], wd)
        x0 = spiked.astype(np.int64)[None, :]
        xf = np.clip(trace, wd.trace_lo, wd.trace_hi)[None, :]
        y2, y3 = post_factors(y[t], r[t])
        acc = w << wd.frac_bits
        for p, ytr in zip(rule.products(), (y2, y3), strict=True):
            yf = np.clip(ytr, wd.trace_lo, wd.trace_hi)[:, None]
            mac = x0 * xf * yf * p["mantissa"]
            mac = (mac >> rule.shift) << (p["exponent"] + wd.frac_bits)
            clipped += int(((mac < lo) | (mac > hi)).sum())
            mac = np.clip(mac, lo, hi)
            s = acc + mac
            clipped += int(((s < lo) | (s > hi)).sum())
            acc = np.clip(s, lo, hi)
        # stochastic rounding: floor(acc / 2^f) + [rand < acc mod 2^f], then the weight clip
        q, rem = np.divmod(acc, np.int64(frac))
        w = np.clip(q + (rand[t] < rem), wd.weight_lo, wd.weight_hi)
    return EngineRun(w, trace, clipped)


# ------------------------------------------------------- edge's integer forms, same widths


def engine_plan(widths: EngineWidths = LOIHI2) -> ParamPlan:
    """The engine's weight as an edge parameter plan: an int16 store over the signed weight
    range, updated by stochastic_shift(-G, frac_bits)."""
    return ParamPlan(exponent=0, lo=widths.weight_lo, hi=widths.weight_hi, dtype="int16",
                     shift=0, lr_shift=widths.frac_bits)


def engine_noise(rand: Tensor, widths: EngineWidths = LOIHI2) -> Tensor:
    """edge's 16 random bits that make stochastic_shift(v, f) round as the engine does with
    the random number `rand` in [0, 2^f): up iff rand < v mod 2^f, i.e. a rounding offset
    2^f - 1 - rand in the top f of the 16 bits."""
    f = widths.frac_bits
    return (((1 << f) - 1 - rand.to(torch.int32)) << (intops.NOISE_BITS - f)).to(torch.int32)


def narrow_input(x: Tensor, widths: EngineWidths = LOIHI2) -> Tensor:
    """8-bit input codes as the engine's pre trace: round half to even of x / 2^shift,
    saturated at the trace width (uint8)."""
    t = intops.round_shift(intops.widen(x), widths.payload_shift)
    return intops.saturate(t, 0, widths.trace_hi).to(torch.uint8)


def edge_dense_update(store: Tensor, x: Tensor, y: Tensor, r: Tensor, rule: DenseRule,
                      rand: Tensor) -> Tensor:
    """The same N epochs with edge's integer forms at the engine's widths (module docstring):
    per sample, the input narrowed to the trace width, the ReLU mask, Linear's Hebbian
    product, the engine's product shift and accumulator saturation, and edge's update
    (`apply_update`) with the engine's random numbers as its random bits.

    store (fout, fin) int16; x (N, fin) uint8; y (N, fout) uint8; r (N, fout) int32 (the int8
    error); rand (N,) or (N, fout, fin) in [0, 2^frac_bits). Returns the new int16 store."""
    wd = rule.widths
    fout, fin = intops.dims(store)
    n = intops.dims(x)[0]
    lin, act, pp = Linear(fin, fout), ReLU(), engine_plan(wd)
    if rand.dim() == 1:
        rand = rand[:, None, None].expand(n, fout, fin)
    up = 1 << (rule.exponent + wd.frac_bits)
    for t in range(n):
        xt = QT(narrow_input(x[t : t + 1], wd), 0)
        _, e = act.int_adjoint(EAGER, "enc.0.1", {}, QT(y[t : t + 1], 0),
                               QT(r[t : t + 1].to(torch.int32), 0), need_gx=False)
        grads, _ = lin.int_adjoint(EAGER, "enc.0.0", {}, xt, e, need_gx=False)
        g = intops.floor_shift(intops.widen(grads["w"].t) * rule.mantissa, rule.shift) * up
        change = intops.saturate(g, wd.acc_lo, wd.acc_hi)
        noise = engine_noise(rand[t].contiguous(), wd)
        store = apply_update(pp, store, (-change).to(torch.int32), noise)
    return store


# --------------------------------------------------------------------- describe_engine

ENGINES = ("loihi2",)

MAPPING = (
    ("input code x_i (uint8, after the previous block's ReLU)",
     "pre trace x1 = round(x / 2), 7 bits, written by a graded spike (OVERWRITE)",
     "one bit dropped (round half to even, 255 -> 127)"),
    ("x_i > 0", "dependency x0 (the pre neuron spiked in this epoch)",
     "a zero code sends no spike: x0 gates out the stale trace"),
    ("ReLU gate [y_j > 0]", "applied by the post neuron to the third factor it sends",
     "alternatively the factor y0 (1 bit): one more bit lost in the product shift"),
    ("error r_j = SR(sum_t m_t q_tj) (int8, |r| <= 127)",
     "third factor: y2 = [y > 0] max(r, 0), y3 = [y > 0] max(-r, 0), 7-bit post traces "
     "set by the post neuron (Loihi3FLearningRule)", "exact: 7 bits hold |r|"),
    ("Hebbian sum e^T x over the batch (int32)",
     "one product per synapse per epoch, x1 * y * mantissa >> 3 << (exponent + 7), "
     "16-bit accumulator with saturation", "one sample per epoch: N epochs, N roundings"),
    ("store' = clamp(store + stochastic_shift(-G, K), lo, hi)",
     "w' = clip9(SR_7(clip16(w << 7 + sum of products)) >> 7)",
     "S = -2^(5 - K) maps edge's int8-store shift K (K in [-3, 12]; rule_for_lr_shift)"),
    ("int8 weight [-127, 127] (int8-w16: int16 store, 8 extra bits)",
     "9-bit signed weight [-256, 255], 7 accumulator bits below its LSB per epoch",
     "small steps survive only as the probability of a 1-LSB change; Lava's model feeds the "
     "learned 9-bit weight to the forward, scaled by the connection's shared weight_exp "
     "(proc/dense/models.py)"),
)

LIMITS = (
    ("convolutions",
     "no plasticity on a shared kernel: Lava's Conv process takes no learning rule, only "
     "LearningDense does; one kernel weight is many synapses, each updated alone",
     "expand the convolution into per-connection synapses (dense or sparse, O(HW) times "
     "the weights) and lose weight sharing, or an engine that sums the updates of all "
     "positions into the shared weight, or dW accumulated off the engine (embedded x86 "
     "cores) and written back"),
    ("the prediction B c as a third factor",
     "B is a learned D x Dc matrix: (B c)_j is a dense projection of the context "
     "population, not a trace of this synapse",
     "a prediction population fed by a second plastic connection (weights B) from the "
     "context, whose output q_j reaches post neuron j, which forms r_j = SR(sum_t m_t q_tj) "
     "and sends it as y2 / y3 (graded); B's own update dB = sum m z c^T is a second "
     "three-factor rule (pre c, post z, third factor m; as three 7-bit factors its product "
     "would lose 10 bits to the shift, so the post neuron should send z * sign(m) instead)"),
    ("the hinge's modulator m",
     "the sign of a margin: m = -1 / 0 / +1 from u = z^T B c, a reduction over all D "
     "neurons of the block per sample and term",
     "a neuron (or an embedded core) that sums z_d q_d, compares with the threshold and "
     "broadcasts m to the block's post neurons before the learning epoch ends"),
    ("batch vs online",
     "the engine evaluates each product once per epoch: one sample's outer product, then "
     "stochastic rounding into a 9-bit weight",
     "edge's batch sum (even batch 1 stacks two views) becomes N epochs with N roundings; "
     "equal to edge's update run per row, not to one batch step; the two views and the "
     "negatives' contexts must be held by neurons (edge's negatives memory) across epochs"),
    ("signed inputs (block 0 on int8 images)",
     "traces are unsigned (Lava clips trace impulses to [0, 127]) and a payload 0 sends no "
     "spike",
     "two pre populations (x+ and x-) with two synapses per weight, or an offset factor "
     "(x1 - 64) with payload x + 128 (x = -128 then sends no spike)"),
    ("the bias",
     "the engine updates synaptic variables (weight, delay, tag), not the neuron's bias",
     "an always-on pre neuron whose synapse is the bias, or the neuron's microcode"),
    ("timing",
     "traces decay stochastically in Lava's model; the rule needs x1 and y2 / y3 held for "
     "the epoch and one sample per epoch, with the pipeline latency of the layers",
     "a long trace time constant (Lava's three-factor rule holds post traces with tau = "
     "2^32), t_epoch covering the latency, samples spaced by epochs"),
)

VERIFIED = (
    "engine_dense_update (this module's NumPy model of the learning phase) equals lava-nc "
    "0.10.0's own code bit for bit on random data, saturating cases included: its parser "
    "(Loihi3FLearningRule), graded-spike pre traces (_process_pre_spikes, OVERWRITE), "
    "LearningRuleApplierBitApprox and the learning phase "
    "(LearningConnectionModelBitApproximate._apply_learning_rules); run once when this was "
    "written, with the lava-nc wheel unpacked on the path (it asks for Python < 3.11, its "
    "learning modules import under 3.11) and asteval; tests/test_loihi.py::test_against_lava "
    "repeats it wherever lava imports, and skips elsewhere",
    "edge_dense_update (edge's intops, ReLU and Linear integer forms, apply_update) equals "
    "engine_dense_update bit for bit: random data, several seeds, 16-bit saturation, fixed "
    "random bits, shared and per-synapse random numbers (tests/test_loihi.py)",
    "the widths matter: edge's full-width update (8-bit inputs, no product shift, 30-bit "
    "accumulator) differs from the 7/9/16-bit one",
)

ASSUMED = (
    "Loihi 2 silicon computes as Lava's bit-approximate model (Lava: it 'does not implement "
    "the exact behavior of Loihi'; the datapath is not public): widths and rounding are "
    "Lava's, the accumulator bounds [-(2^15) - 1, 2^15 - 1] included",
    "one sample per learning epoch, pre trace held through the epoch, the post neuron "
    "computing the gated, sign-split third factor and sending it as y2 / y3",
    "the stochastic rounding's random numbers: explicit 7-bit integers here (Lava: one float "
    "per epoch shared by all synapses; silicon's generator unknown)",
    "Intel's Loihi 2 brief (8-bit weights, stochastic rounding, three-factor learning, "
    "plasticity for dense connections only) as summarised in this project's "
    "targets/devices/loihi2*.toml; not read here",
)

SOURCES = (
    LAVA + "magma/core/learning/constants.py: the widths",
    LAVA + "magma/core/learning/learning_rule_applier.py: LearningRuleApplierBitApprox.apply",
    LAVA + "magma/core/learning/product_series.py: scaling factor, mantissa normalisation",
    LAVA + "magma/core/learning/learning_rule.py: LoihiLearningRule, Loihi3FLearningRule "
    "(post traces from the post neuron)",
    LAVA + "magma/core/model/py/connection.py: LearningConnectionModelBitApproximate "
    "(graded spikes, accumulator shift, stochastic rounding, weight clip)",
    LAVA + "magma/core/learning/random.py: ConnVarRandom (one float per epoch)",
    LAVA + "proc/learning_rules/three_factor_learning_rules.py: GatedHebbianLoihi "
    "(dw = lr * u0 * x1 * y1 * y2, the error as post trace y2)",
    LAVA + "proc/dense/process.py (LearningDense) and proc/conv/process.py (Conv: no "
    "learning rule)",
    LAVA + "utils/weightutils.py: clip_weights, SignMode",
)


def describe_engine(name: str = "loihi2") -> dict[str, Any]:
    """The CLAPP dense update on a learning engine, as plain JSON-able data: the widths with
    their sources, the rule (maths, Lava expression, products, shifts), the mapping from
    edge's integer update, what was verified and assumed, and where it does not fit."""
    if name not in ENGINES:
        raise EdgeError(f"unknown learning engine {name!r}; valid: {', '.join(ENGINES)}")
    wd, rule = LOIHI2, DenseRule(-1, 0, LOIHI2)
    widths = [{"name": f, "bits": getattr(wd, f), "meaning": m, "source": s, "status": st}
              for f, m, s, st in WIDTH_ROWS]
    return {
        "engine": name,
        "summary": "Intel Loihi 2's learning engine (as Lava's bit-approximate model computes "
                   "it): sum-of-products rules over 7-bit traces, 16-bit accumulator, 9-bit "
                   "signed weights, stochastic rounding; plasticity on dense connections",
        "widths": widths,
        "rule": {
            "update": "dW_ij = sum_n (sum_t m_nt q_ntj) * [y_nj > 0] * x_ni  (dW = e^T x)",
            "engine_form": "dw = S * x0 * x1 * y2 - S * x0 * x1 * y3, one sample per epoch",
            "lava_expression": rule.expression(),
            "learning_rule": "Loihi3FLearningRule (post traces y1..y3 set by the post "
                             "neuron) on a LearningDense connection",
            "products": rule.products(),
            "product_shift": rule.shift,
            "scale": "S = mantissa * 2^exponent, exponent in [-7, 8], mantissa in [-7, 7] "
                     "(Lava: [-8, 7]; the y3 product carries the negated mantissa); "
                     "S = -2^(5 - K) for edge's int8-store learning-rate shift K",
            "per_epoch": "T = clip16(floor(mantissa * x1 * r[y>0] / 2^3) * 2^(exponent + 7)); "
                         "w' = clip9(SR_7(clip16(w * 2^7 + T)) / 2^7)",
        },
        "mapping": [{"edge": a, "engine": b, "note": c} for a, b, c in MAPPING],
        "verified": list(VERIFIED),
        "assumed": list(ASSUMED),
        "limits": [{"what": a, "why": b, "would_need": c} for a, b, c in LIMITS],
        "sources": list(SOURCES),
    }


def render_engine(d: dict[str, Any]) -> str:
    """describe_engine's data as plain text (the `edge rules --engine` output)."""
    out = [f"learning engine: {d['engine']}", d["summary"], "", "widths:"]
    for w in d["widths"]:
        out.append(f"  {w['name']:<13}{w['bits']:>3}  {w['meaning']}")
        out.append(f"  {'':<16} [{w['status']}] {w['source']}")
    r = d["rule"]
    out += ["", "rule:", f"  update       {r['update']}", f"  engine form  {r['engine_form']}",
            f"  Lava         dw = {r['lava_expression']}", f"  as           {r['learning_rule']}",
            f"  per epoch    {r['per_epoch']}", f"  scale        {r['scale']}",
            f"  product shift {r['product_shift']} bits", "", "mapping (edge -> engine):"]
    for m in d["mapping"]:
        out += [f"  - {m['edge']}", f"      -> {m['engine']}", f"      ({m['note']})"]
    out += ["", "does not fit as it stands:"]
    for lim in d["limits"]:
        out += [f"  - {lim['what']}: {lim['why']}", f"      needs: {lim['would_need']}"]
    out += ["", "verified:"] + [f"  - {v}" for v in d["verified"]]
    out += ["", "assumed:"] + [f"  - {a}" for a in d["assumed"]]
    out += ["", "sources:"] + [f"  - {s}" for s in d["sources"]]
    return "\n".join(out)


__all__ = ["ENGINES", "LOIHI2", "WIDE", "DenseRule", "EngineRun", "EngineWidths",
           "describe_engine", "edge_dense_update", "engine_dense_update", "engine_noise",
           "engine_plan", "narrow_input", "post_factors", "pre_trace", "render_engine",
           "rule_for_lr_shift"]
