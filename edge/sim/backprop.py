"""The backprop side of the comparison, from a real forward+backward graph (not a formula).

`joint_schedule(fn, *args, params=...)` traces `fn` - a Python callable that computes a loss
and calls `torch.autograd.grad` - with `torch.fx.experimental.proxy_tensor.make_fx`. make_fx
records below autograd, so the backward pass appears as ordinary aten ops in execution order,
including every activation autograd saved for backward. Each FX node becomes an `Op`; sizes
come from the node's `val` meta (a fake tensor: numel * element size).

Views allocate nothing: an op whose schema says its result aliases an input (`t`, `view`,
`detach`, `expand`, in-place `add_` ...) maps to the tensor it aliases, and readers of the
view keep that base tensor alive. Multi-output ops (`native_batch_norm`, ...) get one tensor
per element, named `<node>.<i>`; `getitem` nodes just select one.

Categories: the args listed in `params` are parameters, other args inputs; outputs listed in
`bindings` (output index -> arg index: a new parameter) or `grad_outputs` are update buffers,
other outputs are outputs; everything else is an activation.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten

from edge.errors import EdgeError
from edge.sim.schedule import Op, Schedule, TensorInfo

_EXTRA_VIEWS = frozenset({"_unsafe_view", "_reshape_alias", "lift_fresh", "alias"})


def _aliased_arg(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input node whose storage this node's result shares, if it is a view or in-place op."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    args = [a for a in node.args]
    ret = schema.returns[0].alias_info if schema.returns else None
    base_name = schema.name.split("::")[-1]
    if ret is None and base_name not in _EXTRA_VIEWS:
        return None
    for i, arg in enumerate(schema.arguments):
        if i >= len(args) or not isinstance(args[i], torch.fx.Node):
            continue
        info = arg.alias_info
        if ret is None or (info is not None and set(info.before_set) & set(ret.before_set)):
            return args[i]
    return None


def _tensor_info(name: str, val: Any, category: str) -> TensorInfo | None:
    if not isinstance(val, torch.Tensor):
        return None
    dtype = str(val.dtype).removeprefix("torch.")
    return TensorInfo(
        name, int(val.numel()) * val.element_size(), category, tuple(val.shape), dtype
    )


def fx_to_schedule(
    gm: torch.fx.GraphModule,
    params: Sequence[int] = (),
    bindings: Mapping[int, int] | None = None,
    grad_outputs: Sequence[int] = (),
    name: str = "joint",
) -> Schedule:
    """Convert a traced aten-level FX graph to a `Schedule` (see the module docstring)."""
    bindings = dict(bindings or {})
    tensors: dict[str, TensorInfo] = {}
    ref: dict[str, str | None] = {}  # fx node name -> tensor name it stands for (None: no tensor)
    placeholders: list[str] = []
    ops: list[Op] = []

    def resolve(n: Any) -> list[str]:
        out = []
        for leaf in tree_flatten(n)[0]:
            if isinstance(leaf, torch.fx.Node) and ref.get(leaf.name):
                out.append(ref[leaf.name])
        return out

    output_node = None
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder":
            idx = len(placeholders)
            placeholders.append(node.name)
            info = _tensor_info(node.name, val, "parameter" if idx in params else "input")
            ref[node.name] = info.name if info else None
            if info:
                tensors[info.name] = info
        elif node.op == "get_attr":
            info = _tensor_info(node.name, getattr(gm, str(node.target), None), "parameter")
            ref[node.name] = info.name if info else None
            if info:
                tensors[info.name] = info
        elif node.op == "call_function" and node.target is operator.getitem:
            base, idx = node.args[0], node.args[1]
            ref[node.name] = ref.get(f"{base.name}.{idx}")
        elif node.op == "call_function":
            ins = list(dict.fromkeys(resolve((node.args, node.kwargs))))
            alias = _aliased_arg(node)
            if alias is not None:
                ref[node.name] = ref.get(alias.name)
                for i, _ in enumerate(val if isinstance(val, list | tuple) else ()):
                    ref[f"{node.name}.{i}"] = ref.get(alias.name)
                ops.append(Op(node.name, str(node.target), tuple(ins), ()))
                continue
            outs: list[str] = []
            if isinstance(val, list | tuple):
                for i, v in enumerate(val):
                    info = _tensor_info(f"{node.name}.{i}", v, "activation")
                    ref[f"{node.name}.{i}"] = info.name if info else None
                    if info:
                        tensors[info.name] = info
                        outs.append(info.name)
                ref[node.name] = None
            else:
                info = _tensor_info(node.name, val, "activation")
                ref[node.name] = info.name if info else None
                if info:
                    tensors[info.name] = info
                    outs.append(info.name)
            ops.append(Op(node.name, str(node.target), tuple(ins), tuple(outs)))
        elif node.op == "output":
            output_node = node
        else:
            raise EdgeError(f"cannot convert FX node {node.name!r} of kind {node.op!r}")
    if output_node is None:
        raise EdgeError("traced graph has no output")

    out_leaves = tree_flatten(output_node.args[0])[0]
    outputs: list[str] = []
    bound: dict[str, str] = {}
    for i, leaf in enumerate(out_leaves):
        tname = ref.get(leaf.name) if isinstance(leaf, torch.fx.Node) else None
        if tname is None:
            continue
        outputs.append(tname)
        info = tensors[tname]
        if info.category != "activation":
            continue  # an input or parameter returned as is
        category = "update_buffer" if (i in bindings or i in grad_outputs) else "output"
        tensors[tname] = TensorInfo(tname, info.nbytes, category, info.shape, info.dtype)
        if i in bindings:
            j = bindings[i]
            if j not in params or j >= len(placeholders):
                raise EdgeError(f"binding {i} -> {j}: argument {j} is not a parameter")
            bound[tname] = placeholders[j]
    return Schedule(tuple(ops), tensors, bound, tuple(dict.fromkeys(outputs)), name=name)


def joint_schedule(
    fn: Callable[..., Any],
    *example_args: torch.Tensor,
    params: Sequence[int] = (),
    bindings: Mapping[int, int] | None = None,
    grad_outputs: Sequence[int] = (),
    name: str = "joint",
) -> Schedule:
    """Trace `fn(*example_args)` through autograd and return its joint forward+backward schedule.

    `params`: indices of the args that are parameters (they get `requires_grad`);
    `bindings`: output index -> param arg index for outputs that are new parameters;
    `grad_outputs`: indices of outputs that are gradients (update buffers, not bound).
    """
    args = []
    for i, a in enumerate(example_args):
        if not isinstance(a, torch.Tensor):
            raise EdgeError(f"joint_schedule: argument {i} is not a tensor")
        a = a.detach()
        args.append(a.requires_grad_(True) if i in params and a.is_floating_point() else a)
    try:
        gm = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*args)
    except EdgeError:
        raise
    except Exception as exc:
        msg = " ".join(str(exc).split())[:200]
        raise EdgeError(f"could not trace {getattr(fn, '__name__', fn)!r}: {msg}") from None
    return fx_to_schedule(gm, params, bindings, grad_outputs, name)
