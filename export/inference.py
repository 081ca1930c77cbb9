"""Inference graphs of the encoder: fp32, and integer mode's network.

    encoder_graph(net, params, outputs="all"|"last", weights="baked"|"inputs")
        -> (onnx.ModelProto, GraphIO)          fp32; input x (dynamic batch N), outputs y0.. or y;
                                               BatchNorm folded into the conv before it
    integer_encoder_graph(net, plan, qparams, outputs=..., weights=...)
        -> (onnx.ModelProto, GraphIO)          integer mode's network: int8 x at the plan's
                                               input exponent, 8-bit codes y0.. at each block's
                                               output exponent, integer ops only
                                               (`quant.integer.integer_forward`)

`weights="inputs"` takes the encoder weights as graph inputs named like the training graph's
(`params/enc.*`), so a bundle's inference graph runs on whatever the device trained.
"""

from __future__ import annotations

from typing import Any

import onnx
import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.layers import TRACED
from edge.nets import NetSpec, fold_batchnorm
from export.manifest import PARAMS, GraphIO
from export.trace import export_function, value_specs

INFER_FILE = "infer.onnx"
OUTPUTS = ("all", "last")
WEIGHTS = ("baked", "inputs")


def output_names(net: NetSpec, outputs: str) -> list[str]:
    if outputs not in OUTPUTS:
        raise EdgeError(f"unknown encoder outputs {outputs!r}; valid: {', '.join(OUTPUTS)}")
    return [f"y{i}" for i in range(len(net.blocks))] if outputs == "all" else ["y"]


def encoder_graph(
    net: NetSpec,
    params: dict[str, Tensor],
    outputs: str = "all",
    weights: str = "baked",
    batch_size: int | None = None,
) -> tuple[onnx.ModelProto, GraphIO]:
    """fp32 encoder; `batch_size=None` leaves the batch axis dynamic (`N`)."""
    if weights not in WEIGHTS:
        raise EdgeError(f"unknown weights mode {weights!r}; valid: {', '.join(WEIGHTS)}")
    names = output_names(net, outputs)
    if weights == "baked":
        net, params = fold_batchnorm(net, params)
    enc = {k: v.detach() for k, v in params.items() if k.startswith("enc.")}
    inputs: dict[str, Tensor] = {"x": torch.zeros((batch_size or 2, *net.in_shape))}
    if weights == "inputs":
        inputs.update({PARAMS + k: v for k, v in enc.items()})

    def fn(t: dict[str, Tensor]) -> dict[str, Tensor]:
        p = {k: t[PARAMS + k] for k in enc} if weights == "inputs" else enc
        x, ys = t["x"], []
        for i, b in enumerate(net.blocks):
            x, _ = b.forward(TRACED, i, p, x)
            ys.append(x)
        return dict(zip(names, ys, strict=False)) if outputs == "all" else {"y": ys[-1]}

    dynamic = None
    if batch_size is None:
        dynamic = {"x": {0: "N"}, **{n: {0: "N"} for n in names}}
    model = export_function(fn, inputs, names, dynamic_axes=dynamic)
    io = GraphIO(INFER_FILE, value_specs(model.graph.input), value_specs(model.graph.output))
    return model, io


def integer_encoder_graph(
    net: NetSpec,
    plan: Any,
    qparams: dict[str, Tensor],
    outputs: str = "all",
    weights: str = "inputs",
    batch_size: int | None = None,
) -> tuple[onnx.ModelProto, GraphIO]:
    """The integer forward of `quant.integer.integer_forward` (ConvInteger / MatMulInteger,
    floor shifts, Clip before Cast) as a graph: input `x` int8 at scale 2^-plan.f_in, outputs
    uint8 at 2^-f_y of each layer. `weights="inputs"` takes the integer stores as
    `params/enc.{i}.*` inputs, like the integer training graph. `batch_size=None`: dynamic N."""
    from quant.integer import integer_forward

    if weights not in WEIGHTS:
        raise EdgeError(f"unknown weights mode {weights!r}; valid: {', '.join(WEIGHTS)}")
    names = output_names(net, outputs)
    enc = {k: v.detach() for k, v in qparams.items() if k.startswith("enc.")}
    inputs: dict[str, Tensor] = {"x": torch.zeros((batch_size or 2, *net.in_shape),
                                                  dtype=torch.int8)}
    if weights == "inputs":
        inputs.update({PARAMS + k: v for k, v in enc.items()})

    def fn(t: dict[str, Tensor]) -> dict[str, Tensor]:
        p = {k: t[PARAMS + k] for k in enc} if weights == "inputs" else enc
        ys = [y.t for y in integer_forward(net, plan, p, t["x"], traced=True)]
        return dict(zip(names, ys, strict=False)) if outputs == "all" else {"y": ys[-1]}

    dynamic = None
    if batch_size is None:
        dynamic = {"x": {0: "N"}, **{n: {0: "N"} for n in names}}
    model = export_function(fn, inputs, names, dynamic_axes=dynamic)
    io = GraphIO(INFER_FILE, value_specs(model.graph.input), value_specs(model.graph.output))
    return model, io
