"""Measure tensor shapes that ONNX shape inference cannot derive, by running the graph once.

Some exporters compute shapes at run time (`F.unfold` becomes Shape -> Range -> Gather ...),
and `infer_shapes` cannot follow `Range` and friends even with data propagation. When every
graph input has a concrete shape we can simply run the model with onnxruntime on all-zero
inputs, with the unknown tensors added as extra graph outputs, and read their shapes.

Caveat (kept as a note in the report): shapes that depend on input *values* (NonZero, TopK
with a data-dependent k, ...) are the shapes for zeros, not for your data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import ModelProto

from edge.sim.schedule import TensorInfo


def _zeros_for(vi: onnx.ValueInfoProto) -> np.ndarray:
    tt = vi.type.tensor_type
    dims = [d.dim_value for d in tt.shape.dim]
    if any(d <= 0 for d in dims) and dims:
        raise ValueError(f"input {vi.name!r} has no concrete shape")
    return np.zeros(dims, dtype=onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))


def measure_shapes(model: ModelProto, names: Sequence[str]) -> dict[str, TensorInfo]:
    """Run `model` (whose graph inputs have concrete shapes) on zeros; size `names`.

    Raises whatever onnxruntime raises (the caller turns it into an EdgeError); names that
    the run does not produce are absent from the result.
    """
    import onnxruntime as ort

    probe = ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    inits = {t.name for t in probe.graph.initializer}
    feed = {vi.name: _zeros_for(vi) for vi in probe.graph.input if vi.name not in inits}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    wanted = set(names)
    out_names = [o.name for o in sess.get_outputs()]
    result: dict[str, TensorInfo] = {}
    for name, value in zip(out_names, sess.run(out_names, feed), strict=True):
        if name in wanted and isinstance(value, np.ndarray):
            arr = np.asarray(value)
            result[name] = TensorInfo(
                name, int(arr.nbytes), "activation", tuple(arr.shape), arr.dtype.name
            )
    return result
