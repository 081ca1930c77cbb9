"""Hardware memory simulator: does a graph fit a device, and where does every tensor live.

Pipeline: a front end lowers a graph to a `Schedule` (`onnx_graph` for ONNX, `backprop` for a
traced forward+backward), `planner` packs transient tensors into an arena, `simulate` places
persistent tensors by policy and checks every memory tier, `report` prints and plots.
`backprop` imports torch and is not imported here.
"""

from edge.sim.onnx_graph import GraphOptions, schedule_from_onnx
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
    "CATEGORIES", "ArenaPlan", "GraphOptions", "MemoryReport", "Op", "Schedule", "SimOptions",
    "TensorInfo", "check_no_overlap", "compare", "greedy_plan", "max_batch_that_fits",
    "plan_schedule", "schedule_from_onnx", "simulate", "simulate_sequence",
]  # fmt: skip
