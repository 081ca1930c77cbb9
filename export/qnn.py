"""Qualcomm QNN HTP (the Hexagon NPU) through onnxruntime-qnn, never with a silent CPU fallback.

    qnn_session(model_bytes, precision="fp16", soc_model=DEFAULT_SOC) -> (session, Placement)
    integer_session(model) -> (session, Placement, Int32Form)   an integer step, whole on HTP
    available() -> bool

`onnxruntime-qnn` (the `qnn` extra) is an onnxruntime plugin: its Linux x86_64 wheel carries
the HTP backend as a simulator, so the same graph that a phone's NPU would run is compiled
by QNN's HTP graph compiler and executed here. Every session is created with
`session.disable_cpu_ep_fallback=1` (onnxruntime would otherwise rerun a graph QNN refuses,
or part of it, on its CPU provider without a word) and records which provider got each node;
a graph that QNN cannot take whole is an EdgeError naming the operators left on the CPU.

Float steps (measured on the simulator, QNN 2.51 in onnxruntime-qnn 2.7.0) run in fp16
(`enable_htp_fp16_precision=1` with a `soc_model`). That suits optimizers whose state stays
in fp16's range: AdamW's second moment (~1e-9 after one step) and eps (1e-8) underflow fp16
(smallest subnormal 6e-8), so an AdamW step is wrong by far more than FP16_TOLERANCE and is
refused. An fp32 float step is not offered: its graph finalisation fails
(QNN_COMMON_ERROR_MEM_ALLOC) for a comparison -> Cast feeding arithmetic and also for Sub,
Div or Sqrt feeding Mul, which every optimizer update contains.

Integer steps run in their int32 form (export.int32: int32 elementwise arithmetic, products
as float32 MatMul / Conv over chunks whose sums stay below 2^24, movement ops at rank <= 4)
in a session without `soc_model` or fp16, where the HTP's float32 MatMul and Conv are exact
on such sums (with a `soc_model` they are not: fp16-like errors). The plain integer graph is
refused op by op (MatMulInteger, ConvInteger, Neg, Pad, casts to and from int8 stay on the
CPU; int64 tensors are truncated to int32; integer Mod is wrong for negative values); the
form leaves none of that. Measured: every node on the HTP and bit-exact with the torch
integer step for the tested presets (tests/test_qnn.py, benchmarks/runtimes.py).

One precision per process: the backend keeps the first fp16 session's settings, so an fp32
(integer) session made after it silently computes in fp16, and one made before it fails at
its next run. The first session fixes the process's precision; another is an EdgeError.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from edge.errors import EdgeError

QNN_EXTRA = 'pip install -e ".[qnn]"'
EP = "QNNExecutionProvider"
PRECISIONS = ("fp16",)
# SM8650 (Snapdragon 8 Gen 3), HTP v75: the SoC table of ExecuTorch's QNN backend
# (backends/qualcomm/serialization/qc_schema.py: SM8650 = 57 # v75)
DEFAULT_SOC = "57"
# fp16 HTP vs fp32 onnxruntime, relative L2 per parameter / state tensor after 20 SGD steps:
# measured worst 0.107 over the local rules (clapp++both, lr 1e-2, digits x0.25, batch 8;
# benchmarks/results/runtimes/). fp16 error grows with the steps: this is not fp32 parity.
FP16_TOLERANCE = 0.15
_FALLBACK_REFUSED = "fallback to CPU EP has been explicitly disabled"


@dataclass(frozen=True)
class Placement:
    """Where onnxruntime put the graph's nodes (after its own graph optimizations)."""

    nodes: int
    on_accelerator: int
    partitions: int  # QNN subgraphs, each compiled into one QNN graph
    cpu_ops: dict[str, int] = field(default_factory=dict)  # op type -> count left on the CPU

    @property
    def complete(self) -> bool:
        return self.nodes > 0 and self.on_accelerator == self.nodes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def available() -> bool:
    try:
        _register()
    except EdgeError:
        return False
    return True


