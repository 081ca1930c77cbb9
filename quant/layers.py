"""Brevitas quantized encoders for the forward pass: calibrate, freeze, export to QCDQ ONNX.

`build_quant_encoder(net, params)` turns a `NetSpec` and its float parameters into an
`nn.Module` of Brevitas layers with power-of-two (fixed-point) quantizers:

    QuantIdentity(Int8ActPerTensorFixedPoint)                     the input, int8
    per layer: QuantConv2d | QuantLinear(Int8WeightPerTensorFixedPoint or PerChannel,
                                         Int32Bias at input scale x weight scale)
               QuantReLU(Uint8ActPerTensorFixedPoint)             the output, uint8
               2x2 max-pool (on the quantized tensor) where the layer pools

Freezing (Brevitas 0.13.4). A stock fixed-point weight quantizer recomputes its max-based
scale from the weight at every forward. Here the weight quantizers use
`scaling_impl_type = "parameter_from_stats"`: the scale is computed once from the weight at the
first quantization (`calibrate_encoder` triggers it) and is then a fixed parameter, whatever
the weights become. The activation quantizers (ParamFromRuntimePercentileScaling) collect
statistics only inside `brevitas.graph.calibrate.calibration_mode` (averaged over the
batches) and are frozen once it exits. Passing `exponents` instead builds const-scaled
quantizers at exactly those scales (the integer plan's), frozen by construction.

Export: `export_qcdq(module, x, path)` calls `brevitas.export.export_onnx_qcdq` with
dynamo=False: 0.13.4's dynamo path refuses quantized biases. It returns None; the file at
`path` is the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from brevitas.export import export_onnx_qcdq
from brevitas.graph.calibrate import calibration_mode
from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
from brevitas.quant.fixed_point import (
    Int8ActPerTensorFixedPoint,
    Int8WeightPerChannelFixedPoint,
    Int8WeightPerTensorFixedPoint,
    Uint8ActPerTensorFixedPoint,
)
from brevitas.quant.scaled_int import Int32Bias
from torch import Tensor, nn

from edge.errors import EdgeError
from edge.nets import NetSpec
from quant.spec import exponent_of


class FrozenInt8WeightPerTensorFixedPoint(Int8WeightPerTensorFixedPoint):
    """Int8WeightPerTensorFixedPoint whose scale is set once from the weight, then fixed."""

    scaling_impl_type = "parameter_from_stats"


class FrozenInt8WeightPerChannelFixedPoint(Int8WeightPerChannelFixedPoint):
    """Int8WeightPerChannelFixedPoint whose scales are set once from the weight, then fixed."""

    scaling_impl_type = "parameter_from_stats"


@dataclass(frozen=True)
class EncoderExponents:
    """Scales of a quantized encoder as exponents (scale 2^-f); f_w per channel if so."""

    f_in: int
    f_w: tuple[int | tuple[int, ...], ...]
    f_y: tuple[int, ...]


def _const_act(exponent: int, signed: bool) -> dict:
    """Brevitas const fixed-point scaling: scale = max_val / 2^(bits - signed)."""
    top = 2.0 ** (-exponent) * (128 if signed else 256)
    return {"scaling_impl_type": "const", "max_val": top, **({"min_val": -top} if signed else {})}


class QuantEncoder(nn.Module):
    """The Brevitas form of an edge encoder; forward returns every layer's (dequantized)
    output, the features the probe reads."""

    def __init__(
        self, net: NetSpec, per_channel: bool = False, exponents: EncoderExponents | None = None
    ):
        super().__init__()
        if exponents is not None and per_channel:
            raise EdgeError("fixed exponents are supported for per-tensor weight scales only")
        self.net = net
        kw_in = _const_act(exponents.f_in, True) if exponents else {}
        self.inp = QuantIdentity(
            act_quant=Int8ActPerTensorFixedPoint, return_quant_tensor=True, **kw_in
        )
        wq = (
            FrozenInt8WeightPerChannelFixedPoint
            if per_channel
            else FrozenInt8WeightPerTensorFixedPoint
        )
        self.layers, self.acts = nn.ModuleList(), nn.ModuleList()
        for i, spec in enumerate(net.layers):
            kw_w = {}
            if exponents is not None:
                kw_w = {
                    "weight_quant": Int8WeightPerTensorFixedPoint,
                    "weight_scaling_impl_type": "const",
                    "weight_scaling_const": 2.0 ** (-exponents.f_w[i]) * 128,
                }
            common = {
                "weight_quant": wq,
                "bias_quant": Int32Bias,
                "return_quant_tensor": True,
                **kw_w,
            }
            if spec.kind == "conv":
                mod = QuantConv2d(spec.in_features, spec.out_features, 3, padding=1, **common)
            else:
                mod = QuantLinear(spec.in_features, spec.out_features, bias=True, **common)
            kw_y = _const_act(exponents.f_y[i], False) if exponents else {}
            self.layers.append(mod)
            self.acts.append(
                QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, return_quant_tensor=True, **kw_y)
            )

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        outs = []
        x = self.inp(x)
        for spec, mod, act in zip(self.net.layers, self.layers, self.acts, strict=True):
            if spec.kind == "linear":
                x = x.flatten(1)
            x = act(mod(x))
            if spec.pool:
                x = F.max_pool2d(x, 2)
            outs.append(getattr(x, "value", x))  # a QuantTensor, or a tensor while calibrating
        return tuple(outs)


def load_params(enc: QuantEncoder, params: dict[str, Tensor]) -> None:
    """Copy float weights and biases `enc.{i}.w` / `enc.{i}.b` into the encoder."""
    with torch.no_grad():
        for i, mod in enumerate(enc.layers):
            mod.weight.copy_(params[f"enc.{i}.w"])
            mod.bias.copy_(params[f"enc.{i}.b"])


def build_quant_encoder(
    net: NetSpec,
    params: dict[str, Tensor],
    per_channel: bool = False,
    exponents: EncoderExponents | None = None,
) -> QuantEncoder:
    """A Brevitas encoder holding `params` (float), in eval mode. Without `exponents` it still
    needs `calibrate_encoder`; with them its scales are those exponents, fixed."""
    enc = QuantEncoder(net, per_channel, exponents)
    load_params(enc, params)
    return enc.eval()


def calibrate_encoder(enc: QuantEncoder, batches: list[Tensor]) -> QuantEncoder:
    """Fix the weight scales from the current weights, then the activation scales from the
    batches (float inputs); everything is frozen afterwards."""
    if not batches:
        raise EdgeError("calibration needs at least one batch")
    enc.eval()
    with torch.no_grad():
        for mod in enc.layers:
            mod.quant_weight()  # parameter_from_stats: the weight scale is set here, once
        with calibration_mode(enc):
            for x in batches:
                enc(x)
    return enc.eval()


def encoder_exponents(enc: QuantEncoder) -> EncoderExponents:
    """Read the (frozen) power-of-two scales back as exponents."""
    with torch.no_grad():
        f_in = exponent_of(float(enc.inp.act_quant.scale()))
        f_w = []
        for mod in enc.layers:
            s = mod.quant_weight().scale.flatten()
            fs = tuple(exponent_of(float(v)) for v in s)
            f_w.append(fs[0] if s.numel() == 1 else fs)
        f_y = tuple(exponent_of(float(act.act_quant.scale())) for act in enc.acts)
    return EncoderExponents(f_in, tuple(f_w), f_y)


def export_qcdq(enc: QuantEncoder, x: Tensor, path: str | Path) -> Path:
    """QCDQ ONNX of the encoder for input shape x.shape (TorchScript exporter, see above)."""
    path = Path(path)
    enc.eval()
    with torch.no_grad():
        export_onnx_qcdq(enc, x, export_path=str(path), dynamo=False)
    if not path.exists():
        raise EdgeError(f"Brevitas wrote no ONNX file at {path}")
    return path
