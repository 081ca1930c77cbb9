"""export.reorder: a permutation of the nodes, topological, same outputs bit for bit, a live-bytes
peak never above the input order's, and less memory where the exported order wastes it."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import export.passes as passes
from edge.sim.onnx_graph import GraphOptions
from edge.sim.simulate import SimOptions, simulate
from edge.nets import init_params, preset
from edge.optim import OptimConfig
from edge.rules.clapp_pp import ClappPP
from export.layers import layer_step_graphs
from export.reorder import _Graph, best_order, live_peak, reorder_for_memory, tensor_bytes
from export.training_step import training_step

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, value_info=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, value_info=list(value_info))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _vi(name: str, n: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F, [n])


def _is_topological(model: onnx.ModelProto) -> bool:
    g = _Graph(model, {})
    return g.is_topological(range(len(g.nodes)))


def _same_nodes(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    key = [n.SerializeToString() for n in a.graph.node]
    return sorted(key) == sorted(n.SerializeToString() for n in b.graph.node)


def early_splat() -> onnx.ModelProto:
    """A 4 KiB zeros buffer made first but read last; 4 KiB tensors a, b in between."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [1024])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["zeros"], name="splat"),
             helper.make_node("Relu", ["x"], ["a"], name="r1"),
             helper.make_node("Neg", ["a"], ["b"], name="r2"),
             helper.make_node("ReduceSum", ["b"], ["s"], name="sum", keepdims=0),
             helper.make_node("ReduceSum", ["zeros"], ["z"], name="zsum", keepdims=0),
             helper.make_node("Add", ["z", "s"], ["y"], name="add")]
    y = helper.make_tensor_value_info("y", F, [])
    g = helper.make_graph(nodes, "g", [_vi("x", 1024)], [y], [shape])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_a_source_sinks_to_its_reader_and_the_peak_drops_by_hand() -> None:
    m = early_splat()
    # input order: at r2 zeros + a + b are live = 3 * 4096. Sunk: zeros is made after the
    # chain, so the most live at once is a + b at r2 = 2 * 4096 (x is the caller's).
    assert live_peak(m) == 3 * 4096
    r = reorder_for_memory(m)
    assert [n.name for n in r.graph.node] == ["r1", "r2", "sum", "splat", "zsum", "add"]
    assert live_peak(r) == 2 * 4096
    assert _same_nodes(m, r) and _is_topological(r)
    assert m.graph.node[0].name == "splat"  # the input is not modified


def test_an_order_already_best_is_kept() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r1"),
             helper.make_node("Neg", ["a"], ["y"], name="r2")]
    m = _model(nodes, [_vi("x", 64)], [_vi("y", 64)])
    assert [n.name for n in reorder_for_memory(m).graph.node] == ["r1", "r2"]


def test_if_bodies_outer_reads_are_dependencies() -> None:
    """The If reads `big` only inside its branches: it must stay after big's producer."""
    then = helper.make_graph([helper.make_node("Identity", ["big"], ["o1"])], "t", [],
                             [_vi("o1", 512)])
    other = helper.make_graph([helper.make_node("Neg", ["big"], ["o2"])], "e", [],
                              [_vi("o2", 512)])
    nodes = [helper.make_node("Relu", ["x"], ["big"], name="make"),
             helper.make_node("ReduceSum", ["x"], ["c0"], name="red", keepdims=0),
             helper.make_node("Cast", ["c0"], ["c"], name="cast", to=TensorProto.BOOL),
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)]
    m = _model(nodes, [_vi("x", 512)], [_vi("y", 512)])
    r = reorder_for_memory(m)
    names = [n.name for n in r.graph.node]
    assert names.index("make") < names.index("if") and _is_topological(r)
    onnx.checker.check_model(r)


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
    g = _Graph(m, sizes)
    given_order = list(range(len(g.nodes)))
    for cand in (g.sink(given_order), g.greedy(given_order), g.greedy(g.sink(given_order))):
        assert sorted(cand) == given_order and g.is_topological(cand)
    best = best_order(g)
    assert sorted(best) == given_order and g.is_topological(best)
    assert g.peak(best) <= g.peak(given_order)
    r = reorder_for_memory(m)
    assert _same_nodes(m, r) and _is_topological(r) and live_peak(r) <= live_peak(m)


@pytest.fixture(scope="module")
def steps():
    """A conv step (whole and per layer) exported with and without the reorder pass."""
    net = preset("digits", (1, 8, 8), 0.5)
    rule, opt = ClappPP(), OptimConfig("adamw", lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    params = init_params(net, gen)
    params.update(rule.init(net, gen))
    state = opt.init_state(params)
    out = {}
    for label, hook in (("plain", lambda m: m), ("reordered", passes.reorder_for_memory)):
        original = passes.reorder_for_memory
        passes.reorder_for_memory = hook
        try:
            model, man = training_step(net, rule, opt, params, state, 8)
            layers, ios = layer_step_graphs(net, rule, opt, params, state, 8)
        finally:
            passes.reorder_for_memory = original
        views = [(model, man.step.memory_view())]
        views += [(m, io.memory_view()) for m, io in zip(layers, ios, strict=True)]
        out[label] = views
    return out


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], order: str) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.execution_order = getattr(ort.ExecutionOrder, order)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = np.asarray(rng.standard_normal(dims) * 0.1, np.float32)
    return feeds


def test_exported_steps_same_outputs_bit_for_bit(steps) -> None:
    """PRIORITY_BASED runs the nodes in the file's order, so each graph runs in its own."""
    for (a, _), (b, _) in zip(steps["plain"], steps["reordered"], strict=True):
        assert _same_nodes(a, b) and _is_topological(b)
        onnx.checker.check_model(b, full_check=True)
        feeds = _feeds(a)
        for x, y in zip(_run(a, feeds, "PRIORITY_BASED"), _run(b, feeds, "PRIORITY_BASED"),
                        strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)


def test_exported_steps_simulate_no_higher_and_the_whole_step_lower(steps) -> None:
    for k, ((a, man), (b, _)) in enumerate(zip(steps["plain"], steps["reordered"], strict=True)):
        assert live_peak(b) <= live_peak(a)
        for inplace in (True, False):
            opts = SimOptions(inplace=inplace, graph=GraphOptions.from_manifest(man))
            ra, rb = simulate(a, "host", opts), simulate(b, "host", opts)
            assert rb.lower_bound_bytes <= ra.lower_bound_bytes, (k, inplace)
            assert rb.arena_bytes <= ra.arena_bytes, (k, inplace)
    whole_a, whole_b = steps["plain"][0][0], steps["reordered"][0][0]
    assert live_peak(whole_b) < 0.95 * live_peak(whole_a)  # the splats no longer live from 0


def test_sizes_come_from_shape_inference() -> None:
    sizes = tensor_bytes(early_splat())
    assert sizes["zeros"] == 4096 and sizes["a"] == 4096 and sizes["s"] == 4


def test_export_does_not_import_the_simulator() -> None:
    """Imports point downward: export sits below edge.sim."""
    tree = ast.parse(Path(passes.__file__).with_name("reorder.py").read_text())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m.startswith(("edge", "targets", "quant")) for m in mods), mods
