"""ONNX front end, simulator and CLI on graphs exported here with torch.onnx (dynamo=False)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
import typer
from onnx import TensorProto, helper
from typer.testing import CliRunner

from edge.app.commands.simulate import run_simulation, simulate_cmd
from edge.errors import EdgeError
from edge.sim.onnx_graph import GraphOptions, schedule_from_onnx
from edge.sim.planner import ArenaPlan, Placement, check_no_overlap, plan_schedule
from edge.sim.simulate import (
    MemoryReport,
    SimOptions,
    max_batch_that_fits,
    simulate,
    simulate_sequence,
)
from targets import MemoryTier, Target

BINDINGS = {"W1_new": "W1", "W2_new": "W2", "W3_new": "W3"}
KIB = 1024


def _export(module: torch.nn.Module, args: tuple, **kw: object) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, dynamo=False, **kw)
    return buf.getvalue()


class ConvStep(torch.nn.Module):
    """A local training step in plain tensor ops: y = relu(conv(h, W)); dW = <y, patches of h>
    (the weight gradient of a conv, written as a conv of h with y); W' = W - lr * dW."""

    def forward(self, x, W1, W2, W3):
        h, new = x, []
        for W in (W1, W2, W3):
            y = F.relu(F.conv2d(h, W, padding=1))
            dW = F.conv2d(h.transpose(0, 1), y.transpose(0, 1), padding=1).transpose(0, 1)
            new.append(W - 0.01 * dW / x.shape[0])
            h = F.max_pool2d(y, 2)
        return tuple(new)


def _target(sram: int, flash: int = 4 << 20, dram: int | None = None) -> Target:
    tiers = [MemoryTier("sram", "sram", sram), MemoryTier("flash", "flash", flash)]
    if dram:
        tiers.append(MemoryTier("dram", "dram", dram))
    return Target("testdev", "a test device", tuple(tiers), ("fp32",))


@pytest.fixture(scope="module")
def step_onnx() -> bytes:
    ws = (torch.randn(8, 3, 3, 3), torch.randn(16, 8, 3, 3), torch.randn(16, 16, 3, 3))
    return _export(
        ConvStep(),
        (torch.randn(2, 3, 32, 32), *ws),
        input_names=["x", "W1", "W2", "W3"],
        output_names=list(BINDINGS),
        dynamic_axes={"x": {0: "batch"}},
    )


@pytest.fixture(scope="module")
def infer_onnx() -> bytes:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 8 * 8, 10),
    ).eval()
    return _export(
        net,
        (torch.randn(1, 3, 32, 32),),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}},
    )


def test_categories_from_manifest_and_from_names(step_onnx: bytes) -> None:
    s = schedule_from_onnx(step_onnx, GraphOptions(batch_size=4, bindings=BINDINGS))
    cats = {n: t.category for n, t in s.tensors.items()}
    assert cats["x"] == "input" and s.tensors["x"].shape == (4, 3, 32, 32)
    assert all(cats[w] == "parameter" for w in BINDINGS.values())
    assert all(cats[w] == "update_buffer" for w in BINDINGS)
    assert {
        c for n, c in cats.items() if n not in BINDINGS and n not in BINDINGS.values() and n != "x"
    } == {"activation"}
    # no manifest: 'W1' looks like a parameter; unbound outputs are plain outputs
    s = schedule_from_onnx(step_onnx, GraphOptions(batch_size=4))
    assert s.tensors["W1"].category == "parameter" and s.tensors["W1_new"].category == "output"
    # a manifest is authoritative: names it does not list are inputs
    s = schedule_from_onnx(step_onnx, GraphOptions(batch_size=4, param_names={"W1"}))
    assert s.tensors["W2"].category == "input"


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_arena_close_to_lower_bound_on_real_graphs(
    step_onnx: bytes, infer_onnx: bytes, batch: int
) -> None:
    for model, opts in (
        (step_onnx, GraphOptions(batch_size=batch, bindings=BINDINGS)),
        (infer_onnx, GraphOptions(batch_size=batch)),
    ):
        s = schedule_from_onnx(model, opts)
        for inplace in (True, False):
            plan, lb, nr = plan_schedule(s, inplace=inplace)
            check_no_overlap(plan)
            assert lb <= plan.arena_bytes <= 1.05 * lb, (batch, plan.arena_bytes, lb)
            assert plan.arena_bytes < nr


def test_alias_views_removes_reshape_copies() -> None:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10)
    ).eval()
    model = _export(
        net,
        (torch.randn(1, 3, 8, 8),),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}},
    )
    # batch 2: input 1536 B, conv out 4096 B, flatten copy 4096 B, logits 80 B. Views alias by
    # default: the conv output lives on through the Linear (Gemm) that reads its flattened view.
    view = schedule_from_onnx(model, GraphOptions(batch_size=2))
    copy = schedule_from_onnx(model, GraphOptions(batch_size=2, alias_views=False))
    assert plan_schedule(copy)[1] == 4096 + 4096 and plan_schedule(view)[1] == 1536 + 4096
    assert view.ops[1].op_type == "Flatten" and view.ops[1].outputs == ()
    conv_out = view.ops[0].outputs[0]
    assert view.ops[2].inputs[0] == conv_out and view.lifetimes[conv_out].last == 2


