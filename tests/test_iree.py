"""IREE: the exported step compiled for this CPU and cross-compiled as static libraries for MCU
CPUs. fp32 steps: parity with onnxruntime within export.iree.TOLERANCE (relative L2 per
tensor). Integer steps: every store equal to the torch integer step's, bit for bit, over
STEPS free-running steps; static libraries for every MCU recipe, with their code size."""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

from edge import rules
from edge.app.cli import main
from edge.errors import EdgeError
from edge.nets import fold_batchnorm, preset
from edge.optim import OptimConfig
from export import iree
from export.bundle import check_bundle
from export.manifest import PARAMS, STATE
from export.runner import OnnxStepper, Runner
from export.step import fp32_program, integer_program, step_graph

HAS_IREE = iree.available()
needs_iree = pytest.mark.skipif(not HAS_IREE, reason=f"IREE not installed ({iree.IREE_EXTRA})")
BATCH, STEPS = 4, 5
EM_ARM, EM_RISCV = 40, 243
MACHINES = {"cortex-m4": EM_ARM, "cortex-m7": EM_ARM, "cortex-m55": EM_ARM,
            "cortex-m0plus": EM_ARM, "rv32imafc": EM_RISCV}


def _net(name: str, shape: tuple[int, ...], rule_name: str):
    net = preset(name, shape, 0.25)
    rule = rules.get(rule_name)
    gen = torch.Generator().manual_seed(0)
    net, params = fold_batchnorm(net, net.init_params(gen))
    rule.check(net)
    params.update(rule.init(net, gen))
    gen = torch.Generator().manual_seed(1)
    views = []
    for _ in range(STEPS):
        x1 = torch.randn(BATCH, *shape, generator=gen)
        views.append((x1, x1 + 0.3 * torch.randn(x1.shape, generator=gen)))
    return net, rule, params, views


def integer_case(name: str = "digits", shape: tuple[int, ...] = (1, 8, 8),
                 rule_name: str = "clapp++"):
    """An int8-w16 integer step graph and what the torch integer step needs to run it."""
    from quant.calibrate import make_plan

    net, rule, params, views = _net(name, shape, rule_name)
    plan, stores = make_plan(net, rule, params, views[:2], "int8-w16", 1e-3)
    program = integer_program(net, rule, plan, stores)
    state = {"step": torch.zeros((), dtype=torch.int64)}
    model, manifest = step_graph(net, rule, program, stores, state, BATCH)
    return net, rule, plan, stores, views, program, model, manifest


def run_integer(stepper, net, rule, plan, stores, views):
    """STEPS steps of the torch integer step and of `stepper` on the same views and bits."""
    from quant.integer import integer_step, make_noise, noise_shapes, quantize_input

    form = rule.integer_form(net)
    shapes, gen = noise_shapes(net, form, plan, stores), torch.Generator().manual_seed(5)
    q_t, q_o, count = stores, stores, torch.zeros((), dtype=torch.int64)
    for x1, x2 in views:
        q1, q2 = quantize_input(x1, plan.f_in), quantize_input(x2, plan.f_in)
        noise = make_noise(shapes, gen)
        q_t, m_t = integer_step(net, form, plan, q_t, q1, q2, noise, count)
        q_o, s_o, m_o = stepper(q_o, {"step": count}, q1, q2, noise=noise)
        count = count + 1
    return q_t, q_o, s_o, m_t, m_o


@pytest.fixture(scope="module")
def digits_integer():
    return integer_case()


@pytest.fixture(scope="module")
def mlp_integer_prepared():
    model = integer_case("mlp", (1, 8, 8))[6]
    return iree.prepare(model)


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "iree.compiler.tools", None)
    with pytest.raises(EdgeError, match=r'pip install -e "\.\[iree\]"'):
        iree.compile_host(onnx.ModelProto())


def test_unknown_cpu_lists_the_known_ones():
    with pytest.raises(EdgeError, match="no IREE cross-compilation recipe for cpu 'esp32s3'.*"
                                        "cortex-m4"):
        iree.cpu_spec("esp32s3")


def test_elf_sizes_refuses_other_files(tmp_path):
    (tmp_path / "x.o").write_bytes(b"not an elf")
    with pytest.raises(EdgeError, match="not an ELF object"):
        iree.elf_sizes(tmp_path / "x.o")


