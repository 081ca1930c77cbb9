"""Hardware memory simulator: does a graph fit a device, and where does every tensor live.

Pipeline: a front end lowers a graph to a `Schedule` (`onnx_graph` for ONNX, `backprop` for a
traced forward+backward), `planner` packs transient tensors into an arena, `simulate` places
persistent tensors by policy and checks every memory tier against its usable bytes (capacity
minus the target's reserved bytes), `report` prints and plots. `neuromorphic` sizes a spiking
network on a neuromorphic target's cores instead. `backprop` imports torch and is not imported
here.
"""

from edge.sim.neuromorphic import LayerUsage, NeuromorphicReport, SpikingLayer, neuromorphic_report
from edge.sim.onnx_graph import VIEW_OPS, GraphOptions, schedule_from_onnx
from edge.sim.planner import ArenaPlan, check_no_overlap, greedy_plan, plan_schedule
from edge.sim.schedule import CATEGORIES, Op, Schedule, TensorInfo
from edge.sim.simulate import (
    MemoryReport,
    SimOptions,
    compare,
    max_batch_that_fits,
    simulate,
    simulate_sequence,
)

__all__ = [
    "CATEGORIES", "VIEW_OPS", "ArenaPlan", "GraphOptions", "LayerUsage", "MemoryReport",
    "NeuromorphicReport", "Op", "Schedule", "SimOptions", "SpikingLayer", "TensorInfo",
    "check_no_overlap", "compare", "greedy_plan", "max_batch_that_fits", "neuromorphic_report",
    "plan_schedule", "schedule_from_onnx", "simulate", "simulate_sequence",
]  # fmt: skip
