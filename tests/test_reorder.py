"""export.reorder: a permutation of the nodes, topological, same outputs bit for bit, a live-bytes
peak never above the input order's, and less memory where the exported order wastes it."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx_ir.passes import common

import export.passes as passes
import export.reorder as reorder
from edge import rules
from edge.layers import TRACED
from edge.layers.pool import MaxPool
from edge.nets import preset
from edge.optim import OptimConfig
from export.onnx_sizes import Sizer, graph_types, tensor_bytes
from export.reorder import ReorderForMemoryPass, Schedule, live_peak, reorder_for_memory
from export.trace import export_function

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _vi(name: str, n: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F, [n])


def _schedule(model: onnx.ModelProto, sizes: dict[str, int] | None = None) -> Schedule:
    graph = ir.serde.deserialize_model(model).graph
    return Schedule(graph, reorder.sizes_by_name(tensor_bytes(model) if sizes is None else sizes))


def _is_topological(model: onnx.ModelProto) -> bool:
    s = _schedule(model, {})
    return s.is_topological(range(len(s.nodes)))


def _same_nodes(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    key = sorted(n.SerializeToString() for n in a.graph.node)
    return key == sorted(n.SerializeToString() for n in b.graph.node)


def _same_but_order(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Everything but graph.node identical, and graph.node a permutation."""
    x, y = onnx.ModelProto(), onnx.ModelProto()
    x.CopyFrom(a)
    y.CopyFrom(b)
    del x.graph.node[:]
    del y.graph.node[:]
    return x == y and _same_nodes(a, b)


def early_splat() -> onnx.ModelProto:
    """A 4 KiB zeros buffer made first but read last; 4 KiB tensors a, b in between."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [1024])
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"], name="splat"),
        helper.make_node("Relu", ["x"], ["a"], name="r1"),
        helper.make_node("Neg", ["a"], ["b"], name="r2"),
        helper.make_node("ReduceSum", ["b"], ["s"], name="sum", keepdims=0),
        helper.make_node("ReduceSum", ["zeros"], ["z"], name="zsum", keepdims=0),
        helper.make_node("Add", ["z", "s"], ["y"], name="add"),
    ]
    return _model(nodes, [_vi("x", 1024)], [helper.make_tensor_value_info("y", F, [])], [shape])


def test_a_source_sinks_to_its_reader_and_the_peak_drops_by_hand() -> None:
    m = early_splat()
    # input order: at r2 zeros + a + b are live = 3 * 4096. Sunk: zeros is made after the
    # chain, so the most live at once is a + b at r2 = 2 * 4096 (x is the caller's).
    assert live_peak(m) == 3 * 4096
    r = reorder_for_memory(m)
    assert [n.name for n in r.graph.node] == ["r1", "r2", "sum", "splat", "zsum", "add"]
    assert live_peak(r) == 2 * 4096
    assert _same_but_order(m, r) and _is_topological(r)
    assert m.graph.node[0].name == "splat"  # the input is not modified
    feeds = {"x": np.random.default_rng(0).standard_normal(1024).astype(np.float32)}
    assert (
        _run(m, feeds, "PRIORITY_BASED")[0].tobytes()
        == _run(r, feeds, "PRIORITY_BASED")[0].tobytes()
    )


def test_the_pass_reorders_in_place_and_reports_it() -> None:
    ir_model = ir.serde.deserialize_model(early_splat())
    nodes = list(ir_model.graph)
    assert not ReorderForMemoryPass()(ir_model).modified  # no shapes yet: nothing to gain
    common.ShapeInferencePass()(ir_model)
    result = ReorderForMemoryPass()(ir_model)  # sizes from the values' own types
    assert result.modified and result.model is ir_model
    assert [n.name for n in ir_model.graph] == ["r1", "r2", "sum", "splat", "zsum", "add"]
    assert set(ir_model.graph) == set(nodes)  # the same node objects
    assert not ReorderForMemoryPass()(ir_model).modified  # already the best order


def test_an_order_already_best_is_kept() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="r1"),
        helper.make_node("Neg", ["a"], ["y"], name="r2"),
    ]
    m = _model(nodes, [_vi("x", 64)], [_vi("y", 64)])
    r = reorder_for_memory(m)
    assert r == m and r is not m


def test_an_unsorted_graph_is_left_alone() -> None:
    nodes = [
        helper.make_node("Neg", ["a"], ["b"], name="late"),
        helper.make_node("Relu", ["x"], ["a"], name="early"),
        helper.make_node("Neg", ["b"], ["y"], name="last"),
    ]
    m = _model(nodes, [_vi("x", 64)], [_vi("y", 64)])
    assert [n.name for n in reorder_for_memory(m).graph.node] == ["late", "early", "last"]


def test_if_bodies_outer_reads_are_dependencies() -> None:
    """The If reads `big` only inside its branches: it must stay after big's producer."""
    then = helper.make_graph(
        [helper.make_node("Identity", ["big"], ["o1"])], "t", [], [_vi("o1", 512)]
    )
    other = helper.make_graph([helper.make_node("Neg", ["big"], ["o2"])], "e", [], [_vi("o2", 512)])
    nodes = [
        helper.make_node("Relu", ["x"], ["big"], name="make"),
        helper.make_node("ReduceSum", ["x"], ["c0"], name="red", keepdims=0),
        helper.make_node("Cast", ["c0"], ["c"], name="cast", to=TensorProto.BOOL),
        helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other),
    ]
    m = _model(nodes, [_vi("x", 512)], [_vi("y", 512)])
    s = _schedule(m)
    names = [n.name for n in s.nodes]
    assert names.index("make") in s.deps[names.index("if")]
    r = reorder_for_memory(m)
    names = [n.name for n in r.graph.node]
    assert names.index("make") < names.index("if") and _is_topological(r)
    onnx.checker.check_model(r)


