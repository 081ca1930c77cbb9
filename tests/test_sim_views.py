"""View ops alias their input by default (edge.sim.onnx_graph rule 6), on hand-built graphs.

Every tensor is float32 [16] = 64 B (or a view of one); alignment 16. Lifetimes are inclusive
op steps; a view's readers read its base, so the base lives until the last of them.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.sim.inplace import inplace_bindings
from edge.sim.onnx_graph import VIEW_OPS, GraphOptions, schedule_from_onnx
from edge.sim.planner import check_no_overlap, plan_schedule
from edge.sim.schedule import Lifetime

F = TensorProto.FLOAT


def _model(nodes: list, inputs: list, outputs: list, inits: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "views", inputs, outputs, initializer=inits or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F, shape)


def _axes() -> onnx.TensorProto:
    return numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")


def chain_of_views() -> onnx.ModelProto:
    """x -Relu-> a -Unsqueeze-> v -(Sigmoid(x) = b)- Squeeze(v) = w -> y = w + b.

    steps: 0 a = Relu(x), 1 v = Unsqueeze(a), 2 b = Sigmoid(x), 3 w = Squeeze(v), 4 y = w + b.
    """
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Unsqueeze", ["a", "axes"], ["v"], name="unsq"),
        helper.make_node("Sigmoid", ["x"], ["b"], name="sig"),
        helper.make_node("Squeeze", ["v", "axes"], ["w"], name="sq"),
        helper.make_node("Add", ["w", "b"], ["y"], name="add"),
    ]
    return _model(nodes, [_vi("x", [16])], [_vi("y", [16])], [_axes()])


def test_views_alias_by_default_and_keep_the_base_alive() -> None:
    s = schedule_from_onnx(chain_of_views())
    assert GraphOptions().alias_views is True
    assert "v" not in s.tensors and "w" not in s.tensors  # views own no bytes
    assert [op.outputs for op in s.ops] == [("a",), (), ("b",), (), ("y",)]
    assert s.ops[3].inputs == ("a", "axes") and s.ops[4].inputs == ("a", "b")  # w reads a
    life = s.lifetimes
    # a: written at 0, last read through its view w at step 4 (not at step 1, its own reader)
    assert life["a"] == Lifetime(0, 4)
    assert life["x"] == Lifetime(0, 2) and life["b"] == Lifetime(2, 4)
    assert life["y"] == Lifetime(4, 4)
    assert any("alias" in note for note in s.notes)


def test_view_offsets_and_bounds_by_hand() -> None:
    """Greedy by size, ties by first use then name: a@0; x overlaps a -> 64; b overlaps a and
    x -> 128; y (step 4) overlaps a and b but not x -> the gap at 64. Peak at steps 2 and 4:
    three 64 B tensors live = 192 = the arena."""
    plan, lower, no_reuse = plan_schedule(schedule_from_onnx(chain_of_views()))
    check_no_overlap(plan)
    assert plan.offsets() == {"a": 0, "x": 64, "b": 128, "y": 64}
    assert (plan.arena_bytes, lower, no_reuse) == (192, 192, 4 * 64)


def test_alias_views_false_copies_every_view() -> None:
    s = schedule_from_onnx(chain_of_views(), GraphOptions(alias_views=False))
    assert s.tensors["v"].nbytes == 64 and s.tensors["w"].nbytes == 64
    life = s.lifetimes
    assert life["a"] == Lifetime(0, 1)  # dies once copied into v
    assert life["v"] == Lifetime(1, 3) and life["w"] == Lifetime(3, 4)
    plan, lower, no_reuse = plan_schedule(s)
    check_no_overlap(plan)
    # step 3: v, b, w live (x, a dead); step 4: b, w, y: both 192; six tensors without reuse
    assert (lower, no_reuse) == (192, 6 * 64)
    assert not any("alias" in note for note in s.notes)


def test_a_view_that_is_a_graph_output_gets_its_own_buffer() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Reshape", ["a", "shape"], ["y"]),
    ]
    shape = numpy_helper.from_array(np.array([4, 4], dtype=np.int64), "shape")
    s = schedule_from_onnx(_model(nodes, [_vi("x", [16])], [_vi("y", [4, 4])], [shape]))
    assert s.tensors["y"].category == "output" and s.tensors["y"].nbytes == 64
    assert s.lifetimes["a"] == Lifetime(0, 1) and s.outputs == ("y",)


def test_a_view_of_a_graph_input_extends_the_input() -> None:
    nodes = [
        helper.make_node("Flatten", ["x"], ["v"]),
        helper.make_node("Identity", ["x"], ["i"]),
        helper.make_node("Relu", ["v"], ["r"]),
        helper.make_node("Neg", ["i"], ["y"]),
    ]
    s = schedule_from_onnx(_model(nodes, [_vi("x", [4, 4])], [_vi("y", [4, 4])]))
    assert set(s.tensors) == {"x", "r", "y"}
    assert s.ops[2].inputs == ("x",) and s.ops[3].inputs == ("x",)
    assert s.lifetimes["x"] == Lifetime(0, 3)  # read through Identity's view at step 3
    assert s.lifetimes["r"] == Lifetime(2, 2)  # r is read by nobody: live only where written


def test_a_view_of_a_parameter_blocks_the_in_place_update() -> None:
    """v = Reshape(W) is read after W' = W - x: writing W' into W would change v, so W' must
    not overwrite W. Copying the view (alias_views=False) would wrongly allow it."""
    shape = numpy_helper.from_array(np.array([16], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("Reshape", ["W", "shape"], ["v"], name="view"),
        helper.make_node("Sub", ["W", "x"], ["W_new"], name="update"),
        helper.make_node("Mul", ["v", "x"], ["y"], name="late"),
    ]
    model = _model(
        nodes, [_vi("W", [16]), _vi("x", [16])], [_vi("W_new", [16]), _vi("y", [16])], [shape]
    )
    opts = {"bindings": {"W_new": "W"}, "param_names": frozenset({"W"})}
    aliased = schedule_from_onnx(model, GraphOptions(**opts))
    assert aliased.last_reader["W"] == 2 and inplace_bindings(aliased) == {}
    copied = schedule_from_onnx(model, GraphOptions(alias_views=False, **opts))
    assert copied.last_reader["W"] == 1 and inplace_bindings(copied) == {"W_new": "W"}


@pytest.mark.parametrize("op", ["Dropout", "Transpose"])
def test_ops_that_are_not_views_keep_their_bytes(op: str) -> None:
    nodes = [helper.make_node(op, ["x"], ["v"]), helper.make_node("Relu", ["v"], ["y"])]
    s = schedule_from_onnx(_model(nodes, [_vi("x", [16])], [_vi("y", [16])]))
    assert op not in VIEW_OPS and s.tensors["v"].nbytes == 64
    assert s.lifetimes["x"] == Lifetime(0, 0)
