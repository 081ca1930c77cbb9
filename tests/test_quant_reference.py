"""The torch integer forms against the NumPy reference (`quant.reference`), bit for bit: every
primitive on its own (kernels, strides, paddings, groups, ties, odd sizes, 8-bit and int32
limits), then whole integer steps of the presets under every CLAPP-family rule."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from edge import rules
from edge.errors import EdgeError
from edge.layers import (
    AvgPool,
    Conv,
    Flatten,
    GlobalAvgPool,
    Identity,
    Linear,
    MaxPool,
    ReLU,
    ReLU6,
    intops,
)
from edge.layers.add import int_add
from edge.layers.base import QT
from edge.nets import Block, NetSpec, fold_batchnorm, preset
from quant import reference as ref
from quant.calibrate import make_plan
from quant.integer import (
    IntegerExecutor,
    integer_forward,
    integer_step,
    make_noise,
    noise_shapes,
    quantize_input,
)
from quant.plan import QuantPlan

KEY = "enc.0.1"
NOISE = "err.0.1.gx"
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ helpers


def _plan(exps: dict[str, int] | None = None) -> QuantPlan:
    return QuantPlan("int8", "clapp", 2, 0, exps or {}, {})


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _q(x: QT) -> ref.Q:
    return ref.Q(x.t.numpy().astype(np.int64), x.f, _name(x.t.dtype), Fraction(x.c))


def _same(got: QT | None, want: ref.Q | None, dtype: bool = True) -> None:
    if got is None or want is None:
        assert got is None and want is None
        return
    assert (got.f, got.c) == (want.f, float(want.c))
    if dtype:
        assert _name(got.t.dtype) == want.dtype
    np.testing.assert_array_equal(got.t.numpy(), want.t)


def _ints(rng: np.random.Generator, shape, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    """Uniform integers in [lo, hi] with both limits present."""
    a = rng.integers(lo, hi, size=shape, endpoint=True)
    flat = a.reshape(-1)
    flat[: min(2, flat.size)] = (lo, hi)[: min(2, flat.size)]
    return torch.from_numpy(a).to(dtype)


def _both(prim, exps: dict[str, int], noise: dict[str, torch.Tensor] | None = None):
    """The torch integer executor and the reference environment over one hand-made plan."""
    plan = _plan(exps)
    noise = noise or {}
    return IntegerExecutor(plan, noise), ref.Env(plan, {k: v.numpy() for k, v in noise.items()})


def _check_adjoint(prim, ex, env, p, rp, saved, rsaved, g: QT, need_gx: bool,
                   grads_only: bool = False):
    grads, gx = prim.int_adjoint(ex, KEY, p, saved, g, need_gx)
    rgrads, rgx = ref.adjoint(prim, env, KEY, rp, rsaved, _q(g), need_gx)
    assert set(grads) == set(rgrads)
    for k in grads:
        _same(grads[k], rgrads[k], dtype=False)  # int32 values (torch keeps them in int64)
    if not grads_only:
        _same(gx, rgx)


# ------------------------------------------------------------------ elementwise arithmetic


def test_rounding_and_shifts_match_intops():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.arange(-70, 71), rng.integers(-(2**40), 2**40, 500),
                        [INT32_MIN, INT32_MAX, INT32_MIN - 1, INT32_MAX + 1, -(2**50), 2**50]])
    xt = torch.from_numpy(x)
    for d in (1, 2, 3, 4, 5, 7, 8, 9, 16, 255, 256, 1 << 20):
        assert np.array_equal(ref.div_round(x, d), intops.div_round(xt, d).numpy()), d
    for k in (-3, 0, 1, 2, 7, 16, 17, 30):
        assert np.array_equal(ref.floor_shift(x, k), intops.floor_shift(xt, k).numpy()), k
        assert np.array_equal(ref.round_shift(x, k), intops.round_shift(xt, k).numpy()), k
        noise = rng.integers(0, 1 << 16, x.shape)
        noise[:4] = (0, 1, 65534, 65535)
        got = intops.stochastic_shift(xt, k, torch.from_numpy(noise).to(torch.int32))
        assert np.array_equal(ref.stochastic_shift(x, k, noise), got.numpy()), k
    for dtype in (torch.uint8, torch.int8, torch.int32):
        assert np.array_equal(ref.narrow(x, _name(dtype)).t, intops.narrow(xt, dtype).numpy())
    ties = np.array([-6, -2, 2, 6, 10, -10, 1, 3, -1, -3])
    assert ref.div_round(ties, 4).tolist() == [-2, 0, 0, 2, 2, -2, 0, 1, 0, -1]  # half to even
    with pytest.raises(TypeError):
        ref.ints(np.zeros(3))  # no floats into the integer reference


# ------------------------------------------------------------------ conv and linear

CONVS = [  # cin, cout, k, stride, padding, groups, input (H, W)
    (3, 4, 3, 1, 1, 1, (7, 5)),
    (4, 4, 3, 2, 1, 4, (9, 8)),  # depthwise, stride 2
    (4, 6, (3, 1), (2, 1), (1, 0), 2, (8, 6)),  # grouped, rectangular
    (2, 3, 1, 1, 0, 1, (5, 5)),  # pointwise
    (1, 2, (10, 4), 2, (5, 1), 1, (16, 8)),  # dscnn's stem
    (3, 2, 2, 3, 0, 1, (8, 7)),  # stride beyond the kernel: rows no window reads
    (6, 3, 5, 2, 2, 3, (11, 9)),
]


@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
@pytest.mark.parametrize("spec", CONVS, ids=[str(i) for i in range(len(CONVS))])
def test_conv_forward_and_adjoint(spec, signed):
    cin, cout, k, s, pad, groups, hw = spec
    prim = Conv(cin, cout, k, s, pad, groups)
    rng = np.random.default_rng(len(CONVS) * signed + CONVS.index(spec))
    lo, hi = (-128, 127) if signed else (0, 255)
    x = QT(_ints(rng, (3, cin, *hw), lo, hi, torch.int8 if signed else torch.uint8), 3)
    fan = cin // groups * prim.k[0] * prim.k[1]
    room = INT32_MAX - fan * max(-lo, hi) * 128  # the plan's bias bound: acc + b fits int32
    b = _ints(rng, (cout,), -room, room, torch.int32)
    p = {"w": QT(_ints(rng, prim.param_shapes()["w"], -128, 127, torch.int8), 5), "b": QT(b, 8)}
    rp = {n: _q(v) for n, v in p.items()}
    for f_gx in (2, -6):  # stochastic shifts of 10 and 18 (> NOISE_BITS) bits
        noise = {NOISE: _ints(rng, x.t.shape, 0, 65535, torch.int32)}
        ex, env = _both(prim, {KEY + ".gx": f_gx}, noise)
        y, saved = prim.int_forward(ex, KEY, p, x)
        ry, rsaved = ref.forward(prim, env, KEY, rp, _q(x))
        _same(y, ry)
        assert y.t.shape == (3, *prim.out_shape((cin, *hw)))
        g = QT(_ints(rng, y.t.shape, -127, 127, torch.int32), 7, 0.125)
        for need_gx in (True, False):
            _check_adjoint(prim, ex, env, p, rp, saved, rsaved, g, need_gx)


@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
@pytest.mark.parametrize("fin, fout", [(5, 3), (1, 1), (17, 4)])
def test_linear_forward_and_adjoint(fin, fout, signed):
    prim = Linear(fin, fout)
    rng = np.random.default_rng(fin + signed)
    lo, hi = (-128, 127) if signed else (0, 255)
    x = QT(_ints(rng, (4, fin), lo, hi, torch.int8 if signed else torch.uint8), 2)
    room = INT32_MAX - fin * max(-lo, hi) * 128
    p = {"w": QT(_ints(rng, (fout, fin), -128, 127, torch.int8), 6),
         "b": QT(_ints(rng, (fout,), -room, room, torch.int32), 8)}
    rp = {n: _q(v) for n, v in p.items()}
    ex, env = _both(prim, {KEY + ".gx": 3}, {NOISE: _ints(rng, (4, fin), 0, 65535, torch.int32)})
    y, saved = prim.int_forward(ex, KEY, p, x)
    ry, rsaved = ref.forward(prim, env, KEY, rp, _q(x))
    _same(y, ry)
    g = QT(_ints(rng, (4, fout), -127, 127, torch.int32), 4, 0.25)
    for need_gx in (True, False):
        _check_adjoint(prim, ex, env, p, rp, saved, rsaved, g, need_gx)


def test_hebbian_sums_saturate_at_int32():
    """x = 255 against e = -128 (and 127) over 66248 products: beyond (and just inside) int32."""
    for prim, x, g in (
        (Conv(1, 2, 1), torch.full((2, 1, 182, 182), 255, dtype=torch.uint8),
         torch.stack([torch.full((2, 182, 182), v, dtype=torch.int32) for v in (-128, 127)], 1)),
        (Linear(1, 2), torch.full((66248, 1), 255, dtype=torch.uint8),
         torch.tensor([[-128, 127]], dtype=torch.int32).expand(66248, 2).contiguous()),
    ):
        p = {"w": QT(torch.ones(prim.param_shapes()["w"], dtype=torch.int8), 0),
             "b": QT(torch.zeros(2, dtype=torch.int32), 0)}
        ex, env = _both(prim, {})
        grads, _ = prim.int_adjoint(ex, KEY, p, QT(x, 0), QT(g, 0), False)
        rgrads, _ = ref.adjoint(prim, env, KEY, {k: _q(v) for k, v in p.items()}, _q(QT(x, 0)),
                                _q(QT(g, 0)), False)
        w = rgrads["w"].t.reshape(-1)
        assert w.tolist() == [-(INT32_MAX - 2**16), 66248 * 255 * 127]  # symmetric saturation
        assert np.array_equal(grads["w"].t.numpy().reshape(-1), w)
        assert np.array_equal(grads["b"].t.numpy(), rgrads["b"].t)


@pytest.mark.parametrize("prim", [Conv(2, 3, 3, 1, 1), Linear(4, 3)], ids=["conv", "linear"])
def test_bias_gradient_of_an_error_beyond_int8(prim):
    rng = np.random.default_rng(5)
    shape = (2, 2, 4, 4) if isinstance(prim, Conv) else (2, 4)
    x = QT(_ints(rng, shape, 0, 255, torch.uint8), 0)
    p = {"w": QT(_ints(rng, prim.param_shapes()["w"], -127, 127, torch.int8), 0),
         "b": QT(torch.zeros(3, dtype=torch.int32), 0)}
    ex, env = _both(prim, {})
    y, saved = prim.int_forward(ex, KEY, p, x)
    g = QT(_ints(rng, y.t.shape, -508, 508, torch.int32), 0)  # 4 windows of 127 on one cell
    _check_adjoint(prim, ex, env, p, {k: _q(v) for k, v in p.items()}, saved, _q(x), g, False,
                   grads_only=True)


def test_overlapping_max_pool_routes_errors_beyond_int8():
    """Why the case above is reachable: an argmax shared by 4 windows gets 4 errors."""
    prim = MaxPool(3, 2, 1)
    x = QT(torch.ones((1, 1, 5, 5), dtype=torch.uint8), 0)
    x.t[0, 0, 1, 1] = 9  # in the windows at rows and columns -1..1 and 1..3
    ex, env = _both(prim, {})
    y, saved = prim.int_forward(ex, KEY, {}, x)
    g = QT(torch.full(y.t.shape, 127, dtype=torch.int32), 0)
    _, gx = prim.int_adjoint(ex, KEY, {}, saved, g, True)
    _, rgx = ref.adjoint(prim, env, KEY, {}, ref.forward(prim, env, KEY, {}, _q(x))[1], _q(g),
                         True)
    _same(gx, rgx)
    assert int(gx.t.max()) == 4 * 127


# ------------------------------------------------------------------ activations


def _acc_values(shift: int, hi: int) -> np.ndarray:
    """Accumulators that land on, between (ties) and around the output grid at `shift`."""
    targets = np.array([-2, -1, 0, 1, 2, 3, 5, 6, 7, 126, 127, 128, 191, 192, 193, 254, 255, 256,
                        hi - 1, hi, hi + 1])
    if shift <= 0:
        base = targets
    else:
        half = 1 << (shift - 1)
        base = np.concatenate([(targets << shift) + d for d in (-half, -1, 0, 1, half, half + 1)
                               if abs(d) < (1 << shift)])
    return np.concatenate([base, [INT32_MIN, INT32_MAX, INT32_MIN + 1, INT32_MAX - 1]])


@pytest.mark.parametrize("f_y", [-3, -1, 0, 5, 6])  # relu6 tops at 0, 3, 6, 192, 255
@pytest.mark.parametrize("shift", [-3, 0, 1, 4, 20])  # f_acc - f_y
@pytest.mark.parametrize("prim", [ReLU(), ReLU6(), Identity()], ids=["relu", "relu6", "identity"])
def test_activation_requantization_and_mask(prim, shift, f_y):
    x = torch.from_numpy(_acc_values(shift, prim.int_range(f_y)[1])).to(torch.int32)
    ex, env = _both(prim, {KEY: f_y})
    rng = np.random.default_rng(100 + shift + 10 * f_y)
    for xt in (x, intops.narrow(x, torch.int8)):  # an int32 accumulator, or an 8-bit value
        x_in = QT(xt.reshape(1, -1), f_y + shift)
        y, saved = prim.int_forward(ex, KEY, {}, x_in)
        ry, rsaved = ref.forward(prim, env, KEY, {}, _q(x_in))
        _same(y, ry)
        g = QT(_ints(rng, y.t.shape, -127, 127, torch.int32), 3, 0.5)
        _check_adjoint(prim, ex, env, {}, {}, saved, rsaved, g, True)


def test_relu6_boundaries():
    """f_y = 5: the top is 192 (= 6 exactly): 191 passes the error, 192 and above do not."""
    ex, env = _both(ReLU6(), {KEY: 5})
    x = QT(torch.tensor([[0, 1, 191, 192, 193, 255, 300]], dtype=torch.int32), 5)
    y, saved = ReLU6().int_forward(ex, KEY, {}, x)
    assert y.t.tolist() == [[0, 1, 191, 192, 192, 192, 192]]
    _, gx = ReLU6().int_adjoint(ex, KEY, {}, saved, QT(torch.ones_like(x.t), 0), True)
    assert gx.t.tolist() == [[0, 1, 1, 0, 0, 0, 0]]
    ry, _ = ref.forward(ReLU6(), env, KEY, {}, _q(x))
    assert ry.t.tolist() == y.t.tolist()
    assert ref.act_mask("relu6", ry).tolist() == [[False, True, True, False, False, False, False]]


# ------------------------------------------------------------------ pools, flatten, add

POOLS = [  # k, stride, padding, input (H, W)
    (2, None, 0, (5, 7)),  # odd sizes: floor crop
    (3, 2, 1, (7, 6)),  # overlapping windows with padding
    (3, 1, 1, (4, 5)),
    ((2, 3), (1, 2), (1, 1), (6, 7)),
    (3, 3, 1, (7, 7)),  # disjoint windows that cover the padded map
    (1, 1, 0, (3, 3)),
]
DTYPES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int32: (INT32_MIN, INT32_MAX)}


def _pool_input(rng, hw, dtype) -> QT:
    """Few distinct values (many ties, also with the padding's minimum) or the full range."""
    lo, hi = DTYPES[dtype]
    few = np.array([lo, lo, lo + 1, hi - 1, hi, hi])[rng.integers(0, 6, (2, 3, *hw))]
    full = rng.integers(lo, hi, (2, 3, *hw), endpoint=True)
    return QT(torch.from_numpy(np.concatenate([few, full])).to(dtype), 4)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=_name)