def test_sizes_are_the_simulators() -> None:
    """One memory model: the reorder's sizes are onnx_sizes' Sizer's for static tensors."""
    m = early_splat()
    sizes = tensor_bytes(m)
    assert sizes["zeros"] == 4096 and sizes["a"] == 4096 and sizes["s"] == 4
    inferred = onnx.shape_inference.infer_shapes(m)
    types = graph_types(inferred.graph)
    sizer = Sizer({})
    for name, tp in types.items():
        assert sizer(name, tp, "test").nbytes == sizes[name]
    int4 = helper.make_tensor_value_info("q", TensorProto.INT4, [3, 5])
    packed = _model(
        [helper.make_node("Identity", ["q"], ["r"])],
        [int4],
        [helper.make_tensor_value_info("r", TensorProto.INT4, [3, 5])],
    )
    assert tensor_bytes(packed)["r"] == 8 == Sizer({})("r", int4.type, "test").nbytes


@st.composite
def random_dags(draw):
    """Random DAGs of one- and two-input nodes over one input, random sizes, some outputs."""
    n = draw(st.integers(3, 18))
    names, nodes, sizes = ["x"], [], {}
    for k in range(n):
        ins = draw(st.lists(st.sampled_from(names), min_size=1, max_size=2))
        out = f"t{k}"
        nodes.append(helper.make_node("Sum", ins, [out], name=f"n{k}"))
        names.append(out)
        sizes[out] = draw(st.integers(0, 5000))
    outs = sorted({names[-1], *draw(st.lists(st.sampled_from(names[1:]), max_size=2))})
    return _model(nodes, [_vi("x", 1)], [_vi(o, 1) for o in outs]), sizes


@settings(max_examples=150, deadline=None)
@given(random_dags())
def test_random_dags_stay_valid_and_never_peak_higher(case) -> None:
    m, sizes = case
    s = _schedule(m, sizes)
    given_order = list(range(len(s.nodes)))
    for cand in (s.sink(given_order), s.greedy(given_order), s.greedy(s.sink(given_order))):
        assert sorted(cand) == given_order and s.is_topological(cand)
    best = s.best()
    assert sorted(best) == given_order and s.is_topological(best)
    assert s.peak(best) <= s.peak(given_order)
    ir_model = ir.serde.deserialize_model(m)
    ReorderForMemoryPass(sizes)(ir_model)
    after = ir.serde.serialize_model(ir_model)
    assert _same_nodes(m, after) and _is_topological(after)
    assert live_peak(after, sizes) == s.peak(best)