def test_dynamic_dims_by_name_by_batch_and_errors(step_onnx: bytes) -> None:
    by_batch = schedule_from_onnx(step_onnx, GraphOptions(batch_size=6))
    by_name = schedule_from_onnx(step_onnx, GraphOptions(dims={"batch": 6}))
    assert {n: t.nbytes for n, t in by_batch.tensors.items()} == {
        n: t.nbytes for n, t in by_name.tensors.items()
    }
    with pytest.raises(EdgeError, match=r"'x'.*dims=\{'batch': N\}.*--batch"):
        schedule_from_onnx(step_onnx)
    static = _export(
        ConvStep(),
        (
            torch.randn(2, 3, 16, 16),
            *(torch.randn(8, 3, 3, 3), torch.randn(16, 8, 3, 3), torch.randn(16, 16, 3, 3)),
        ),
        input_names=["x", "W1", "W2", "W3"],
    )
    with pytest.raises(EdgeError, match="no dynamic batch dim"):
        schedule_from_onnx(static, GraphOptions(batch_size=4))
    assert schedule_from_onnx(static, GraphOptions(batch_size=2)).tensors["x"].shape[0] == 2


def test_shapes_inference_cannot_derive_are_measured() -> None:
    class Unfold(torch.nn.Module):
        def forward(self, x):
            return F.unfold(x, 3, padding=1).sum(1)

    model = _export(
        Unfold(),
        (torch.randn(2, 3, 8, 8),),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}},
    )
    s = schedule_from_onnx(model, GraphOptions(batch_size=5))
    assert s.tensors["y"].shape == (5, 64) and any("onnxruntime" in n for n in s.notes)
    with pytest.raises(EdgeError, match=r"cannot size tensor '/Range_output_0'.*dims="):
        schedule_from_onnx(model, GraphOptions(batch_size=5, measure=False))


def test_bad_files_are_one_line_errors(tmp_path: Path, infer_onnx: bytes) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a model\xfe" * 20)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(infer_onnx[: len(infer_onnx) // 2])
    for path in (garbage, truncated, tmp_path / "missing.onnx"):
        with pytest.raises(EdgeError) as info:
            schedule_from_onnx(path)
        assert "\n" not in str(info.value)


def _tiny_model(nodes: list, inputs: list, outputs: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_node_order_is_checked() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    nodes = [
        helper.make_node("Relu", ["a"], ["y"], name="second"),
        helper.make_node("Relu", ["x"], ["a"], name="first"),
    ]
    model = _tiny_model(nodes, [x], [y])
    with pytest.raises(EdgeError, match="topological"):
        schedule_from_onnx(model.SerializeToString())  # bytes skip nothing: checker runs too


def test_if_bodies_are_counted_conservatively() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])

    def branch(op: str) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{op}_out", TensorProto.FLOAT, [256])
        return helper.make_graph([helper.make_node(op, ["x", "x"], [f"{op}_out"])], op, [], [out])

    node = helper.make_node(
        "If", ["c"], ["y"], name="if", then_branch=branch("Add"), else_branch=branch("Mul")
    )
    s = schedule_from_onnx(_tiny_model([node], [x, c], [y]))
    (op,) = s.ops
    assert "x" in op.inputs  # the body reads x from the outer scope: x stays live
    assert s.tensors["if/body_scratch"].nbytes == 2 * 1024  # both branches, 1 KiB each


def test_max_batch_that_fits_is_monotone(infer_onnx: bytes) -> None:
    opts = SimOptions(persistent="flash")
    sizes = [k * 128 * KIB for k in (2, 4, 8, 16)]
    best = [max_batch_that_fits(infer_onnx, _target(n), opts) for n in sizes]
    assert all(b is not None for b in best) and best == sorted(best) and best[0] < best[-1]
    for sram, b in zip(sizes, best, strict=True):

        def fits(n: int, sram: int = sram) -> bool:
            g = GraphOptions(batch_size=n)
            return simulate(infer_onnx, _target(sram), SimOptions("flash", graph=g)).fits

        assert fits(b) and not fits(b + 1)
    assert max_batch_that_fits(infer_onnx, _target(4 * KIB), opts) is None