@pytest.mark.parametrize("spec", POOLS, ids=[str(i) for i in range(len(POOLS))])
@pytest.mark.parametrize("cls", [MaxPool, AvgPool])
def test_pools(cls, spec, dtype):
    k, s, pad, hw = spec
    prim = cls(k, s, pad)
    rng = np.random.default_rng(POOLS.index(spec))
    x = _pool_input(rng, hw, dtype)
    ex, env = _both(prim, {})
    y, saved = prim.int_forward(ex, KEY, {}, x)
    ry, rsaved = ref.forward(prim, env, KEY, {}, _q(x))
    _same(y, ry)
    if cls is MaxPool:  # the first row-major argmax, as the torch form keeps it
        np.testing.assert_array_equal(saved[0].numpy(), rsaved[0])
    g = QT(_ints(rng, y.t.shape, -127, 127, torch.int32), 6, 0.25)
    _check_adjoint(prim, ex, env, {}, {}, saved, rsaved, g, True)


def test_max_pool_ties_go_to_the_first_position():
    x = QT(torch.tensor([[[[5, 5, 1], [5, 5, 1]]]], dtype=torch.int8), 0)
    prim = MaxPool(2, 1, 0)
    ex, env = _both(prim, {})
    y, saved = prim.int_forward(ex, KEY, {}, x)
    ry, (off, _) = ref.forward(prim, env, KEY, {}, _q(x))
    assert off.tolist() == saved[0].tolist() == [[[[0, 0]]]]
    _, gx = prim.int_adjoint(ex, KEY, {}, saved, QT(torch.tensor([[[[3, 4]]]]), 0), True)
    assert gx.t.tolist() == [[[[3, 4, 0], [0, 0, 0]]]]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8], ids=_name)
