"""Inference graphs of the encoder: fp32 ONNX, and int8 QCDQ / QONNX through Brevitas.

    encoder_graph(net, params, outputs="all"|"last", weights="baked"|"inputs")
        -> (onnx.ModelProto, GraphIO)          fp32; input x (dynamic batch N), outputs y0.. or y
    integer_encoder_graph(net, plan, qparams, outputs=..., weights=...)
        -> (onnx.ModelProto, GraphIO)          integer mode's network: int8 x at the plan's
                                               input exponent, uint8 codes y0.. at each layer's
                                               f_y, integer ops only (quant.integer_forward)
    quant_encoder(net, params, calib)  -> nn.Module    quant.layers' Brevitas encoder, power-of-
                                                       two scales calibrated, then frozen
    qcdq_graph(qmodel, example, path)  -> onnx.ModelProto   QuantizeLinear/Clip/DequantizeLinear
    qonnx_graph(qmodel, example, path) -> onnx.ModelProto   qonnx.custom_op.general::Quant

`weights="inputs"` takes the encoder weights as graph inputs named like the training graph's
(`params/enc.{i}.*`), so a bundle's inference graph runs on whatever the device trained.
Brevitas 0.13.4: export with dynamo=False (its dynamo path refuses quantized biases); the
export functions return None, so the model is read back from `path`.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from edge.errors import EdgeError
from edge.nets import NetSpec, layer_forward, layer_params
from export.manifest import PARAMS, GraphIO
from export.trace import check_model, export_function, one_thread, value_specs

INFER_FILE = "infer.onnx"
OUTPUTS = ("all", "last")
WEIGHTS = ("baked", "inputs")


def output_names(net: NetSpec, outputs: str) -> list[str]:
    if outputs not in OUTPUTS:
        raise EdgeError(f"unknown encoder outputs {outputs!r}; valid: {', '.join(OUTPUTS)}")
    return [f"y{i}" for i in range(len(net.layers))] if outputs == "all" else ["y"]


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
    enc = {k: v.detach() for k, v in params.items() if k.startswith("enc.")}
    inputs: dict[str, Tensor] = {"x": torch.zeros((batch_size or 2, *net.in_shape))}
    if weights == "inputs":
        inputs.update({PARAMS + k: v for k, v in enc.items()})

    def fn(t: dict[str, Tensor]) -> dict[str, Tensor]:
        p = {k: t[PARAMS + k] for k in enc} if weights == "inputs" else enc
        x, ys = t["x"], []
        for i, layer in enumerate(net.layers):
            w, b = layer_params(p, i)
            x = layer_forward(layer, w, b, x).y
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
        ys = integer_forward(net, plan, p, t["x"])
        return dict(zip(names, ys, strict=False)) if outputs == "all" else {"y": ys[-1]}

    dynamic = None
    if batch_size is None:
        dynamic = {"x": {0: "N"}, **{n: {0: "N"} for n in names}}
    model = export_function(fn, inputs, names, dynamic_axes=dynamic)
    io = GraphIO(INFER_FILE, value_specs(model.graph.input), value_specs(model.graph.output))
    return model, io


# ------------------------------------------------------------------------------ Brevitas


def quant_encoder(
    net: NetSpec, params: dict[str, Tensor], calib: Tensor | list[Tensor],
    per_channel: bool = False,
) -> nn.Module:
    """The Brevitas encoder of `quant.layers` (int8 input, int8 power-of-two weights, int32
    biases, uint8 ReLU outputs), its weight scales set from `params` and its activation
    scales calibrated on `calib` (a batch or a list of batches), all then frozen."""
    batches = [calib] if isinstance(calib, Tensor) else list(calib)
    with _quiet():
        from quant.layers import build_quant_encoder, calibrate_encoder

        enc = build_quant_encoder(net, params, per_channel=per_channel)
        return calibrate_encoder(enc, batches)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), one_thread():
        warnings.simplefilter("ignore")
        yield


def _brevitas_export(kind: str, model: nn.Module, example: Tensor, path: Path,
                     n_out: int, dynamic_batch: bool) -> onnx.ModelProto:
    from brevitas.export import export_onnx_qcdq, export_qonnx

    fn = export_onnx_qcdq if kind == "qcdq" else export_qonnx
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"y{i}" for i in range(n_out)]
    dynamic = {"x": {0: "N"}, **{n: {0: "N"} for n in names}} if dynamic_batch else None
    with _quiet(), torch.no_grad():
        try:  # 0.13.4 returns None: the model is only in the file
            fn(model, args=example, export_path=str(path), dynamo=False, input_names=["x"],
               output_names=names, dynamic_axes=dynamic)
        except Exception as e:
            raise EdgeError(f"Brevitas {kind} export failed: {type(e).__name__}: {e}") from None
    return onnx.load(str(path))


def qcdq_graph(model: nn.Module, example: Tensor, path: str | Path) -> onnx.ModelProto:
    """int8 QCDQ ONNX (standard ops only) written to `path` and returned."""
    with torch.no_grad():
        n_out = len(model(example))
    onnx_model = _brevitas_export("qcdq", model, example, Path(path), n_out, True)
    check_model(onnx_model)
    return onnx_model


def qonnx_graph(model: nn.Module, example: Tensor, path: str | Path) -> onnx.ModelProto:
    """QONNX (Quant nodes in the qonnx.custom_op.general domain: FINN and friends), with the
    example's static batch size (FINN and qonnx's executor want static shapes)."""
    with torch.no_grad():
        n_out = len(model(example))
    onnx_model = _brevitas_export("qonnx", model, example, Path(path), n_out, False)
    check_model(onnx_model, standard_only=False)
    return onnx_model


def run_qonnx(model: onnx.ModelProto, x: Any) -> list[Any]:
    """Execute a QONNX graph with qonnx's reference executor (slow; for checks)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    wrapped = cleanup_model(ModelWrapper(model))
    out = execute_onnx(wrapped, {wrapped.graph.input[0].name: x})
    return [out[o.name] for o in wrapped.graph.output]