def test_persistent_placement_policies(infer_onnx: bytes, step_onnx: bytes) -> None:
    g = GraphOptions(batch_size=1)
    r = simulate(infer_onnx, _target(512 * KIB), SimOptions("auto", graph=g))
    assert r.fits and r.tier("flash").used == 0  # everything fits SRAM
    params = r.per_category["parameter"]
    r = simulate(infer_onnx, _target(100 * KIB), SimOptions("auto", graph=g))
    assert r.tier("flash").used >= params and r.persistent_onchip_bytes == 0
    assert r.peak_bytes == r.arena_bytes and any("auto" in n for n in r.notes)
    # a training step writes its parameters: auto sends them to DRAM, never to flash
    t = _target(16 * KIB, dram=1 << 20)
    r = simulate(
        step_onnx, t, SimOptions("auto", graph=GraphOptions(batch_size=2, bindings=BINDINGS))
    )
    assert r.trained and r.tier("flash").used == 0 and r.tier("dram").used > 0
    check_whole_plan(r)
    with pytest.raises(EdgeError, match="no dram tier"):
        simulate(infer_onnx, _target(KIB), SimOptions("dram", graph=g))


def check_whole_plan(report: MemoryReport) -> None:
    """Every tensor of the report (arena and persistent, all tiers) against every other."""
    for tier in report.tiers:
        ps = [
            Placement(p.name, p.offset, p.size, p.first, p.last)
            for p in report.plan
            if p.tier == tier.name and p.alias_of is None
        ]
        top = max((p.offset + p.size for p in ps), default=0)
        check_no_overlap(ArenaPlan(tuple(ps), top, alignment=report.alignment))
        assert top <= tier.used


def test_simulate_sequence_reuses_arena_and_keeps_all_parameters(step_onnx: bytes) -> None:
    """Three layers' graphs (their own parameter names): one arena, all parameters resident.
    The same parameter name in several graphs is one storage (a shared step counter)."""
    from onnx import compose

    opts = SimOptions(graph=GraphOptions(batch_size=2))
    one = simulate(step_onnx, _target(1 << 20), opts)
    base = onnx.load_from_string(step_onnx)
    layers = [compose.add_prefix(base, f"l{i}/") for i in range(3)]
    three = simulate_sequence(layers, _target(1 << 20), opts)
    assert one.persistent_onchip_bytes > 0 and three.per_category["parameter"] > 0
    check_whole_plan(one)
    check_whole_plan(three)
    assert three.arena_bytes == one.arena_bytes
    assert three.persistent_onchip_bytes == 3 * one.persistent_onchip_bytes
    assert three.peak_bytes == one.arena_bytes + 3 * one.persistent_onchip_bytes
    assert len(three.timeline) == 3 * len(one.timeline)
    assert json.loads(json.dumps(three.to_dict()))["fits"] is True
    same = simulate_sequence([step_onnx] * 3, _target(1 << 20), opts)
    assert same.persistent_onchip_bytes == one.persistent_onchip_bytes
    assert same.per_category["parameter"] == one.per_category["parameter"]
    assert sum(p.category == "parameter" for p in same.plan) == 3  # W1, W2, W3 once each


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("simulate")(simulate_cmd)
    return app


def test_cli_json_and_plot(tmp_path: Path, step_onnx: bytes) -> None:
    model = tmp_path / "step.onnx"
    model.write_bytes(step_onnx)
    (tmp_path / "manifest.json").write_text(json.dumps({"bindings": BINDINGS}))
    (tmp_path / "dev.toml").write_text(
        'name = "dev"\ndescription = "test"\nsource = "test"\ndtypes = ["fp32"]\n'
        '[[tiers]]\nname = "sram"\nkind = "sram"\nsize = "256 KiB"\nsource = "test"\n'
    )
    png = tmp_path / "out" / "timeline.png"
    res = CliRunner().invoke(
        _cli(),
        [
            "simulate",
            "--target",
            str(tmp_path / "dev.toml"),
            "--model",
            str(model),
            "--batch",
            "4",
            "--manifest",
            str(tmp_path / "manifest.json"),
            "--json",
            "--plot",
            str(png),
        ],
    )
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    for key in (
        "fits",
        "peak_bytes",
        "arena_bytes",
        "lower_bound_bytes",
        "no_reuse_bytes",
        "peak_op",
        "per_category",
        "tiers",
        "timeline",
        "plan",
    ):
        assert key in obj
    assert obj["per_category"]["update_buffer"] > 0 and obj["inplace_saved_bytes"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(
        _cli(),
        [
            "simulate",
            "--target",
            str(tmp_path / "dev.toml"),
            "--model",
            str(tmp_path / "nope.onnx"),
        ],
    )
    # the command raises one EdgeError line; `edge.app.cli.main` prints it and exits with 2
    assert isinstance(res.exception, EdgeError) and "nope.onnx" in str(res.exception)
    assert "\n" not in str(res.exception) and res.stdout == ""
    report = run_simulation(
        onnx.load_from_string(step_onnx), _target(1 << 20), batch=4, manifest={"bindings": BINDINGS}
    )
    assert report.peak_bytes == obj["peak_bytes"]