def test_cast_like_16_gives_the_same_values():
    """Cast(to int16 / uint16) -> CastLike: no Cast to a 16-bit type is left, same outputs."""
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Cast", ["x"], ["a"], to=TensorProto.INT16),
             helper.make_node("Cast", ["x"], ["b"], to=TensorProto.UINT16),
             helper.make_node("Cast", ["x"], ["c"], to=TensorProto.INT8)]
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.INT32, [6])],
                              [vi("a", TensorProto.INT16, [6]), vi("b", TensorProto.UINT16, [6]),
                               vi("c", TensorProto.INT8, [6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    out = iree.cast_like_16(model)
    casts = [(n.op_type, n.attribute[0].i if n.attribute else None) for n in out.graph.node]
    assert casts == [("CastLike", None), ("CastLike", None), ("Cast", TensorProto.INT8)]
    x = {"x": np.array([-40000, -129, -1, 0, 300, 70000], np.int32)}
    want = onnxruntime.InferenceSession(model.SerializeToString()).run(None, x)
    got = onnxruntime.InferenceSession(out.SerializeToString()).run(None, x)
    for a, b in zip(want, got, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@needs_iree
def test_fp32_step_matches_onnxruntime():
    net, rule, params, views = _net("digits", (1, 8, 8), "clapp++")
    opt = OptimConfig("sgd", lr=1e-2)
    state = opt.init_state(params)
    model, manifest = step_graph(net, rule, fp32_program(net, rule, opt), params, state, BATCH)
    feeds = {PARAMS + k: v.numpy() for k, v in params.items()}
    feeds.update({STATE + k: v.numpy() for k, v in state.items()})
    feeds.update(x1=views[0][0].numpy(), x2=views[0][1].numpy())
    got, want = Runner(model, runtime="iree").run(feeds), Runner(model).run(feeds)
    assert list(got) == list(want)
    for k in want:
        ref = np.asarray(want[k], np.float64)
        rel = np.linalg.norm(got[k] - ref) / max(np.linalg.norm(ref), 1e-30)
        assert rel <= iree.TOLERANCE, (k, rel)
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape


@needs_iree
def test_integer_step_is_bit_exact_with_torch(digits_integer):
    """The conv net's integer step (max-pool routing, int16 stores) compiled for the host."""
    net, rule, plan, stores, views, program, model, manifest = digits_integer
    stepper = OnnxStepper.from_graphs(net, rule, None, [model], [manifest.step],
                                      program=program, runtime="iree")
    q_t, q_o, s_o, m_t, m_o = run_integer(stepper, net, rule, plan, stores, views)
    for k in q_t:
        assert q_o[k].dtype == q_t[k].dtype and torch.equal(q_o[k], q_t[k]), k
    assert int(s_o["step"]) == STEPS and float(m_o["loss"]) == float(m_t["loss"])
    assert any(not torch.equal(q_t[k], stores[k]) for k in stores)  # the stores moved


@needs_iree
def test_plain_integer_graph_is_refused_by_the_importer(digits_integer):
    """Why cast_like_16 exists: without it, the Cast to int16 stops IREE's ONNX import."""
    from export.profile import npu_profile

    with pytest.raises(EdgeError, match=r"iree-compile failed: .*onnx\.Cast"):
        iree.compile_host(npu_profile(digits_integer[6]), prepared=True)


def _elf_machine(path) -> int:
    blob = open(path, "rb").read()
    assert blob[:4] == b"\x7fELF"
    return struct.unpack_from("<H", blob, 0x12)[0]


@needs_iree
@pytest.mark.parametrize("cpu", [
    "cortex-m4", "rv32imafc",
    pytest.param("cortex-m7", marks=pytest.mark.slow),
    pytest.param("cortex-m55", marks=pytest.mark.slow),
    pytest.param("cortex-m0plus", marks=pytest.mark.slow)])
def test_integer_step_cross_compiles_a_static_library(mlp_integer_prepared, tmp_path, cpu):
    art = iree.cross_compile(mlp_integer_prepared, cpu, tmp_path / cpu, prepared=True)
    lib = tmp_path / cpu / art.library
    assert _elf_machine(lib) == MACHINES[cpu]
    assert (tmp_path / cpu / art.header).read_text().count("library_query") >= 1
    sizes = iree.elf_sizes(lib)
    assert sizes["code"] == art.code_bytes > 1000
    assert art.flash_bytes == art.code_bytes + art.rodata_bytes + art.data_bytes + \
        art.module_bytes
    assert art.to_dict()["flash_bytes"] == art.flash_bytes
    # what the firmware links: runtime helpers only, no symbol of the step itself
    assert art.imports and all(s.startswith("__") for s in art.imports), art.imports


@needs_iree
@pytest.mark.slow
def test_export_integer_compile_iree_reports_code_size(tmp_path, capsys):
    """`edge export --quant int8-w16 --mode integer --compile iree --target stm32f746`: host
    parity (integers equal), a Cortex-M7 static library, its size against flash; `edge
    simulate --bundle` reads the same report."""
    out = tmp_path / "b"
    with pytest.raises(SystemExit) as e:
        main(["export", "--quant", "int8-w16", "--mode", "integer", "--compile", "iree",
              "--target", "stm32f746", "--width", "0.25", "--subset", "64", "--batch-size",
              "8", "--out", str(out), "--json"])
    assert e.value.code == 0
    rep = json.loads(capsys.readouterr().out)["iree"]
    assert rep["parity"]["integers_equal"] and rep["parity"]["max_abs_diff"] == 0.0
    cross = rep["cross"]
    assert cross["cpu"] == "cortex-m7" and cross["code_bytes"] > 1000
    assert cross["flash"]["capacity"] == 1 << 20 and cross["flash"]["fits"]
    manifest = check_bundle(out)
    assert "iree/cortex-m7/step.o" in manifest.files and "iree/host.vmfb" in manifest.files
    assert iree.read_report(out) == rep
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--bundle", str(out), "--target", "stm32f746", "--json"])
    assert e.value.code == 0
    sim = json.loads(capsys.readouterr().out)
    assert sim["code_size"]["code_bytes"] == cross["code_bytes"]
