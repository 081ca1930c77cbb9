"""Optimizers as pure functions: (param, grad, state) -> (param', state').

No `torch.optim`: a local rule updates one layer at a time from gradients it computed in
closed form, and the exporter traces the same arithmetic into ONNX. State tensors are named
`"{kind}.{param}"` (`m.` momentum / first moment, `v.` second moment) plus one step counter
`"step"`, so a checkpoint or a graph input list is just a flat dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from edge.errors import EdgeError

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise EdgeError(f"unknown optimizer {self.name!r}; valid: {', '.join(OPTIMIZERS)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise EdgeError(f"learning rate must be a positive finite number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise EdgeError(f"weight decay must be >= 0 and finite, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise EdgeError(f"momentum must be in [0, 1), got {self.momentum}")

    def init_state(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {"step": torch.zeros((), dtype=torch.float32)}
        for k, p in params.items():
            state[f"m.{k}"] = torch.zeros_like(p)
            if self.name == "adamw":
                state[f"v.{k}"] = torch.zeros_like(p)
        return state

    def update(
        self, name: str, p: Tensor, g: Tensor, state: dict[str, Tensor], step: Tensor,
        noise: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One update of parameter `name`; `step` is the 1-based step count (a tensor).
        `noise` is unused (float updates round deterministically)."""
        m = state[f"m.{name}"]
        if self.name == "sgd":
            g = g + self.weight_decay * p
            m = self.momentum * m + g
            return p - self.lr * m, {f"m.{name}": m}
        b1, b2 = self.betas
        v = state[f"v.{name}"]
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**step)
        v_hat = v / (1 - b2**step)
        p = p * (1 - self.lr * self.weight_decay)
        p = p - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        return p, {f"m.{name}": m, f"v.{name}": v}

    def update_eager(
        self, name: str, p: Tensor, g: Tensor, state: dict[str, Tensor], step: Tensor,
        noise: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """`update` for the eager loop: AdamW's arithmetic as one fused aten kernel (copies of
        p, m, v updated in place: the inputs are not modified) instead of some twenty small
        ops, which dominate a step at small batches. Same formula, equal to float rounding;
        it does not trace to ONNX, so traced steps call `update`."""
        fused = getattr(torch, "_fused_adamw_", None)
        if self.name != "adamw" or fused is None:
            return self.update(name, p, g, state, step, noise)
        p, m, v = p.clone(), state[f"m.{name}"].clone(), state[f"v.{name}"].clone()
        b1, b2 = self.betas
        fused([p], [g.contiguous()], [m], [v], [], [step], lr=self.lr, beta1=b1, beta2=b2,
              weight_decay=self.weight_decay, eps=self.eps, amsgrad=False, maximize=False)
        return p, {f"m.{name}": m, f"v.{name}": v}