@pytest.mark.parametrize("hw", [(3, 5), (2, 2), (1, 1), (4, 6)])
def test_global_average_pool(hw, dtype):
    prim = GlobalAvgPool()
    x = _pool_input(np.random.default_rng(hw[0]), hw, dtype)
    ex, env = _both(prim, {})
    y, saved = prim.int_forward(ex, KEY, {}, x)
    ry, rsaved = ref.forward(prim, env, KEY, {}, _q(x))
    _same(y, ry)
    g = QT(_ints(np.random.default_rng(1), y.t.shape, -127, 127, torch.int32), 2, 0.5)
    _check_adjoint(prim, ex, env, {}, {}, saved, rsaved, g, True)


def test_flatten_and_residual_add():
    rng = np.random.default_rng(3)
    x = QT(_ints(rng, (2, 3, 4, 5), -128, 127, torch.int8), 3)
    ex, env = _both(Flatten(), {})
    y, saved = Flatten().int_forward(ex, KEY, {}, x)
    ry, rsaved = ref.forward(Flatten(), env, KEY, {}, _q(x))
    _same(y, ry)
    _check_adjoint(Flatten(), ex, env, {}, {}, saved, rsaved,
                   QT(_ints(rng, (2, 60), -127, 127, torch.int32), 1, 0.5), True)
    for fa, fb in ((3, 5), (5, 3), (4, 4)):
        a = QT(_ints(rng, (2, 3), 0, 255, torch.uint8), fa)
        b = QT(_ints(rng, (2, 3), -128, 127, torch.int8), fb)
        _same(int_add(a, b), ref.add(_q(a), _q(b)))


