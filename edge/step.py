"""One training step as a pure function: (params, state, views) -> (params', state', metrics).

For a local rule the step is one loop over blocks, and `block_step` is its body: block i runs
its forward on the stacked streams (both views as one batch, plus any stream the rule adds),
the rule gives dL/dy at the block's output in closed form, the block's closed-form adjoint
turns it into parameter gradients (over row chunks of at most `ex.chunk_rows`, so only one
chunk's full-size error maps live at a time), the optimizer applies them, and only the
block's output (the next block's input) survives the iteration: the working set of one block
is all a step ever holds, whatever the depth.

This loop is the only one. The executor says how it runs: eager torch (`EAGER`), traced for
ONNX (`TRACED`: the whole-step and per-block graphs trace these functions), quantization-
aware (`quant.qat`), or integer (`quant.integer`: the rule's integer form, integer updates).
The optimizer is anything with `update(name, p, g, state, step, noise)` (`edge.optim`, or
integer mode's stochastic power-of-two steps). No autograd, no module state, no branching on
tensor values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from edge.layers import EAGER
from edge.nets import NetSpec
from edge.nets.block import take_rows

Metrics = dict[str, Tensor]
Tensors = dict[str, Tensor]


def block_grads(net: NetSpec, ex, i: int, params: Tensors, saved: Any, g: Any,
                chunk: int | None = None) -> dict:
    """Block i's parameter gradients from dL/dy, summed over row chunks of `ex.chunk_rows`
    (else `chunk`, else all rows at once)."""
    block = net.blocks[i]
    rows = int((g.t if ex.integer else g).shape[0])
    chunk = ex.chunk_rows or chunk or rows
    if chunk >= rows:
        return block.adjoint(ex, i, params, saved, g)
    total: dict = {}
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        part = block.adjoint(ex, i, params, take_rows(saved, start, stop),
                             take_rows(g, start, stop))
        for k, v in part.items():
            total[k] = v if k not in total else _add(total[k], v)
    return total


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, Tensor):
        return a + b
    from edge.layers.base import QT

    return QT(a.t + b.t, a.f, a.c)  # the same exponent: integer sums, saturated at the update


def block_step(
    net: NetSpec, rule: Any, opt: Any, ex, i: int, params: Tensors, state: Tensors, x: Any,
    ctx: Any, step: Tensor, noise: Tensors | None = None,
) -> tuple[Any, Tensors, Tensors, Tensor]:
    """Block i of `local_step` (its loop body): -> (next input, block i's new parameters and
    optimizer state, block i's loss). `params`/`state` need hold only block i's tensors and
    the rule's context inputs; `step` is the 1-based step count. The adjoint runs over
    chunks of `ex.chunk_rows` rows, by default one view's rows (a batch of N images per
    view: N rows), so only one view's full-size error maps live at a time."""
    y, saved = net.blocks[i].forward(ex, i, params, x)
    loss, gy, grads, rule_state = rule.output_grads(i, ex, y, params, ctx, state)
    rows = int((y.t if ex.integer else y).shape[0])
    grads.update(block_grads(net, ex, i, params, saved, gy, rows // rule.streams))
    del saved, gy
    new_params, new_state = {}, dict(rule_state)
    for name, g in grads.items():
        new_params[name], upd = opt.update(name, params[name], g, state, step, noise)
        new_state.update(upd)
    return rule.next_input(i, y), new_params, new_state, loss


def local_step(
    net: NetSpec,
    rule: Any,
    opt: Any,
    params: Tensors,
    state: Tensors,
    x1: Any,
    x2: Any,
    ex=EAGER,
    noise: Tensors | None = None,
    donate: bool = False,
    head: Any = None,
    labels: Tensor | None = None,
) -> tuple[Tensors, Tensors, Metrics]:
    """`donate=True` hands `params` and `state` over: they are updated in place entry by
    entry, so each block's old tensors die as soon as its new ones exist (as on a device
    that writes updates over the old weights); the caller must not reuse them. `head`
    (`edge.head.PrototypeHead`) learns from `labels` (-1: none) on the top block's output."""
    step = state["step"] + 1
    new_params, new_state = (params, state) if donate else (dict(params), dict(state))
    x = rule.inputs(x1, x2)
    ctx = rule.context(net, ex, params, x)
    losses = []
    incoming = params if not donate else dict(params)  # the context reads the old weights
    for i in range(len(net.blocks)):
        x, p, s, loss = block_step(net, rule, opt, ex, i, incoming, state, x, ctx, step, noise)
        new_params.update(p)
        new_state.update(s)
        if donate:
            incoming.update(p)  # block i is done: later blocks read only their own weights
        losses.append(loss)
    if head is not None:
        new_state.update(head.update(ex, x, labels, state))
    new_state["step"] = step
    layer_loss = torch.stack(losses)
    return new_params, new_state, {"loss": layer_loss.sum(), "layer_loss": layer_loss}


def init_state(net: NetSpec, rule: Any, opt: Any, params: Tensors) -> Tensors:
    """A run's first step state: the optimizer's (with the step counter) and the rule's."""
    state = opt.init_state(params)
    if rule.is_local:  # global baselines carry no state of their own
        state.update(rule.init_state(net))
    return state


def train_step(
    net: NetSpec,
    rule,
    opt,
    params: Tensors,
    state: Tensors,
    x1: Tensor,
    x2: Tensor,
    donate: bool = False,
    head: Any = None,
    labels: Tensor | None = None,
) -> tuple[Tensors, Tensors, Metrics]:
    """The step of any rule: closed-form block-local for local rules, autograd for baselines."""
    if rule.is_local:
        return local_step(net, rule, opt, params, state, x1, x2, donate=donate, head=head,
                          labels=labels)
    from edge.baselines.step import bp_step

    return bp_step(net, rule, opt, params, state, x1, x2)
