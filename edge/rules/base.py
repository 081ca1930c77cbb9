"""The contract every local rule fulfils, and the pooling helpers they share.

A local rule sees one layer at a time: that layer's input, its own activations for both
views, its own parameters and (for direct-feedback rules) a context computed by a forward
pass. It returns the gradients of its layer-local loss in closed form; the optimizer applies
them before the next layer runs, so no activation outlives its layer (see `edge.step`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from edge.errors import EdgeError
from edge.nets import LayerOut, LayerSpec, NetSpec


class LocalRule:
    """Base class: subclasses set the class attributes and implement `init` and `layer_grads`."""

    name: ClassVar[str]
    description: ClassVar[str]
    memory: ClassVar[str]  # what one layer's update must hold
    is_local: ClassVar[bool] = True
    # AdamW. At 1e-3 the hinge rules collapse the deeper layers within an epoch (Adam moves
    # every weight by ~lr per step, and the upper layers' weights are only ~0.06: most units
    # die); 3e-4 learns without collapse (MNIST, see benchmarks/mnist_rules.py).
    default_lr: ClassVar[float] = 3e-4

    def check(self, net: NetSpec) -> None:
        """Raise EdgeError if the rule cannot apply to `net`."""

    def init(self, net: NetSpec, gen: torch.Generator) -> dict[str, Tensor]:
        """The rule's own trainable parameters (e.g. the predictors B), keyed `rule.{i}.*`."""
        raise NotImplementedError

    def context(self, net: NetSpec, params: dict[str, Tensor], x1: Tensor, x2: Tensor) -> Any:
        """Anything the layer updates need from a forward pass before the step (default none)."""
        return None

    def layer_grads(
        self,
        i: int,
        layer: LayerSpec,
        o1: LayerOut,
        o2: LayerOut,
        params: dict[str, Tensor],
        ctx: Any,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Closed-form gradients of layer i's loss (keyed by parameter name) and that loss."""
        raise NotImplementedError

    def layer_loss(
        self, i: int, y1: Tensor, y2: Tensor, params: dict[str, Tensor], ctx: Any
    ) -> Tensor:
        """The same loss as a differentiable expression of the layer outputs (tests check the
        closed form against autograd of this)."""
        raise NotImplementedError

    def next_input(self, i: int, y: Tensor) -> Tensor:
        """What layer i hands to layer i+1, given its output `y` (default: `y` unchanged).
        Forward-Forward length-normalises here so the next layer cannot just read goodness."""
        return y

    def next_context(self, i: int, params: dict[str, Tensor], ctx: Any) -> Any:
        """The context layer i+1 sees, once layer i is done (default: the same context).
        Forward-Forward pushes its negative samples one layer up here. `params` are the
        step's incoming parameters, the same ones the views are forwarded with."""
        return ctx

    def hparams(self) -> dict[str, Any]:
        return {}


def pool_kernel(k: int | None, shape: tuple[int, ...], i: int) -> int:
    """Average-pool kernel for layer i's output `shape` (C, H, W): default gives about 2x2."""
    if len(shape) == 1:
        return 1
    h, w = shape[1], shape[2]
    if k is None:
        return max(1, min(h, w) // 2)
    if k < 1 or k > min(h, w):
        raise EdgeError(
            f"pooling kernel {k} does not fit layer {i}'s {h}x{w} output; use 1..{min(h, w)}"
        )
    return k


def avg_pool(y: Tensor, k: int) -> Tensor:
    """(N, C, H, W) -> (N, C*H'*W') by non-overlapping k x k averages; (N, F) stays."""
    if y.dim() == 2:
        return y
    return F.avg_pool2d(y, k).flatten(1) if k > 1 else y.flatten(1)


def avg_pool_backward(gp: Tensor, y_shape: torch.Size, k: int) -> Tensor:
    """Adjoint of `avg_pool`: spread each pooled gradient evenly over its k x k window."""
    if len(y_shape) == 2:
        return gp
    n, c, h, w = y_shape
    hp, wp = h // k, w // k
    g = gp.view(n, c, hp, wp)
    if k > 1:
        g = g.repeat_interleave(k, 2).repeat_interleave(k, 3) / (k * k)
    if g.shape[2] != h or g.shape[3] != w:  # cells cropped by the floor in avg_pool2d
        g = F.pad(g, (0, w - g.shape[3], 0, h - g.shape[2]))
    return g