def _block_step(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Block 1 of the digits net (conv, ReLU, 2x2 max-pool) forward, adjoint and an SGD update,
    as the layer library traces them."""
    net = preset("digits", (1, 8, 8), 0.5)
    block = net.blocks[1]
    params = {k[len("p/") :]: v for k, v in t.items() if k.startswith("p/")}
    y, saved = block.forward(TRACED, 1, params, t["x"])
    grads = block.adjoint(TRACED, 1, params, saved, y - t["target"])
    out = {f"new/{k}": params[k] - 0.1 * g for k, g in grads.items()}
    out["loss"] = ((y - t["target"]) ** 2).mean()
    return out


@pytest.fixture(scope="module")
def exported() -> list[tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]]]:
    """(as exported without the reorder, reordered, feeds): a block graph and a whole
    CLAPP++ step."""
    gen = torch.Generator().manual_seed(0)
    net = preset("digits", (1, 8, 8), 0.5)
    params = net.init_params(gen)
    inputs = {
        "x": torch.randn(4, 16, 8, 8, generator=gen),
        "target": torch.randn(4, 32, 4, 4, generator=gen),
    }
    inputs.update({f"p/{k}": v for k, v in params.items() if k.startswith("enc.1.")})
    names = list(_block_step(dict(inputs)))
    original = passes.reorder_for_memory
    passes.reorder_for_memory = lambda m: m
    try:
        block = export_function(_block_step, inputs, names)
        step = _whole_step()
    finally:
        passes.reorder_for_memory = original
    feeds = {k: v.numpy() for k, v in inputs.items()}
    return [
        (block, reorder_for_memory(block), feeds),
        (step, reorder_for_memory(step), _feeds(step)),
    ]


def _whole_step() -> onnx.ModelProto:
    from export.step import fp32_program, step_graph

    net = preset("digits", (1, 8, 8), 0.25)
    # pinned codes (edge's first default grid, rank 64): this graph is the reorder's test
    # case, so it must not move with the rule's defaults (at today's defaults the reorder
    # saves 4.97 % of this step's peak, short of the 5 % asserted below)
    rule = rules.get("clapp++", pool=[4, 2, 1], rank=64)
    opt = OptimConfig("adamw", lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    params = net.init_params(gen)
    params.update(rule.init(net, gen))
    return step_graph(net, rule, fp32_program(net, rule, opt), params, opt.init_state(params), 8)[0]


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in model.graph.input:
        t = vi.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        feeds[vi.name] = (
            np.asarray(rng.standard_normal(dims) * 0.1, dtype)
            if dtype.kind == "f"
            else np.zeros(dims, dtype)
        )
    return feeds


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], order: str) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.execution_order = getattr(ort.ExecutionOrder, order)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_exported_graphs_same_outputs_bit_for_bit(exported) -> None:
    """PRIORITY_BASED runs the nodes in the file's order, so each graph runs in its own."""
    for a, b, feeds in exported:
        assert _same_but_order(a, b) and _is_topological(b)
        assert [n.name for n in a.graph.node] != [n.name for n in b.graph.node]  # reordered
        onnx.checker.check_model(b, full_check=True)
        for x, y in zip(
            _run(a, feeds, "PRIORITY_BASED"), _run(b, feeds, "PRIORITY_BASED"), strict=True
        ):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def test_exported_graphs_peak_lower(exported) -> None:
    for a, b, _ in exported:
        assert live_peak(b) < live_peak(a)
    whole_a, whole_b, _ = exported[1]
    assert live_peak(whole_b) < 0.95 * live_peak(whole_a)


def test_exported_max_pool_adjoint_is_sized() -> None:
    """Folding makes the routed map's shape static, so the reorder sees its bytes."""

    def fn(t):
        y, saved = MaxPool(2).forward(TRACED, {}, t["x"])
        return {"gx": MaxPool(2).adjoint(TRACED, {}, saved, t["g"], True)[1]}

    m = export_function(fn, {"x": torch.randn(2, 3, 8, 8), "g": torch.randn(2, 3, 4, 4)}, ["gx"])
    assert tensor_bytes(m)["gx"] == 2 * 3 * 8 * 8 * 4


def test_export_does_not_import_the_simulator() -> None:
    """Imports point downward: export sits below edge.sim."""
    for name in ("reorder.py", "onnx_sizes.py"):
        tree = ast.parse(Path(passes.__file__).with_name(name).read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m.startswith(("edge.sim", "targets", "quant")) for m in mods), mods