def test_batchnorm_has_no_integer_form():
    net = preset("resnet8", (3, 8, 8), 0.25)  # BatchNorm not folded
    x = np.zeros((2, 3, 8, 8), np.int8)
    with pytest.raises(EdgeError, match="BatchNorm"):
        ref.reference_forward(net, _plan(), {}, x)
    with pytest.raises(EdgeError, match="BatchNorm"):
        ref.reference_step(net, "clapp", _plan(), {}, x, x, {})


# ------------------------------------------------------------------ whole steps


class _Recording(dict):
    """Random bits that remember which keys were read."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _setup(net: NetSpec, rule, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    net, params = fold_batchnorm(net, net.init_params(g))
    params.update(rule.init(net, g))
    views = [tuple(torch.randn(n, *net.in_shape, generator=g) for _ in range(2))]
    plan, qp = make_plan(net, rule, params, views)
    return net, plan, qp, g


def _steps(net: NetSpec, rule, steps: int = 3, n: int = 2) -> None:
    """`steps` integer steps in a row, torch and reference: every store equal bit for bit,
    every block's loss equal, the same random bits read; something must move."""
    net, plan, qp, g = _setup(net, rule, n)
    form = rule.integer_form(net)
    shapes = noise_shapes(net, form, plan, qp)
    mine = {k: v.numpy().copy() for k, v in qp.items()}
    start = {k: v.copy() for k, v in mine.items()}
    for _ in range(steps):
        x1, x2 = (quantize_input(torch.randn(n, *net.in_shape, generator=g), plan.f_in)
                  for _ in range(2))
        noise = make_noise(shapes, g)
        qp, metrics = integer_step(net, form, plan, qp, x1, x2, noise)
        bits = _Recording({k: v.numpy() for k, v in noise.items()})
        mine, losses = ref.reference_step(net, rule, plan, mine, x1.numpy(), x2.numpy(), bits)
        assert bits.read == set(noise), set(noise) ^ bits.read
        assert set(mine) == set(qp)
        for k, v in qp.items():
            assert mine[k].dtype == v.numpy().dtype, k
            assert np.array_equal(mine[k], v.numpy()), f"{k} differs from the reference"
        assert [loss.value for loss in losses] == metrics["layer_loss"].tolist()
        assert all(loss.exact >= 0 for loss in losses)
    assert any(not np.array_equal(mine[k], start[k]) for k in mine), "nothing moved"


