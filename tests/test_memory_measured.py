"""The simulated peak of the exported fp32 step against onnxruntime's measured memory.

The measurement is `benchmarks/sim_vs_measured.py` (a fresh process, CPU memory arena off,
inputs bound, peak resident set during one run). Like with like: ORT runs the nodes in the
file's order and allocates each tensor by its producer, frees it after its last reader (no
buffer reuse): the simulator's own model, with the inputs held by the caller. Goal: 25%.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from edge.nets import preset
from edge.optim import OptimConfig
from edge.rules.clapp_pp import ClappPP
from export.step import block_graphs, fp32_program, step_graph

pytestmark = pytest.mark.slow


def _bench():
    path = Path(__file__).parents[1] / "benchmarks" / "sim_vs_measured.py"
    spec = importlib.util.spec_from_file_location("sim_vs_measured", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def graphs():
    net = preset("digits", (1, 8, 8), 1.0)
    rule, opt = ClappPP(), OptimConfig("adamw", lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    params = net.init_params(gen)
    params.update(rule.init(net, gen))
    state = opt.init_state(params)
    program = fp32_program(net, rule, opt)
    model, man = step_graph(net, rule, program, params, state, 32)
    layers, ios = block_graphs(net, rule, program, params, state, 32)
    return [(model, man.step.memory_view()), (layers[1], ios[1].memory_view())]


def test_simulated_peak_within_25_percent_of_onnxruntime(graphs, tmp_path: Path) -> None:
    bench = _bench()
    for k, (model, manifest) in enumerate(graphs):
        path = tmp_path / f"g{k}.onnx"
        path.write_bytes(model.SerializeToString())
        assert bench.ort_order(path, order="priority_based") == [n.name for n in model.graph.node]
        m = bench.measure(path, mem_pattern=False, reuse=False, order="priority_based")
        sim = bench.simulated(model, manifest)
        total = m["input_bytes"] + m["measured_delta"]
        assert m["measured_delta"] > 0.2 * sim["sim_transient"]  # the run was seen at all
        assert abs(sim["sim_peak"] / total - 1) <= 0.25, (k, sim["sim_peak"], total)
