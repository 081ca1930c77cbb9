"""The ONNX graph of one complete local training step, and its manifest.

    training_step(net, rule, opt, params, state, batch_size) -> (onnx.ModelProto, Manifest)

Inputs: every parameter (`params/<name>`) and optimizer state tensor (`state/<name>`, the step
counter included), both views `x1`, `x2` at a fixed batch size, and `noise/<name>` random bits
when the program rounds stochastically. Outputs: `new_params/*`, `new_state/*`, `loss`,
`layer_loss` (one per layer) and any other metric the rule reports. The manifest binds each
new_* output to the input it replaces at the next step.
"""

from __future__ import annotations

from typing import Any

import onnx
import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.nets import NetSpec
from edge.optim import OptimConfig
from export.manifest import (
    NEW_PARAMS,
    NEW_STATE,
    NOISE,
    PARAMS,
    STATE,
    GraphIO,
    Manifest,
    TensorSpec,
)
from export.profile import apply_profile
from export.program import StepProgram, fp32_program, require_local
from export.trace import export_function, one_thread, value_specs

STEP_FILE = "train_step.onnx"
VIEWS = ("x1", "x2")


def versions() -> dict[str, str]:
    import onnxruntime

    import edge
    from export.trace import OPSET

    return {
        "edge": edge.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "opset": str(OPSET),
    }


def example_inputs(
    net: NetSpec,
    params: dict[str, Tensor],
    state: dict[str, Tensor],
    batch_size: int,
    program: StepProgram,
) -> dict[str, Tensor]:
    """Named graph inputs (the views are zeros: only their shape and dtype matter)."""
    inputs = {PARAMS + k: v.detach() for k, v in params.items()}
    inputs.update({STATE + k: v.detach() for k, v in state.items()})
    view = torch.zeros((batch_size, *net.in_shape), dtype=getattr(torch, program.view_dtype))
    inputs.update({name: view.clone() for name in VIEWS})
    inputs.update(noise_inputs(program.noise))
    return inputs


def noise_inputs(specs: tuple[TensorSpec, ...]) -> dict[str, Tensor]:
    return {t.name: torch.zeros(t.shape, dtype=getattr(torch, t.dtype)) for t in specs}


def take_noise(t: dict[str, Tensor]) -> dict[str, Tensor]:
    """The noise/* graph inputs, keyed without the prefix."""
    return {k[len(NOISE):]: v for k, v in t.items() if k.startswith(NOISE)}


def step_function(program: StepProgram, param_names: list[str], state_names: list[str]):
    """The program's step over named graph tensors: inputs dict -> outputs dict."""

    def fn(t: dict[str, Tensor]) -> dict[str, Tensor]:
        params = {k: t[PARAMS + k] for k in param_names}
        state = {k: t[STATE + k] for k in state_names}
        noise = take_noise(t)
        new_params, new_state, metrics = program.step(params, state, t["x1"], t["x2"], noise)
        out = {NEW_PARAMS + k: new_params[k] for k in param_names}
        out.update({NEW_STATE + k: new_state[k] for k in state_names})
        out.update(metrics)
        return out

    return fn


def check_batch(batch_size: int) -> None:
    if batch_size < 2:  # the hinge's negatives pair image i with image i+1
        raise EdgeError(f"batch size must be at least 2 for a contrastive step, got {batch_size}")


def base_manifest(
    net: NetSpec, rule: Any, opt: OptimConfig, batch_size: int, program: StepProgram,
    step: GraphIO, target: dict[str, Any] | None = None,
) -> Manifest:
    low, high = program.noise_range
    return Manifest(
        step=step, rule=rule.name, hparams=rule.hparams(), optimizer=opt.__dict__.copy(),
        net=net.to_dict(), batch_size=batch_size, versions=versions(),
        quant=program.quant, target=target,
        noise={"low": low, "high": high} if program.noise else None,
    )


def training_step(
    net: NetSpec,
    rule: Any,
    opt: OptimConfig,
    params: dict[str, Tensor],
    state: dict[str, Tensor],
    batch_size: int,
    program: StepProgram | None = None,
    target: dict[str, Any] | None = None,
    optimize: bool = True,
    profile: str = "plain",
) -> tuple[onnx.ModelProto, Manifest]:
    """One whole training step as an ONNX model; `program` defaults to fp32, `profile` is
    an operator profile of export.profile (the same numbers; "npu" for NPU compilers)."""
    require_local(rule)
    check_batch(batch_size)
    program = program or fp32_program(net, rule, opt)
    param_names, state_names = list(params), list(state)
    inputs = example_inputs(net, params, state, batch_size, program)
    fn = step_function(program, param_names, state_names)
    with torch.no_grad(), one_thread():
        example = fn(dict(inputs))  # eager once: which metrics, and that it runs at all
    outputs = list(example)
    model = apply_profile(export_function(fn, inputs, outputs, optimize=optimize), profile)
    bindings = [(NEW_PARAMS + k, PARAMS + k) for k in param_names]
    bindings += [(NEW_STATE + k, STATE + k) for k in state_names]
    io = GraphIO(STEP_FILE, value_specs(model.graph.input), value_specs(model.graph.output),
                 tuple(bindings))
    return model, base_manifest(net, rule, opt, batch_size, program, io, target)