PRESETS = {  # name: (input shape, width)
    "digits": ((1, 8, 8), 0.25),
    "mlp": ((1, 4, 4), 0.05),
    "resnet8": ((3, 8, 8), 0.25),
    "dscnn": ((1, 16, 8), 0.1),
    "mobilenetv2-0.35": ((3, 16, 16), 0.25),
}
RULES = [("clapp", {}),
         *[(r, {"predictor": kind, "rank": 3}) for r in ("clapp++", "clapp++dfb", "clapp++both")
           for kind in ("full", "lowrank")]]
SLOW = "mobilenetv2-0.35"  # 19 blocks: one rule by default, the rest marked slow
CASES = [pytest.param(name, r, hp, id=f"{name}-{r}-{hp.get('predictor', 'full')}",
                      marks=pytest.mark.slow if name == SLOW and r != "clapp++both" else ())
         for name in PRESETS for r, hp in RULES]


@pytest.mark.parametrize("name, rule_name, hp", CASES)
def test_integer_step_equals_the_reference(name, rule_name, hp):
    shape, width = PRESETS[name]
    _steps(preset(name, shape, width), rules.get(rule_name, **hp))


def _every_primitive(overlap: bool = False) -> NetSpec:
    """Every primitive in a step: relu6 + padded max-pool (fused), a grouped rectangular conv
    with its `.q`, an average pool, a residual with a conv shortcut whose post starts with a
    max-pool (`add.q`), global pool + linear, a last linear (flat codes)."""
    mp, ap = (MaxPool(3, 2, 1), AvgPool(3, 2, 1)) if overlap else (MaxPool(3, 3, 1), AvgPool(2))
    return NetSpec("all", (1, 12, 12), (
        Block((Conv(1, 4, 3, 1, 1), ReLU6(), mp)),
        Block((Conv(4, 4, (3, 1), 1, (1, 0), groups=2), ap, ReLU())),
        Block((Conv(4, 4, 3, 1, 1), ReLU(), Conv(4, 4, 1)), (Conv(4, 4, 1),), (MaxPool(2),)),
        Block((GlobalAvgPool(), Linear(4, 6), ReLU())),
        Block((Linear(6, 5),)),
    ))


