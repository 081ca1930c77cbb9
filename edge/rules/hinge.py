"""The contrastive bilinear hinge shared by the CLAPP family, with its closed-form gradients.

Anchor z (what the layer outputs for one view) predicts context c (the other view, detached)
through a bilinear score u = z^T B c. Positive pair: the two views of image i. Negative: the
anchor of image i against the context of image i+1 (mod N). Both views serve as anchor:

    L = 1/(2N) sum_i [ relu(1 - z1_i^T B c2_i) + relu(1 + z1_i^T B c2_{i+1})
                     + relu(1 - z2_i^T B c1_i) + relu(1 + z2_i^T B c1_{i+1}) ]

Three factors make the update: the per-sample modulator m = dL/du (a step function of the
score: -1/(2N) while a positive scores below 1, +1/(2N) while a negative scores above -1), the
prediction B c, and the Hebbian outer product:

    dL/dz_i = sum_terms m * B c          dL/dB = sum_terms m * z c^T

B is either `full` (D x Dc) or low rank B = U V^T (U: D x r, V: Dc x r), whose gradients are
dL/dU = (dL/dB) V and dL/dV = (dL/dB)^T U, computed without forming dL/dB.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def predictor_keys(kind: str) -> tuple[str, ...]:
    return ("B",) if kind == "full" else ("U", "V")


def choose_kind(kind: str, d: int, dc: int, rank: int) -> str:
    """`auto`: low rank when that is smaller than the full matrix."""
    if kind != "auto":
        return kind
    return "lowrank" if rank * (d + dc) < d * dc else "full"


def init_predictor(
    kind: str, d: int, dc: int, rank: int, gen: torch.Generator
) -> dict[str, Tensor]:
    """Scores start near +-1 for O(1) activations: B entries have std 1/sqrt(d * dc)."""
    if kind == "full":
        return {"B": torch.randn(d, dc, generator=gen) / math.sqrt(d * dc)}
    s = (d * dc * rank) ** -0.25
    return {
        "U": torch.randn(d, rank, generator=gen) * s,
        "V": torch.randn(dc, rank, generator=gen) * s,
    }


def predict(P: dict[str, Tensor], c: Tensor) -> Tensor:
    """B c for every row of c: (N, Dc) -> (N, D)."""
    if "B" in P:
        return c @ P["B"].t()
    return (c @ P["V"]) @ P["U"].t()


def _pairs(z1: Tensor, z2: Tensor, q1: Tensor, q2: Tensor):
    """(anchor, prediction) for the four terms: pos/neg for each view as anchor."""
    return (
        (z1, q2, 1.0),
        (z1, torch.roll(q2, -1, 0), -1.0),
        (z2, q1, 1.0),
        (z2, torch.roll(q1, -1, 0), -1.0),
    )


def hinge_loss(z1: Tensor, z2: Tensor, c1: Tensor, c2: Tensor, P: dict[str, Tensor]) -> Tensor:
    """The loss as a plain expression (differentiable; the reference for the closed form)."""
    q1, q2 = predict(P, c1), predict(P, c2)
    n = z1.shape[0]
    total = sum(F.relu(1 - sign * (z * q).sum(1)).sum() for z, q, sign in _pairs(z1, z2, q1, q2))
    return total / (2 * n)


def hinge_grads(
    z1: Tensor, z2: Tensor, c1: Tensor, c2: Tensor, P: dict[str, Tensor]
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """Loss, dL/dz1, dL/dz2 and dL/dP in closed form."""
    q1, q2 = predict(P, c1), predict(P, c2)
    n = z1.shape[0]
    s = 1.0 / (2 * n)
    loss = z1.new_zeros(())
    gz = [torch.zeros_like(z1), torch.zeros_like(z2)]
    anchors, contexts = [], []
    ctx_of = ((c2, 0), (torch.roll(c2, -1, 0), 0), (c1, 1), (torch.roll(c1, -1, 0), 1))
    for (z, q, sign), (c, view) in zip(_pairs(z1, z2, q1, q2), ctx_of, strict=True):
        margin = 1 - sign * (z * q).sum(1)
        loss = loss + F.relu(margin).sum() * s
        m = -sign * s * (margin > 0).to(z.dtype)  # dL/du: the modulating factor
        gz[view] = gz[view] + m[:, None] * q
        anchors.append(m[:, None] * z)
        contexts.append(c)
    a, c = torch.cat(anchors), torch.cat(contexts)
    if "B" in P:
        gP = {"B": a.t() @ c}
    else:
        gP = {"U": a.t() @ (c @ P["V"]), "V": c.t() @ (a @ P["U"])}
    return loss, gz[0], gz[1], gP
