"""Training steps as ONNX graphs: the whole step, and one graph per block.

    fp32_program(net, rule, opt) / integer_program(net, rule, plan, qparams) -> StepProgram
    step_graph(net, program, params, state, batch) -> (ModelProto, Manifest)
    block_graphs(net, program, params, state, batch) -> (list[ModelProto], list[GraphIO])

A `StepProgram` is the one step loop of `edge.step` bound to a traced executor: fp32 is
`local_step` over `TRACED`, integer mode is the same loop over the integer executor with
traceable kernels (`quant.integer`). The graphs are the traces of these functions, so they
compute what the torch step computes; the tests only confirm it.

Whole step. Inputs: every parameter (`params/<name>`) and optimizer state tensor
(`state/<name>`, the step counter included), both views `x1`, `x2` at a fixed batch size,
and `noise/<name>` random bits where the program rounds stochastically. Outputs:
`new_params/*`, `new_state/*`, `loss`, `layer_loss` (one per block). Bindings: each new_*
output feeds the input of the same name at the next step.

Per block (rules whose blocks need no whole-network context). Graph i takes block i's input
(`x1`, `x2` for block 0, which stacks the rule's streams itself; `x`, the stacked streams,
for the others), block i's parameters and optimizer state, the step counter `state/step`
(the count before this step) and its `noise/*` bits. It returns the next block's input
(`y`), the block's `new_params/*`, `new_state/*` and its `loss`; the last graph also
returns `new_state/step`. Running the graphs in order, y -> x, then applying every graph's
bindings, is exactly one whole step.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx
import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.layers import TRACED
from edge.layers.base import QT
from edge.nets import NetSpec
from edge.step import block_step, local_step
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
from export.trace import export_function, one_thread, value_specs

Tensors = dict[str, Tensor]
STEP_FILE = "train_step.onnx"
STEP = "step"
VIEWS = ("x1", "x2")
LABELS = "labels"  # int64, one per image of view 1; -1: no label (steps with a head)


@dataclass(frozen=True)
class StepProgram:
    """The traceable step: `step(params, state, x1, x2, noise)` and, if the rule's blocks
    train without a whole-network context, `block(i, params_i, state_i, x, step, noise_i)`
    with x the views (x1, x2) for block 0 and the stacked streams after."""

    name: str  # "fp32", or the integer quantization
    step: Callable
    block: Callable | None
    streams: int
    noise: tuple[TensorSpec, ...] = ()  # random-bit inputs (int32, uniform in [0, 2^16))
    view_dtype: str = "float32"
    quant: dict[str, Any] | None = None  # for the manifest; None: fp32
    optimizer: dict[str, Any] | None = None  # what the step's update really is
    head: Any = None  # an on-device head (`edge.head`): the step then takes `labels`


def require_local(rule: Any) -> Any:
    if not getattr(rule, "is_local", False):
        raise EdgeError(
            f"rule {getattr(rule, 'name', rule)!r} trains by global backprop (autograd); "
            "only local rules export as a forward training graph"
        )
    return rule


def fp32_program(net: NetSpec, rule: Any, opt: Any, head: Any = None) -> StepProgram:
    """`edge.step.local_step` over the traced executor (with an on-device head: `labels`)."""
    require_local(rule)
    rule.check(net)
    last = len(net.blocks) - 1

    def step(params, state, x1, x2, noise, labels=None):
        return local_step(net, rule, opt, params, state, x1, x2, ex=TRACED, head=head,
                          labels=labels)

    def block(i, params, state, x, count, noise, labels=None):
        x = rule.inputs(*x) if i == 0 else x
        y, p, s, loss = block_step(net, rule, opt, TRACED, i, params, state, x, None, count + 1)
        if head is not None and i == last:
            s.update(head.update(TRACED, y, labels, state))
        return y, p, s, loss

    return StepProgram("fp32", step, None if rule.needs_context else block, rule.streams,
                       optimizer={k: v for k, v in vars(opt).items()}, head=head)


def integer_program(net: NetSpec, rule: Any, plan: Any, qparams: Tensors,
                    head: Any = None) -> StepProgram:
    """The integer step (`quant.integer`) over traceable kernels; its random-bit inputs are
    the ones the step asks for (`quant.integer.noise_shapes`)."""
    from quant.integer import IntegerExecutor, IntegerUpdate, integer_forward, noise_shapes

    require_local(rule)
    form = rule.integer_form(net)
    noise = tuple(TensorSpec(NOISE + k, shape, "int32")
                  for k, shape in noise_shapes(net, form, plan, qparams).items())
    update = IntegerUpdate(plan)
    zeros = torch.zeros((plan.batch, *net.in_shape), dtype=torch.int8)
    with torch.no_grad():  # each block's output exponent (static: from the plan)
        f_out = [y.f for y in integer_forward(net, plan, qparams, zeros)]

    last = len(net.blocks) - 1

    def step(params, state, x1, x2, bits, labels=None):
        ex = IntegerExecutor(plan, bits, traced=True)
        return local_step(net, form, update, params, state, QT(x1, plan.f_in),
                          QT(x2, plan.f_in), ex=ex, noise=bits, head=head, labels=labels)

    def block(i, params, state, x, count, bits, labels=None):
        ex = IntegerExecutor(plan, bits, traced=True)
        x = form.inputs(QT(x[0], plan.f_in), QT(x[1], plan.f_in)) if i == 0 else QT(x, f_out[i - 1])
        y, p, s, loss = block_step(net, form, update, ex, i, params, state, x, None, count + 1,
                                   bits)
        if head is not None and i == last:
            s.update(head.update(ex, y, labels, state))
        return y.t, p, s, loss

    return StepProgram(plan.quant, step, None if rule.needs_context else block, 2, noise,
                       "int8", {"mode": "integer", "plan": plan.to_dict()}, update.describe(),
                       head)


_LAYER_KEY = re.compile(r"^[A-Za-z_]+\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Which block a tensor belongs to: `enc.3.1.w`, `rule.3.B`, `err.3.z` -> 3."""
    m = _LAYER_KEY.match(name)
    return int(m.group(1)) if m else None


