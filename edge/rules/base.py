"""The contract every local rule fulfils, and the code pooling the CLAPP family shares.

A local rule sees one block at a time. The step (`edge.step`) stacks the streams of a batch
into one tensor (`inputs`: view 1 rows, then view 2 rows, then any stream the rule adds, e.g.
Forward-Forward's negatives), runs the block forward on it, and asks the rule for the
gradient of its block-local loss at the block's output y (`output_grads`); the block's own
closed-form adjoint turns that into parameter gradients. So a rule never touches a layer's
internals, and no activation outlives its block.

    check(net)                       EdgeError if the rule cannot apply
    init(net, gen) -> params         the rule's own trainable parameters (`rule.{i}.*`)
    inputs(x1, x2) -> x              the stacked streams the step runs (default: both views)
    context(net, ex, params, x)      what the block updates need from a forward pass first
    output_grads(i, ex, y, params, ctx, state) -> (loss, dL/dy, {rule param: gradient},
                                     {rule state: its new value})
    init_state(net) -> {name: Tensor}  the rule's own step state (e.g. a memory of past codes
                                     for negatives), carried like the optimizer's
    next_input(i, y)                 what block i hands block i+1 (default: y)
    layer_loss(i, y, params, ctx)    the same loss as a differentiable expression (tests
                                     check the closed form against autograd of it)
A rule with an integer form also gives `integer_form(net)` (see `edge.rules.hinge`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.layers import AvgPool, GlobalAvgPool
from edge.layers.base import QT
from edge.nets import NetSpec


class LocalRule:
    """Base class: subclasses set the class attributes and implement `init`, `output_grads`
    and `layer_loss`."""

    name: ClassVar[str]
    description: ClassVar[str]
    memory: ClassVar[str]  # what one block's update must hold
    is_local: ClassVar[bool] = True
    streams: ClassVar[int] = 2  # rows of the stacked batch per image
    # AdamW. At 1e-3 the hinge rules collapse the deeper layers within an epoch (Adam moves
    # every weight by ~lr per step, and the upper layers' weights are only ~0.06: most units
    # die); 3e-4 learns without collapse (MNIST, see benchmarks/mnist_rules.py).
    default_lr: ClassVar[float] = 3e-4

    @property
    def needs_context(self) -> bool:
        """Whether block updates read a whole-network forward pass (`context`): such rules
        train no block on its own (no per-block graphs)."""
        return False

    def check(self, net: NetSpec) -> None:
        """Raise EdgeError if the rule cannot apply to `net`."""

    def init(self, net: NetSpec, gen: torch.Generator) -> dict[str, Tensor]:
        raise NotImplementedError

    def inputs(self, x1: Tensor, x2: Tensor) -> Tensor:
        return torch.cat((x1, x2))

    def context(self, net: NetSpec, ex, params: dict[str, Tensor], x: Tensor) -> Any:
        return None

    def output_grads(
        self, i: int, ex, y: Tensor, params: dict[str, Tensor], ctx: Any,
        state: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        raise NotImplementedError

    def init_state(self, net: NetSpec) -> dict[str, Tensor]:
        return {}

    @property
    def min_batch(self) -> int:
        """The smallest batch the rule's negatives allow."""
        return 2

    def next_input(self, i: int, y: Tensor) -> Tensor:
        return y

    def layer_loss(self, i: int, y: Tensor, params: dict[str, Tensor], ctx: Any,
                   state: dict[str, Tensor] | None = None) -> Tensor:
        raise NotImplementedError

    def hparams(self) -> dict[str, Any]:
        return {}


def pool_kernel(k: int | None, shape: tuple[int, ...], i: int) -> int:
    """Average-pool kernel for block i's output `shape` (C, H, W).

    The default is the paper's reference grid on CIFAR-10's VGG-6 (maps of side 32, 16, 16,
    8, 4, 2 pooled by 4, 4, 4, 2, 2, 1), extended to any map: kernel 4 on sides of 16 or more
    (but at least side/8, so no code is finer than 8x8 and the predictor stays device-sized
    on larger images), 2 on sides 4-15, 1 below. A coarser ~2x2 code (edge's first default)
    left CLAPP++ below the untrained encoder on CIFAR-10 (benchmarks/results/ablation).
    """
    if len(shape) == 1:
        return 1
    h, w = shape[1], shape[2]
    if k is None:
        side = min(h, w)
        return max(4, -(-side // 8)) if side >= 16 else 2 if side >= 4 else 1
    if isinstance(k, bool) or not isinstance(k, int):
        raise EdgeError(f"pooling kernel of layer {i} must be an integer, got {k!r}")
    if k < 1 or k > min(h, w):
        raise EdgeError(
            f"pooling kernel {k} does not fit layer {i}'s {h}x{w} output; use 1..{min(h, w)}"
        )
    return k


class Code:
    """The pooled code z of a block output, flattened: k x k non-overlapping averages
    (floor crop) of a (C, H, W) map, the global average (`k=None` on a map), or a flat output
    as it is. Forward and adjoint in float and integer form are the pooling primitives'."""

    def __init__(self, shape: tuple[int, ...], k: int | None):
        self.pool = None
        if len(shape) == 3:
            self.pool = GlobalAvgPool() if k is None else (AvgPool(k) if k > 1 else None)
        self.shape = shape if self.pool is None else self.pool.out_shape(shape)

    @property
    def dim(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def forward(self, ex, y: Tensor) -> tuple[Tensor, Any]:
        z, s = (y, None) if self.pool is None else self.pool.forward(ex, {}, y)
        return z.flatten(1), (s, z.shape)

    def adjoint(self, ex, saved, gz: Tensor) -> Tensor:
        s, zshape = saved
        gz = gz.reshape(zshape)
        return gz if self.pool is None else self.pool.adjoint(ex, {}, s, gz, True)[1]

    def int_forward(self, ex, y: QT) -> tuple[QT, Any]:
        z, s = (y, None) if self.pool is None else self.pool.int_forward(ex, "", {}, y)
        return QT(z.t.flatten(1), z.f), (s, z.t.shape)

    def int_adjoint(self, ex, saved, gz: QT) -> QT:
        s, zshape = saved
        gz = QT(gz.t.reshape(zshape), gz.f, gz.c)
        return gz if self.pool is None else self.pool.int_adjoint(ex, "", {}, s, gz, True)[1]
