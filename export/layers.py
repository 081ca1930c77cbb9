"""Per-layer training graphs: a small device trains one layer at a time.

    layer_step_graphs(net, rule, opt, params, state, batch_size)
        -> (list[onnx.ModelProto], list[GraphIO])

Graph i takes layer i's input for both views (`x1`, `x2`), layer i's parameters and their
optimizer state (`params/enc.{i}.*`, `params/rule.{i}.*`, `state/m.…`, `state/v.…`), the step
counter `state/step` (the count before this step) and its `noise/*` bits if any. It
returns the next layer's input (`y1`, `y2`), the layer's `new_params/*` and `new_state/*` and
its `loss`. The last graph also returns `new_state/step`. Running the graphs in order, feeding
y -> x, then applying every graph's bindings, is exactly one whole step: the union of their
outputs is the whole-step graph's outputs (`layer_loss` is the stacked losses).
"""

from __future__ import annotations

from typing import Any

import onnx
import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.nets import NetSpec
from edge.optim import OptimConfig
from export.manifest import NEW_PARAMS, NEW_STATE, PARAMS, STATE, GraphIO
from export.profile import apply_profile
from export.program import StepProgram, fp32_program, layer_of, require_local, state_layer_of
from export.trace import export_function, one_thread, value_specs
from export.training_step import check_batch, noise_inputs, take_noise

STEP = "step"


def layer_file(i: int) -> str:
    return f"layers/layer_{i}.onnx"


def split_by_layer(
    net: NetSpec, params: dict[str, Tensor], state: dict[str, Tensor]
) -> list[tuple[list[str], list[str]]]:
    """(parameter names, state names) of each layer; the step counter belongs to none."""
    out: list[tuple[list[str], list[str]]] = [([], []) for _ in net.layers]
    for k in params:
        i = layer_of(k)
        if i is not None and i < len(net.layers):
            out[i][0].append(k)
    for k in state:
        i = state_layer_of(k)
        if i is not None and i < len(net.layers):
            out[i][1].append(k)
    return out


def _layer_function(program: StepProgram, i: int, pnames: list[str], snames: list[str],
                    last: bool):
    assert program.layer is not None

    def fn(t: dict[str, Tensor]) -> dict[str, Tensor]:
        params = {k: t[PARAMS + k] for k in pnames}
        state = {k: t[STATE + k] for k in snames}
        count = t[STATE + STEP]
        y1, y2, new_params, new_state, loss = program.layer(
            i, params, state, t["x1"], t["x2"], count, take_noise(t)
        )
        out = {"y1": y1, "y2": y2}
        out.update({NEW_PARAMS + k: new_params[k] for k in pnames})
        out.update({NEW_STATE + k: new_state[k] for k in snames})
        out["loss"] = loss
        if last:
            out[NEW_STATE + STEP] = count + 1
        return out

    return fn


def layer_step_graphs(
    net: NetSpec,
    rule: Any,
    opt: OptimConfig,
    params: dict[str, Tensor],
    state: dict[str, Tensor],
    batch_size: int,
    program: StepProgram | None = None,
    optimize: bool = True,
    profile: str = "plain",
) -> tuple[list[onnx.ModelProto], list[GraphIO]]:
    require_local(rule)
    check_batch(batch_size)
    program = program or fp32_program(net, rule, opt)
    if program.layer is None:
        raise EdgeError(
            f"rule {rule.name!r} needs a whole-network context for its layer updates; "
            "per-layer graphs are not available (export the whole step instead)"
        )
    if STEP not in state:
        raise EdgeError("optimizer state has no step counter 'step'")
    x = torch.zeros((batch_size, *net.in_shape), dtype=getattr(torch, program.view_dtype))
    x1, x2 = x, x.clone()  # each layer's example input is the previous layer's output
    models, ios = [], []
    for i, (pnames, snames) in enumerate(split_by_layer(net, params, state)):
        last = i == len(net.layers) - 1
        inputs = {"x1": x1, "x2": x2}
        inputs.update({PARAMS + k: params[k].detach() for k in pnames})
        inputs.update({STATE + k: state[k].detach() for k in snames})
        inputs[STATE + STEP] = state[STEP].detach()
        inputs.update(noise_inputs(tuple(
            t for t in program.noise if layer_of(t.name.split("/", 1)[1]) == i)))
        fn = _layer_function(program, i, pnames, snames, last)
        with torch.no_grad(), one_thread():
            example = fn(dict(inputs))
        outputs, x1, x2 = list(example), example["y1"], example["y2"]
        model = apply_profile(export_function(fn, inputs, outputs, optimize=optimize), profile)
        bindings = [(NEW_PARAMS + k, PARAMS + k) for k in pnames]
        bindings += [(NEW_STATE + k, STATE + k) for k in snames]
        if last:
            bindings.append((NEW_STATE + STEP, STATE + STEP))
        ios.append(GraphIO(layer_file(i), value_specs(model.graph.input),
                           value_specs(model.graph.output), tuple(bindings)))
        models.append(model)
    return models, ios
