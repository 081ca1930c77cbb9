"""The npu operator profile: the plain graph's numbers with no booleans left.

Every check runs both graphs in onnxruntime and asks for the same bits: integers exactly,
floats exactly up to the sign of a zero (module docstring of export.profile: s x + (1 - s) y
and s x may give -0 where Where gives +0), on finite inputs, ties and type limits included.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edge import rules
from edge.app.cli import main
from edge.errors import EdgeError
from edge.layers import TRACED
from edge.layers.act import ReLU, ReLU6
from edge.layers.base import QT
from edge.layers.pool import MaxPool
from edge.nets import preset
from edge.optim import OptimConfig
from export.profile import BANNED_OPS, apply_profile, npu_profile, npu_violations, profile_bundle
from export.trace import check_model, export_function, op_counts

TP = TensorProto
INT_TYPES = {
    "int8": TP.INT8,
    "uint8": TP.UINT8,
    "int16": TP.INT16,
    "uint16": TP.UINT16,
    "int32": TP.INT32,
    "uint32": TP.UINT32,
    "int64": TP.INT64,
    "uint64": TP.UINT64,
}
COMPARISONS = {
    "Greater": np.greater,
    "Less": np.less,
    "GreaterOrEqual": np.greater_equal,
    "LessOrEqual": np.less_equal,
    "Equal": np.equal,
}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _bits(a: np.ndarray) -> bytes:
    """The bytes of `a`, a float's -0 read as +0."""
    return (a + np.zeros((), a.dtype)).tobytes() if a.dtype.kind == "f" else a.tobytes()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _bits(a) == _bits(b)


def _npu_equals_plain(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The npu graph: no violations, the plain interface, the checker, the plain outputs."""
    npu = apply_profile(model, "npu")
    assert npu_violations(npu) == []
    assert not set(op_counts(npu)) & BANNED_OPS
    assert [i for i in npu.graph.input] == [i for i in model.graph.input]
    assert [o.name for o in npu.graph.output] == [o.name for o in model.graph.output]
    check_model(npu, [i.name for i in model.graph.input], [o.name for o in model.graph.output])
    for name, a, b in zip(
        [o.name for o in model.graph.output], _run(model, feeds), _run(npu, feeds), strict=True
    ):
        assert _same(a, b), name
    return npu


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


# ---------------------------------------------------------------------- the layer library


def _pool_fn(pool: MaxPool):
    def fn(t):
        y, saved = pool.forward(TRACED, {}, t["x"])
        _, gx = pool.adjoint(TRACED, {}, saved, t["g"], True)
        return {"y": y, "off": saved[0], "gx": gx}

    return fn


@pytest.mark.parametrize(
    "pool",
    [MaxPool(2), MaxPool(3, stride=2, padding=1), MaxPool(2, stride=1)],
    ids=["2x2", "3x3s2p1", "2x2s1"],
)
def test_max_pool_with_ties_routes_to_the_first_maximum(pool):
    """Windows whose maximum appears more than once (a constant patch, odd sizes that floor
    pooling crops): the npu graph routes each error to the same element as the plain graph
    and as torch's own max-pool backward (the first maximum in row-major order)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 6, generator=gen)
    x[:, :, :4, :4] = 0.5
    x[0, 0, 5, :] = -0.0
    oh, ow = pool.out_shape((3, 7, 6))[1:]
    g = torch.randn(2, 3, oh, ow, generator=gen)
    model = export_function(_pool_fn(pool), {"x": x, "g": g}, ["y", "off", "gx"])
    assert {"Equal x", "Where x"} <= {v[: v.index("x") + 1] for v in npu_violations(model)}
    feeds = {"x": x.numpy(), "g": g.numpy()}
    _npu_equals_plain(model, feeds)
    xr = x.clone().requires_grad_(True)
    torch.nn.functional.max_pool2d(xr, pool.k, pool.stride, pool.padding).backward(g)
    npu = apply_profile(model, "npu")
    twice = npu_profile(npu)  # nothing left to rewrite: the same graph again
    assert npu_violations(twice) == [] and len(twice.graph.node) == len(npu.graph.node)
    got = _run(npu, feeds)[2]
    np.testing.assert_allclose(got, xr.grad.numpy(), rtol=1e-6, atol=1e-6)
    assert np.count_nonzero(got) == np.count_nonzero(xr.grad.numpy())


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32])
def test_integer_max_pool_at_the_type_limits_is_bit_exact(dtype):
    """The integer forms compare two integer tensors (window element vs pooled max) and
    the uint8 offsets against constants; values at the type's limits, ties everywhere."""
    info = torch.iinfo(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(info.min, info.max, (2, 3, 6, 6), generator=gen, dtype=torch.int64)
    x[0, 0, :2, :2] = info.max
    x[0, 1, :2, :2] = info.min
    x[1, 0, :, :3] = info.min
    x[1, 1, 2:4, 2:4] = torch.tensor([[info.min, info.max], [info.max, info.min]])
    x = x.to(dtype)
    g = torch.randint(-(2**31), 2**31 - 1, (2, 3, 3, 3), generator=gen, dtype=torch.int32)
    pool = MaxPool(2)

    def fn(t):
        y, saved = pool.int_forward(TRACED, "k", {}, QT(t["x"], 3))
        _, gx = pool.int_adjoint(TRACED, "k", {}, saved, QT(t["g"], 2), True)
        return {"y": y.t, "gx": gx.t, "masked": torch.where(ReLU().int_mask(y), t["g"], 0)}

    model = export_function(fn, {"x": x, "g": g}, ["y", "gx", "masked"])
    assert npu_violations(model)
    _npu_equals_plain(model, {"x": x.numpy(), "g": g.numpy()})


def test_activation_masks_and_sign():
    """ReLU6's mask is (y > 0) & (y < 6): And of two comparisons, cast to float."""

    def fn(t):
        y, saved = ReLU6().forward(TRACED, {}, t["x"])
        _, gx = ReLU6().adjoint(TRACED, {}, saved, t["g"], True)
        return {"y": y, "gx": gx, "sign": torch.sign(t["x"]), "isign": torch.sign(t["i"])}

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 10, generator=gen) * 8
    x[0, :4] = torch.tensor([0.0, -0.0, 6.0, 1e-45])
    i = torch.tensor([[-(2**31), -1, 0, 1, 2**31 - 1]], dtype=torch.int32)
    inputs = {"x": x, "g": torch.randn(4, 10, generator=gen), "i": i}
    model = export_function(fn, inputs, ["y", "gx", "sign", "isign"])
    assert {"And x1", "Sign x2"} <= set(npu_violations(model))
    _npu_equals_plain(model, {k: v.numpy() for k, v in inputs.items()})