@functools.cache
def _register() -> str:
    """Register the plugin once per process; returns the HTP backend library path."""
    try:
        import onnxruntime
        import onnxruntime_qnn
    except ImportError:
        raise EdgeError(f"the QNN HTP runtime (onnxruntime-qnn) is not installed; "
                        f"{QNN_EXTRA}") from None
    names = {d.ep_name for d in onnxruntime.get_ep_devices()}
    if EP not in names:
        try:
            with quiet_stdout():
                onnxruntime.register_execution_provider_library(
                    EP, onnxruntime_qnn.get_library_path())
        except Exception as e:  # a wheel that does not match this onnxruntime
            raise EdgeError(f"cannot load the QNN execution provider: {_first_line(e)}") from None
    return onnxruntime_qnn.get_qnn_htp_path()


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """QNN's libraries print a banner on file descriptor 1 when they load; `--json` output
    must stay one JSON object, so the C-level stdout goes to /dev/null meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


INTEGER_PRECISION = "fp32"  # the int32 form's products: float32 MatMul / Conv, exact sums
_PROCESS_PRECISION: list[str] = []  # the precision of this process's first session


def _options(precision: str, soc_model: str | None) -> dict[str, str]:
    if precision == INTEGER_PRECISION:
        _claim(precision)
        return {"backend_path": _register(), "htp_performance_mode": "burst"}
    if precision not in PRECISIONS:
        raise EdgeError(f"unknown QNN precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    _claim(precision)
    return {"backend_path": _register(), "htp_performance_mode": "burst",
            "soc_model": str(soc_model), "enable_htp_fp16_precision": "1"}


def _claim(precision: str) -> None:
    """The process's QNN precision is its first session's (module docstring)."""
    if not _PROCESS_PRECISION:
        _PROCESS_PRECISION.append(precision)
    elif _PROCESS_PRECISION[0] != precision:
        kind = {INTEGER_PRECISION: "integer (fp32)"}.get(precision, f"{precision} float")
        raise EdgeError(f"QNN HTP keeps one precision per process and this one already runs "
                        f"{_PROCESS_PRECISION[0]} graphs; run the {kind} step in a new process")


def _session(blob: bytes, opts: dict[str, str], fallback: bool, threads: int) -> Any:
    import onnxruntime

    so = onnxruntime.SessionOptions()
    so.log_severity_level = 4  # QNN's own complaints become the one-line EdgeError below
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if fallback else "1")
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    devices = [d for d in onnxruntime.get_ep_devices() if d.ep_name == EP]
    so.add_provider_for_devices(devices, opts)
    with quiet_stdout():
        return onnxruntime.InferenceSession(blob, so)


def placement(session: Any) -> Placement:
    nodes, on_qnn, parts, cpu = 0, 0, 0, {}
    for sub in session.get_provider_graph_assignment_info():
        ops = [n.op_type for n in sub.get_nodes()]
        nodes += len(ops)
        if sub.ep_name == EP:
            on_qnn, parts = on_qnn + len(ops), parts + 1
        else:
            for op in ops:
                cpu[op] = cpu.get(op, 0) + 1
    return Placement(nodes, on_qnn, parts, dict(sorted(cpu.items())))


def _left_on_cpu(p: Placement) -> str:
    ops = ", ".join(f"{k} x{v}" for k, v in p.cpu_ops.items())
    return (f"QNN HTP cannot take the whole graph ({p.on_accelerator} of {p.nodes} nodes); "
            f"left on the CPU: {ops}")


def qnn_session(
    blob: bytes, precision: str = "fp16", soc_model: str = DEFAULT_SOC, threads: int = 1
) -> tuple[Any, Placement]:
    """An onnxruntime session with every node on QNN HTP, and where the nodes went."""
    return _whole(blob, _options(precision, soc_model), precision, threads)


def _whole(
    blob: bytes, opts: dict[str, str], precision: str, threads: int
) -> tuple[Any, Placement]:
    try:
        session = _session(blob, opts, fallback=False, threads=threads)
    except EdgeError:
        raise
    except Exception as e:
        if _FALLBACK_REFUSED not in str(e):
            raise EdgeError(f"QNN HTP ({precision}) rejects the graph: {_first_line(e)}") from None
        # which nodes QNN refused: the same graph with fallback allowed, only to list them
        try:
            diagnosis = placement(_session(blob, opts, fallback=True, threads=threads))
        except Exception:
            raise EdgeError(f"QNN HTP ({precision}) cannot place the whole graph") from None
        raise EdgeError(_left_on_cpu(diagnosis)) from None
    where = placement(session)
    if not where.complete:  # belt and braces: never run a partly-CPU graph as "QNN"
        raise EdgeError(_left_on_cpu(where))
    return session, where


def is_integer_graph(model: Any) -> bool:
    """Whether a graph is an integer step (it has integer products)."""
    from export.int32 import is_integer_graph as integer

    return integer(model)


def integer_session(model: Any, threads: int = 1) -> tuple[Any, Placement, Any]:
    """An integer step's int32 form (export.int32) in an fp32 HTP session, every node on the
    HTP; returns the session, where the nodes went and the form (it converts the arrays at
    the graph's interface)."""
    from export.int32 import int32_form
    from export.profile import BANNED_OPS, npu_profile

    if any(n.op_type in BANNED_OPS for n in model.graph.node):
        model = npu_profile(model)
    form = int32_form(model)
    session, where = _whole(form.model.SerializeToString(), _options(INTEGER_PRECISION, None),
                            INTEGER_PRECISION, threads)
    return session, where, form


def check_optimizer(optimizer: str, precision: str) -> None:
    """AdamW in fp16 is numerically wrong (see the module docstring): say so up front."""
    if precision == "fp16" and optimizer == "adamw":
        raise EdgeError("AdamW's second moment and eps underflow fp16 on the QNN HTP (the "
                        "step is wrong, not just imprecise); use --optimizer sgd")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line.split(" : ")[-1].strip() if " : " in line else line
