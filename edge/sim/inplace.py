"""Which bound outputs may overwrite their parameter in place.

A training step emits a new parameter W' bound to its input W (`Schedule.bindings`). Keeping
both costs an extra |W'| bytes until the runtime swaps them. W' may instead be written into
W's storage when W is dead by the time W' is written:

* W's last reader runs strictly before the op that writes W', or
* the op that writes W' is W's last reader and is elementwise (Sub, Add, Mul, aten.sub, ...):
  each output element depends only on the same element of W, so overwriting W as you go is safe
  (the classic `W -= lr * dW`).

Also required: W' is no larger than W, W is not itself a graph output, and at most one output
takes any W. Tensors that qualify cost no extra bytes; `planner.schedule_buffers` folds them in.
"""

from __future__ import annotations

from edge.sim.schedule import Schedule

ELEMENTWISE = frozenset(
    {
        "abs",
        "add",
        "addcdiv",
        "addcmul",
        "clamp",
        "clip",
        "copy",
        "div",
        "exp",
        "identity",
        "lerp",
        "maximum",
        "minimum",
        "mul",
        "neg",
        "pow",
        "relu",
        "rsqrt",
        "sigmoid",
        "sign",
        "sqrt",
        "sub",
        "tanh",
        "where",
        "foreach_add",
        "foreach_sub",
        "cast",
        "to_copy",
    }
)


def base_op_type(op_type: str) -> str:
    """Normalize 'aten.sub.Tensor', 'aten::sub_', 'Sub' and '_foreach_add' to 'sub' style names."""
    name = op_type.replace("::", ".")
    parts = name.split(".")
    if parts[0] in ("aten", "prims", "torch", "ai", "onnx") and len(parts) > 1:
        name = parts[1]
    else:
        name = parts[-1] if len(parts) > 1 and parts[0] == "" else parts[0]
    return name.strip("_").lower()


def inplace_bindings(schedule: Schedule) -> dict[str, str]:
    """Bound outputs (new -> old) that may reuse the old tensor's storage; see module docstring."""
    taken: set[str] = set()
    result: dict[str, str] = {}
    outputs = set(schedule.outputs)
    for new, old in schedule.bindings.items():
        if old in taken or old in outputs:
            continue
        if schedule.tensors[new].nbytes > schedule.tensors[old].nbytes:
            continue
        step = schedule.producer[new]
        last = schedule.last_reader.get(old, -1)
        if last > step:
            continue
        if last == step:
            op = schedule.ops[step]
            if base_op_type(op.op_type) not in ELEMENTWISE or len(op.outputs) != 1:
                continue
        result[new] = old
        taken.add(old)
    return result
