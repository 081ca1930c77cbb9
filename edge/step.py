"""One training step as a pure function: (params, state, views) -> (params', state', metrics).

For a local rule the step is one loop over blocks, and `block_step` is its body: block i runs
its forward on the stacked streams (both views as one batch, plus any stream the rule adds),
the rule gives dL/dy at the block's output in closed form, the block's closed-form adjoint
turns it into parameter gradients (over row chunks of at most `ex.chunk_rows`, so only one
chunk's full-size error maps live at a time), the optimizer applies them, and only the
block's output (the next block's input) survives the iteration: the working set of one block
is all a step ever holds, whatever the depth.

Batching (the plain eager executor, `chunk_rows` None). A block holds its input, output and
dL/dy for all rows whatever it does (the rule couples the rows); what row chunks bound are
its full-size intermediate maps (a conv's output before the pool, the routed error). So each
block runs forward and adjoint over the fewest row chunks that keep its largest intermediate
map within a quarter of the physical floor's working set (the largest block's input and
pre-activation output for all rows; a power of two of chunks), and within an eighth in the
block that sets the floor (its whole-batch input is already the largest, so its chunks must
be smaller for it not to set the peak: VGG-6's second block), the block output stacked
after: the big early blocks in a few chunks, the rest as single calls (fewer, larger
kernels). Other executors run the
forward on all rows and the adjoint over chunks of `ex.chunk_rows` rows, by default one
view's rows; an explicit `chunk_rows` gives the eager executor that policy too.

This loop is the only one. The executor says how it runs: eager torch (`EAGER`), traced for
ONNX (`TRACED`: the whole-step and per-block graphs trace these functions), quantization-
aware (`quant.qat`), or integer (`quant.integer`: the rule's integer form, integer updates).
The optimizer is anything with `update(name, p, g, state, step, noise)` (`edge.optim`, or
integer mode's stochastic power-of-two steps). No autograd, no module state, no branching on
tensor values.
"""

from __future__ import annotations

import functools
import math
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


def _maps(block: Any, shape: tuple[int, ...]) -> list[int]:
    """Per sample, the sizes (numbers) of a block's input and every intermediate map."""
    sizes = [math.prod(shape)]
    for chain in (block.body, block.shortcut or ()):
        s = shape
        for prim in chain:
            s = prim.out_shape(s)
            sizes.append(math.prod(s))
    s = block.out_shape(shape)
    for prim in block.post:
        s = prim.out_shape(s)
        sizes.append(math.prod(s))
    return sizes


@functools.lru_cache(maxsize=64)
def row_chunks(net: NetSpec, rows: int) -> tuple[int, ...]:
    """How many row chunks each block runs in under the plain eager executor: the fewest,
    as a power of two (equal chunks, aligned with the views), that keep its largest
    intermediate map within a quarter of the floor's working set, the max over blocks of
    input + largest map, all rows, and within an eighth in the block that sets it (module
    docstring); at most `rows`."""
    maps = [_maps(b, s) for b, s in zip(net.blocks, net.block_inputs(), strict=True)]
    sets = [m[0] + max(m[1:]) for m in maps]
    floor = max(sets)
    setter = sets.index(floor)
    out = []
    for j, m in enumerate(maps):
        share = 8 if j == setter else 4
        c = 1
        while c * floor < share * max(m[1:]) and 2 * c <= rows:
            c *= 2
        out.append(c)
    return tuple(out)


def _rebind(saved: Any, old: Tensor, new: Tensor) -> Any:
    """`saved` with every reference to `old` (a chunk's block output) replaced by `new`
    (its rows of the stacked output), so the chunk's own copy can die."""
    if saved is old:
        return new
    if isinstance(saved, dict):
        return {k: _rebind(v, old, new) for k, v in saved.items()}
    if isinstance(saved, list | tuple) and not isinstance(saved, Tensor):
        return type(saved)(_rebind(v, old, new) for v in saved)
    return saved


def _streamed(net: NetSpec, rule: Any, ex, i: int, params: Tensors, state: Tensors, x: Tensor,
              ctx: Any, chunks: int) -> tuple[Tensor, Tensor, dict, Tensors]:
    """Block i's forward and adjoint over `chunks` row chunks, one at a time (the rule's
    gradient at the stacked output in between): -> (y, loss, gradients, rule state)."""
    block = net.blocks[i]
    rows = int(x.shape[0])
    step = -(-rows // chunks)
    spans = [(a, min(rows, a + step)) for a in range(0, rows, step)]
    parts = [block.forward(ex, i, params, x[a:b]) for a, b in spans]
    y = torch.cat([yc for yc, _ in parts])
    saved = [_rebind(sc, yc, y[a:b]) for (yc, sc), (a, b) in zip(parts, spans, strict=True)]
    del parts
    loss, gy, grads, rule_state = rule.output_grads(i, ex, y, params, ctx, state)
    for sc, (a, b) in zip(saved, spans, strict=True):
        for k, v in block.adjoint(ex, i, params, sc, gy[a:b]).items():
            grads[k] = grads[k] + v if k in grads else v
    return y, loss, grads, rule_state


def block_step(
    net: NetSpec, rule: Any, opt: Any, ex, i: int, params: Tensors, state: Tensors, x: Any,
    ctx: Any, step: Tensor, noise: Tensors | None = None,
) -> tuple[Any, Tensors, Tensors, Tensor]:
    """Block i of `local_step` (its loop body): -> (next input, block i's new parameters and
    optimizer state, block i's loss). `params`/`state` need hold only block i's tensors and
    the rule's context inputs; `step` is the 1-based step count. Rows are batched as the
    module docstring says: the plain eager executor streams only the largest blocks; the
    others run the adjoint over chunks of `ex.chunk_rows` rows, by default one view's rows
    (a batch of N images per view: N rows)."""
    plain = not (ex.traced or ex.quantized or ex.chunk_rows)
    chunks = row_chunks(net, int(x.shape[0]))[i] if plain else 1
    if chunks > 1:
        y, loss, grads, rule_state = _streamed(net, rule, ex, i, params, state, x, ctx, chunks)
    else:
        y, saved = net.blocks[i].forward(ex, i, params, x)
        loss, gy, grads, rule_state = rule.output_grads(i, ex, y, params, ctx, state)
        rows = int((y.t if ex.integer else y).shape[0])
        chunk = rows if plain else rows // rule.streams
        grads.update(block_grads(net, ex, i, params, saved, gy, chunk))
        del saved, gy
    new_params, new_state = {}, dict(rule_state)
    update = opt.update if ex.traced else getattr(opt, "update_eager", opt.update)
    for name, g in grads.items():
        new_params[name], upd = update(name, params[name], g, state, step, noise)
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