@pytest.mark.parametrize("overlap", [False, True], ids=["disjoint", "overlapping"])
@pytest.mark.parametrize("rule_name, hp", [("clapp", {}), ("clapp++both", {"predictor": "full"}),
                                           ("clapp++dfb", {"predictor": "lowrank", "rank": 2})])
def test_every_primitive_in_a_step(rule_name, hp, overlap):
    _steps(_every_primitive(overlap), rules.get(rule_name, **hp), n=3)


def test_forward_equals_integer_forward():
    rule = rules.get("clapp")
    for net in (preset("digits", (1, 8, 8), 0.25), _every_primitive(True)):
        net, plan, qp, g = _setup(net, rule, 2)
        x = quantize_input(torch.randn(3, *net.in_shape, generator=g), plan.f_in)
        outs = integer_forward(net, plan, qp, x)
        mine = ref.reference_forward(net, plan, {k: v.numpy() for k, v in qp.items()}, x.numpy())
        assert len(outs) == len(mine) == len(net.blocks)
        for a, b in zip(outs, mine, strict=True):
            _same(a, b)


def test_rule_terms_from_names_and_objects():
    net = _every_primitive()
    for name in ref.TERMS:
        r = rules.get(name)
        r.check(net)
        assert ref.rule_terms(name, net) == ref.rule_terms(r, net)
        assert ref.rule_terms(r.integer_form(net), net) == ref.rule_terms(r, net)
    assert ref.rule_terms("clapp", net).kernels == (None,) * 5
    assert ref.rule_terms("clapp++", net).kernels == (2, 1, 1, 1, 1)
    assert ref.rule_terms(rules.get("clapp++", pool=[4, 2, 1, 1, 1]), net).kernels[:2] == (4, 2)
    with pytest.raises(EdgeError):
        ref.rule_terms("ff", net)
