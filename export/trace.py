"""Trace a pure tensor function into a clean, standard-ops-only ONNX model.

`export_function(fn, inputs, output_names)` is the one place that talks to the exporter:
  1. wrap `fn` (dict of named tensors -> dict of named tensors) in an nn.Module over flat
     tensors and trace it with the TorchScript exporter (`dynamo=False`, opset 18): about
     1 s for a small net where the dynamo exporter takes ~14 s, and the same graph after
  2. `export.passes.optimize_graph`: constant folding with shape inference (the static-shape
     `Shape` chains fold away), dead-node and common-subexpression elimination, and two
     rewrites that keep the graph small and fast (see there),
  3. check: only the standard `ai.onnx` domain (no com.microsoft, no training preview ops),
     every declared input and output present by name, `onnx.checker` full check.
A failure anywhere is an `EdgeError` naming the operator or tensor.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor

from edge.errors import EdgeError
from export.manifest import TensorSpec
from export.passes import optimize_graph

OPSET = 18
STANDARD_DOMAINS = ("", "ai.onnx")
TensorFn = Callable[[dict[str, Tensor]], dict[str, Tensor]]


class _Flat(torch.nn.Module):
    """`fn` over positional tensors: what the tracer needs."""

    def __init__(self, fn: TensorFn, in_names: list[str], out_names: list[str]):
        super().__init__()
        self.fn, self.in_names, self.out_names = fn, in_names, out_names

    def forward(self, *flat: Tensor) -> tuple[Tensor, ...]:
        named = dict(zip(self.in_names, flat, strict=True))
        out = self.fn(named)
        missing = [n for n in self.out_names if n not in out]
        if missing:
            raise EdgeError(f"the traced function does not produce {', '.join(missing)}")
        result, seen = [], {id(t) for t in flat}
        for n in self.out_names:
            t = out[n]
            if id(t) in seen:  # an output that is an input or another output: a fresh copy
                t = t.clone()
            seen.add(id(t))
            result.append(t)
        return tuple(result)


def export_function(
    fn: TensorFn,
    inputs: dict[str, Tensor],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    optimize: bool = True,
    opset: int = OPSET,
) -> onnx.ModelProto:
    """The ONNX model of `fn` at the given example inputs (their shapes are baked in)."""
    names = list(inputs)
    module = _Flat(fn, names, list(output_names))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _no_ir_dump(), one_thread():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, tuple(inputs[n] for n in names), buf, dynamo=False,
                opset_version=opset, input_names=names, output_names=list(output_names),
                dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
        except EdgeError:
            raise
        except Exception as e:  # the exporter's own errors name the operator
            raise EdgeError(f"ONNX export failed: {_first_line(e)}") from None
    model = _restore_unused_inputs(onnx.load_model_from_string(buf.getvalue()), inputs)
    if optimize:
        model = optimize_graph(model)
    check_model(model, names, list(output_names))
    return model


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Trace on one torch thread: tracing needs no speed, and on a busy machine two spinning
    OpenMP threads make the example convolutions many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _no_ir_dump() -> Iterator[None]:
    """torch 2.x's TorchScript exporter turns its C++ log on for every export (it tests the
    function `_jit_is_onnx_log_enabled` for truth instead of calling it) and then dumps the
    whole Torch IR graph to stderr on any failure. Keep that log off; the EdgeError names
    the operator."""
    try:
        from torch.onnx._internal.torchscript_exporter import utils
    except ImportError:  # another torch layout: nothing to patch
        yield
        return
    original = utils.setup_onnx_logging
    utils.setup_onnx_logging = lambda verbose: contextlib.nullcontext()
    try:
        yield
    finally:
        utils.setup_onnx_logging = original


def _restore_unused_inputs(model: onnx.ModelProto, inputs: dict[str, Tensor]) -> onnx.ModelProto:
    """The TorchScript exporter drops inputs the function never reads (an fp32 program that
    ignores some noise, say); put them back, in the declared order, so the graph's interface
    is the manifest's whatever the arithmetic uses."""
    have = {i.name: i for i in model.graph.input}
    if list(have) == list(inputs):
        return model
    ordered = []
    for name, t in inputs.items():
        if name in have:
            ordered.append(have[name])
            continue
        elem = onnx.helper.np_dtype_to_tensor_dtype(t.detach().numpy().dtype)
        ordered.append(onnx.helper.make_tensor_value_info(name, elem, list(t.shape)))
    del model.graph.input[:]
    model.graph.input.extend(ordered)
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def nonstandard_ops(model: onnx.ModelProto) -> list[str]:
    """`domain::op` of every node outside the standard ai.onnx domain (subgraphs included)."""
    bad: list[str] = []

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.domain not in STANDARD_DOMAINS:
                bad.append(f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return sorted(set(bad))


def check_model(
    model: onnx.ModelProto,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    standard_only: bool = True,
) -> None:
    """Standard ops only, the declared names present, and `onnx.checker` full check."""
    if standard_only:
        bad = nonstandard_ops(model)
        if bad:
            raise EdgeError(f"graph uses non-standard ops {', '.join(bad)}")
        extra = [o.domain for o in model.opset_import if o.domain not in STANDARD_DOMAINS]
        if extra:
            raise EdgeError(f"graph imports non-standard opset domains {', '.join(extra)}")
    have_in = [i.name for i in model.graph.input]
    have_out = [o.name for o in model.graph.output]
    if input_names is not None and have_in != list(input_names):
        missing = sorted(set(input_names) - set(have_in)) or have_in
        raise EdgeError(f"graph inputs differ from the declared ones: {', '.join(missing)}")
    if output_names is not None and have_out != list(output_names):
        missing = sorted(set(output_names) - set(have_out)) or have_out
        raise EdgeError(f"graph outputs differ from the declared ones: {', '.join(missing)}")
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise EdgeError(f"onnx.checker rejects the graph: {_first_line(e)}") from None


_ONNX_TO_NP = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT16: "int16", onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool",
}


def value_specs(values: Any) -> tuple[TensorSpec, ...]:
    """TensorSpecs of graph inputs or outputs as the graph itself declares them."""
    out = []
    for v in values:
        t = v.type.tensor_type
        dtype = _ONNX_TO_NP.get(t.elem_type)
        if dtype is None:
            name = onnx.TensorProto.DataType.Name(t.elem_type)
            raise EdgeError(f"tensor {v.name!r} has unsupported element type {name}")
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
        out.append(TensorSpec(v.name, dims, dtype))
    return tuple(out)


def spec_of(name: str, t: Tensor | np.ndarray) -> TensorSpec:
    arr = t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)
    return TensorSpec(name, tuple(int(s) for s in arr.shape), str(arr.dtype))


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