def state_layer_of(name: str) -> int | None:
    """Optimizer state `m.enc.3.1.w` -> 3; the step counter -> None."""
    return layer_of(name.split(".", 1)[1]) if "." in name else None


def noise_inputs(specs: tuple[TensorSpec, ...]) -> Tensors:
    return {t.name: torch.zeros(t.shape, dtype=getattr(torch, t.dtype)) for t in specs}


def take_noise(t: Tensors) -> Tensors:
    """The noise/* graph inputs, keyed without the prefix."""
    return {k[len(NOISE):]: v for k, v in t.items() if k.startswith(NOISE)}


def check_batch(batch_size: int, rule: Any = None) -> None:
    lowest = getattr(rule, "min_batch", 2)  # in-batch negatives pair image i with image i+1
    if batch_size < lowest:
        raise EdgeError(f"batch size must be at least {lowest} for a contrastive step with "
                        f"in-batch negatives, got {batch_size} (or use a memory of negatives)")


def versions() -> dict[str, str]:
    import onnxruntime

    import edge
    from export.trace import OPSET

    return {
        "edge": edge.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "opset": str(OPSET),
    }


def base_manifest(net: NetSpec, rule: Any, batch_size: int, program: StepProgram,
                  step: GraphIO, target: dict[str, Any] | None = None) -> Manifest:
    return Manifest(
        step=step, rule=rule.name, hparams=rule.hparams(), optimizer=program.optimizer or {},
        net=net.to_dict(), batch_size=batch_size, versions=versions(), quant=program.quant,
        target=target, noise={"low": 0, "high": 1 << 16} if program.noise else None,
    )


def step_graph(
    net: NetSpec,
    rule: Any,
    program: StepProgram,
    params: Tensors,
    state: Tensors,
    batch_size: int,
    target: dict[str, Any] | None = None,
    optimize: bool = True,
    profile: str = "plain",
) -> tuple[onnx.ModelProto, Manifest]:
    """One whole training step as an ONNX model and its manifest."""
    check_batch(batch_size, getattr(rule, 'rule', rule))
    pnames, snames = list(params), list(state)
    inputs = {PARAMS + k: v.detach() for k, v in params.items()}
    inputs.update({STATE + k: v.detach() for k, v in state.items()})
    view = torch.zeros((batch_size, *net.in_shape), dtype=getattr(torch, program.view_dtype))
    inputs.update({name: view.clone() for name in VIEWS})
    if program.head is not None:
        inputs[LABELS] = torch.zeros(batch_size, dtype=torch.int64)
    inputs.update(noise_inputs(program.noise))

    def fn(t: Tensors) -> Tensors:
        p = {k: t[PARAMS + k] for k in pnames}
        s = {k: t[STATE + k] for k in snames}
        extra = {"labels": t[LABELS]} if program.head is not None else {}
        new_p, new_s, metrics = program.step(p, s, t["x1"], t["x2"], take_noise(t), **extra)
        out = {NEW_PARAMS + k: new_p[k] for k in pnames}
        out.update({NEW_STATE + k: new_s[k] for k in snames})
        out.update(metrics)
        return out

    with torch.no_grad(), one_thread():
        outputs = list(fn(dict(inputs)))  # eager once: which outputs, and that it runs at all
    model = apply_profile(export_function(fn, inputs, outputs, optimize=optimize), profile)
    bindings = [(NEW_PARAMS + k, PARAMS + k) for k in pnames]
    bindings += [(NEW_STATE + k, STATE + k) for k in snames]
    io = GraphIO(STEP_FILE, value_specs(model.graph.input), value_specs(model.graph.output),
                 tuple(bindings))
    return model, base_manifest(net, rule, batch_size, program, io, target)