# ---------------------------------------------------------------------- comparisons by hand


def _compare_model(op: str, elem: int, const: np.ndarray | None, flip: bool = False):
    """out = Cast(op(a, b), int32); b a constant (on the left when `flip`) or an input."""
    a = helper.make_tensor_value_info("a", elem, [None])
    inputs, inits = [a], []
    if const is None:
        inputs.append(helper.make_tensor_value_info("b", elem, [None]))
    else:
        inits.append(numpy_helper.from_array(const, "b"))
    ins = ["b", "a"] if flip else ["a", "b"]
    nodes = [
        helper.make_node(op, ins, ["m"]),
        helper.make_node("Cast", ["m"], ["out"], to=TP.INT32),
    ]
    return _model(nodes, inputs, [helper.make_tensor_value_info("out", TP.INT32, [None])], inits)


def _static(model: onnx.ModelProto, n: int) -> onnx.ModelProto:
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = n
    return model


def _edges(dtype: np.dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    vals = {
        info.min,
        info.min + 1,
        info.min + 2,
        -2,
        -1,
        0,
        1,
        2,
        info.max - 2,
        info.max - 1,
        info.max,
        info.max // 2,
        info.min // 2,
    }
    return np.array(sorted(v for v in vals if info.min <= v <= info.max), dtype)


@pytest.mark.parametrize("op", COMPARISONS)
@pytest.mark.parametrize("name", INT_TYPES)
def test_integer_comparison_with_a_constant_near_the_limits(name, op):
    """a ? c for every edge value c of the type (c = min, max included), both operand
    orders: the Clip forms, equal to NumPy's comparison on every edge value of a."""
    dtype = np.dtype(name)
    a = _edges(dtype)
    for c in a:
        for flip in (False, True):
            model = _static(_compare_model(op, INT_TYPES[name], np.array(c, dtype), flip), a.size)
            want = COMPARISONS[op](c, a) if flip else COMPARISONS[op](a, c)
            got = _npu_equals_plain(model, {"a": a})
            assert np.array_equal(_run(got, {"a": a})[0], want.astype(np.int32)), (c, flip)


@pytest.mark.parametrize("op", COMPARISONS)
@pytest.mark.parametrize("name", ["int8", "uint8", "int16", "uint16", "int32", "uint32"])
def test_integer_comparison_of_two_tensors_is_widened(name, op):
    """a ? b for every pair of edge values: a - b would overflow in the type itself
    (int8: 127 - -128), so both sides are widened first; the result is NumPy's."""
    dtype = np.dtype(name)
    e = _edges(dtype)
    a, b = (v.ravel() for v in np.meshgrid(e, e))
    model = _static(_compare_model(op, INT_TYPES[name], None), a.size)
    npu = _npu_equals_plain(model, {"a": a, "b": b})
    assert "Cast" in op_counts(npu)  # the widening is there
    assert np.array_equal(_run(npu, {"a": a, "b": b})[0], COMPARISONS[op](a, b).astype(np.int32))


@pytest.mark.parametrize("name", ["int64", "uint64"])
def test_64_bit_tensor_comparisons_are_left_and_reported(name):
    """No wider integer type: the comparison stays (the numbers unchanged) and is named."""
    dtype = np.dtype(name)
    e = _edges(dtype)
    a, b = (v.ravel() for v in np.meshgrid(e, e))
    model = _static(_compare_model("Greater", INT_TYPES[name], None), a.size)
    npu = npu_profile(model)
    assert npu_violations(npu) == ["Cast from bool x1", "Greater x1"]
    assert np.array_equal(_run(npu, {"a": a, "b": b})[0], (a > b).astype(np.int32))


@pytest.mark.parametrize("op", COMPARISONS)
@pytest.mark.parametrize("elem", [TP.FLOAT, TP.FLOAT16, TP.DOUBLE], ids=["f32", "f16", "f64"])
def test_float_comparisons_are_exact(op, elem):
    """Tensor against tensor and against constants: signed zeros, subnormals, ties, and
    differences that overflow to infinity (the sign survives Clip and Ceil)."""
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    fi = np.finfo(dtype)
    tiny = fi.smallest_subnormal
    e = np.array(
        [-fi.max, -1.5, -tiny, -0.0, 0.0, tiny, 2 * tiny, fi.tiny, 0.5, 1.0, 1.0 + fi.eps, fi.max],
        dtype,
    )
    a, b = (v.ravel() for v in np.meshgrid(e, e))
    model = _static(_compare_model(op, elem, None), a.size)
    npu = _npu_equals_plain(model, {"a": a, "b": b})
    assert np.array_equal(_run(npu, {"a": a, "b": b})[0], COMPARISONS[op](a, b).astype(np.int32))
    for c in (0.0, tiny, -1.5):
        model = _static(_compare_model(op, elem, np.array(c, dtype)), e.size)
        npu = _npu_equals_plain(model, {"a": e})
        assert np.array_equal(_run(npu, {"a": e})[0], COMPARISONS[op](e, c).astype(np.int32))


WHERE_TYPES = {"u8": TP.UINT8, "i8": TP.INT8, "i32": TP.INT32, "i64": TP.INT64, "f32": TP.FLOAT}


def test_logic_casts_wheres_and_moves():
    """Not / And / Or / Xor / bool == bool, Cast to bool, a constant mask, Where with float,
    uint8, int8, int32 and int64 branches at their limits, booleans reshaped and
    concatenated."""
    vi, node, n = helper.make_tensor_value_info, helper.make_node, 8
    inputs = [
        vi("f", TP.FLOAT, [n]),
        vi("h", TP.FLOAT, [n]),
        vi("i8", TP.INT8, [n]),
        vi("k", TP.INT32, [n]),
    ]
    inputs += [vi(f"{side}_{t}", e, [n]) for t, e in WHERE_TYPES.items() for side in "wv"]
    inits = [
        numpy_helper.from_array(np.array(0, np.int8), "z8"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zf"),
        numpy_helper.from_array(np.array([2, 4], np.int64), "shape"),
        numpy_helper.from_array(np.array([1, n], np.int64), "wide"),
        numpy_helper.from_array(np.array([True, False] * (n // 2)), "mask"),
    ]
    nodes = [
        node("Greater", ["f", "h"], ["gt"]),
        node("Less", ["i8", "z8"], ["neg"]),
        node("Not", ["gt"], ["not"]),
        node("And", ["gt", "neg"], ["and"]),
        node("Or", ["gt", "neg"], ["or"]),
        node("Xor", ["gt", "neg"], ["xor"]),
        node("Equal", ["gt", "neg"], ["beq"]),
        node("Cast", ["k"], ["kb"], to=TP.BOOL),
        node("And", ["kb", "mask"], ["km"]),
        node("Reshape", ["xor", "shape"], ["r"]),
        node("Reshape", ["r", "wide"], ["r2"]),
        node("Concat", ["and", "kb"], ["cat"], axis=0),
        node("Where", ["xor", "f", "zf"], ["routed"]),
        node("Where", ["and", "zf", "h"], ["kept"]),
    ]
    outs = [vi("routed", TP.FLOAT, [n]), vi("kept", TP.FLOAT, [n])]
    shapes = {"r2": [1, n], "cat": [2 * n]}
    for b in ("not", "and", "or", "xor", "beq", "kb", "km", "r2", "cat"):
        nodes.append(node("Cast", [b], [f"out_{b}"], to=TP.FLOAT))
        outs.append(vi(f"out_{b}", TP.FLOAT, shapes.get(b, [n])))
    for t, e in WHERE_TYPES.items():
        nodes.append(node("Where", ["or", f"w_{t}", f"v_{t}"], [f"sel_{t}"]))
        outs.append(vi(f"sel_{t}", e, [n]))
    model = _model(nodes, inputs, outs, inits)
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(3)
    f = rng.standard_normal(n).astype(np.float32)
    feeds = {
        "f": f,
        "h": np.where(np.arange(n) % 3 == 0, f, -f),
        "k": np.array([0, 1, -1, 2**31 - 1, -(2**31), 0, 5, 0], np.int32),
        "i8": np.array([-128, -1, 0, 1, 127, -5, 3, 0], np.int8),
    }
    for t, e in WHERE_TYPES.items():
        dtype = helper.tensor_dtype_to_np_dtype(e)
        if dtype.kind == "f":
            w, v = rng.standard_normal((2, n)).astype(dtype)
        else:
            info = np.iinfo(dtype)
            w = np.array([info.min, info.max] * (n // 2), dtype)
            v = np.array([info.max, info.min, 0, 1] * (n // 4), dtype)
        feeds[f"w_{t}"], feeds[f"v_{t}"] = w, v
    assert {"Where x7", "Cast from bool x9"} <= set(npu_violations(model))
    _npu_equals_plain(model, feeds)


def test_unknown_patterns_are_left_and_named():
    """A bool graph output must stay bool (the interface), a scatter has no npu form, a
    MaxPool's Indices and a dynamic axis are what they are: all reported, none hidden."""
    vi = helper.make_tensor_value_info
    nodes = [
        helper.make_node("Greater", ["x", "y"], ["gt"]),
        helper.make_node("MaxPool", ["m"], ["p", "idx"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ScatterElements", ["d", "i", "u"], ["s"], axis=0),
    ]
    model = _model(
        nodes,
        [
            vi("x", TP.FLOAT, ["n"]),
            vi("y", TP.FLOAT, ["n"]),
            vi("m", TP.FLOAT, [1, 1, 4, 4]),
            vi("d", TP.FLOAT, [4]),
            vi("i", TP.INT64, [2]),
            vi("u", TP.FLOAT, [2]),
        ],
        [
            vi("gt", TP.BOOL, ["n"]),
            vi("p", TP.FLOAT, [1, 1, 2, 2]),
            vi("idx", TP.INT64, [1, 1, 2, 2]),
            vi("s", TP.FLOAT, [4]),
        ],
    )
    want = [
        "Greater x1",
        "MaxPool with Indices x1",
        "ScatterElements x1",
        "dynamic shapes: x, y, gt",
    ]
    assert npu_violations(model) == want
    assert npu_violations(npu_profile(model)) == want


def test_unknown_profile_is_an_error():
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TP.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [2])],
    )
    assert apply_profile(model, "plain") is model
    with pytest.raises(EdgeError, match="unknown operator profile 'gpu'; valid: plain, npu"):
        apply_profile(model, "gpu")


def test_cli_profile_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "export",
                "--profile",
                "gpu",
                "--width",
                "0.25",
                "--batch-size",
                "4",
                "-o",
                str(tmp_path / "x"),
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown operator profile") and len(err.splitlines()) == 1


# ---------------------------------------------------------------------- whole steps


def _setup(rule_name: str = "clapp++"):
    net = preset("digits", (1, 8, 8), 0.25)
    rule, opt = rules.get(rule_name), OptimConfig("adamw", lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    params = net.init_params(gen)
    params.update(rule.init(net, gen))
    return net, rule, opt, params, opt.init_state(params)


def _step_feeds(model: onnx.ModelProto, carried: dict[str, np.ndarray], seed: int):
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in carried:
            feeds[vi.name] = carried[vi.name]
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        feeds[vi.name] = (
            rng.standard_normal(dims).astype(dtype)
            if dtype.kind == "f"
            else rng.integers(0, 1 << 16, dims).astype(dtype)
        )
    return feeds


def _three_steps(model: onnx.ModelProto, carried: dict[str, np.ndarray]) -> None:
    """Three steps of the plain and the npu graph, each fed its own new parameters."""
    npu = _npu_equals_plain(model, _step_feeds(model, carried, 0))
    names = [o.name for o in model.graph.output]
    a, b = dict(carried), dict(carried)
    for seed in range(3):
        fa, fb = _step_feeds(model, a, seed), _step_feeds(model, b, seed)
        for name, x, y in zip(names, _run(model, fa), _run(npu, fb), strict=True):
            assert _same(x, y), (seed, name)
            for prefix, to in (("new_params/", "params/"), ("new_state/", "state/")):
                if name.startswith(prefix):
                    a[to + name[len(prefix) :]], b[to + name[len(prefix) :]] = x, y


def test_fp32_step_in_the_npu_profile():
    from export.step import fp32_program, step_graph

    net, rule, opt, params, state = _setup()
    model, _ = step_graph(net, rule, fp32_program(net, rule, opt), params, state, 8)
    assert {"Equal", "Where", "Greater"} <= set(op_counts(model))
    carried = {f"params/{k}": v.numpy() for k, v in params.items()}
    carried.update({f"state/{k}": v.numpy() for k, v in state.items()})
    _three_steps(model, carried)


def test_integer_step_in_the_npu_profile():
    qc = pytest.importorskip("quant.calibrate")
    from export.step import integer_program, step_graph

    net, rule, _, params, _ = _setup()
    gen = torch.Generator().manual_seed(1)
    views = [tuple(torch.randn(2, 4, 1, 8, 8, generator=gen)) for _ in range(2)]
    plan, q = qc.make_plan(net, rule, params, views)
    state = {"step": torch.zeros((), dtype=torch.int64)}
    model, _ = step_graph(net, rule, integer_program(net, rule, plan, q), q, state, 4)
    carried = {f"params/{k}": v.numpy() for k, v in q.items()}
    carried["state/step"] = state["step"].numpy()
    x = qc.quantize_input(views[0][0], plan.f_in).numpy()
    carried.update({"x1": x, "x2": x[::-1].copy()})
    _three_steps(model, carried)


def test_profile_bundle_rewrites_graphs_and_keeps_the_bundle_valid(tmp_path):
    from export.bundle import check_bundle, write_bundle
    from export.step import fp32_program

    net, rule, opt, params, state = _setup()
    manifest = write_bundle(
        tmp_path / "b", net, rule, fp32_program(net, rule, opt), params, state, 4, per_layer=True
    )
    assert npu_violations(onnx.load(str(tmp_path / "b" / manifest.step.file)))
    assert profile_bundle(tmp_path / "b", "plain") == []
    done = profile_bundle(tmp_path / "b", "npu")
    assert done == [manifest.step.file, *(io.file for io in manifest.layers)]
    checked = check_bundle(tmp_path / "b")  # hashes, graphs vs manifest, checker
    assert checked.step == manifest.step
    for io in (checked.step, *checked.layers):
        assert npu_violations(onnx.load(str(tmp_path / "b" / io.file))) == []