def layer_file(i: int) -> str:
    return f"layers/layer_{i}.onnx"


def split_by_block(net: NetSpec, names: list[str], of: Callable) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in net.blocks]
    for k in names:
        i = of(k)
        if i is not None and i < len(net.blocks):
            out[i].append(k)
    return out


def block_graphs(
    net: NetSpec,
    rule: Any,
    program: StepProgram,
    params: Tensors,
    state: Tensors,
    batch_size: int,
    optimize: bool = True,
    profile: str = "plain",
) -> tuple[list[onnx.ModelProto], list[GraphIO]]:
    check_batch(batch_size, getattr(rule, 'rule', rule))
    if program.block is None:
        raise EdgeError(
            f"rule {rule.name!r} needs a whole-network context for its layer updates; "
            "per-layer graphs are not available (export the whole step instead)"
        )
    if STEP not in state:
        raise EdgeError("optimizer state has no step counter 'step'")
    pnames = split_by_block(net, list(params), layer_of)
    snames = split_by_block(net, [k for k in state if k != STEP], state_layer_of)
    snames[-1] += [k for k in state if k.startswith("head.")]  # the head trains at the top
    view = torch.zeros((batch_size, *net.in_shape), dtype=getattr(torch, program.view_dtype))
    x: Tensor | None = None
    models, ios = [], []
    for i in range(len(net.blocks)):
        last = i == len(net.blocks) - 1
        inputs = {"x1": view, "x2": view.clone()} if i == 0 else {"x": x}
        inputs.update({PARAMS + k: params[k].detach() for k in pnames[i]})
        inputs.update({STATE + k: state[k].detach() for k in snames[i]})
        inputs[STATE + STEP] = state[STEP].detach()
        if last and program.head is not None:
            inputs[LABELS] = torch.zeros(batch_size, dtype=torch.int64)
        inputs.update(noise_inputs(tuple(
            t for t in program.noise if layer_of(t.name[len(NOISE):]) == i)))
        fn = _block_function(program, i, pnames[i], snames[i], last)
        with torch.no_grad(), one_thread():
            example = fn(dict(inputs))
        outputs, x = list(example), example["y"]
        model = apply_profile(export_function(fn, inputs, outputs, optimize=optimize), profile)
        bindings = [(NEW_PARAMS + k, PARAMS + k) for k in pnames[i]]
        bindings += [(NEW_STATE + k, STATE + k) for k in snames[i]]
        if last:
            bindings.append((NEW_STATE + STEP, STATE + STEP))
        ios.append(GraphIO(layer_file(i), value_specs(model.graph.input),
                           value_specs(model.graph.output), tuple(bindings)))
        models.append(model)
    return models, ios


def _block_function(program: StepProgram, i: int, pnames: list[str], snames: list[str],
                    last: bool) -> Callable:
    def fn(t: Tensors) -> Tensors:
        p = {k: t[PARAMS + k] for k in pnames}
        s = {k: t[STATE + k] for k in snames}
        count = t[STATE + STEP]
        x = (t["x1"], t["x2"]) if i == 0 else t["x"]
        extra = {"labels": t[LABELS]} if LABELS in t else {}
        y, new_p, new_s, loss = program.block(i, p, s, x, count, take_noise(t), **extra)
        out = {"y": y}
        out.update({NEW_PARAMS + k: new_p[k] for k in pnames})
        out.update({NEW_STATE + k: new_s[k] for k in snames})
        out["loss"] = loss
        if last:
            out[NEW_STATE + STEP] = count + 1
        return out

    return fn
