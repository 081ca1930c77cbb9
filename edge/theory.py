"""The paper's theory (arXiv 2601.21683, deep linear networks) as small executable functions.

Setup. A deep linear network z^l = W^l z^{l-1}, z^0 = x: matrices, or 3x3 convolutions with
circular padding (no bias, no ReLU, no pooling). Each image gives two views x1, x2. As in
`edge.rules.hinge`, anchor z (one view) is scored against context c (the other view,
detached) by u = z^T B c, on 4N pairs k with sign s_k = +1 for the two positives of image i
(z1_i with c2_i, z2_i with c1_i) and -1 for the negatives (z1_i with c2_{i+1}, z2_i with
c1_{i+1}). The loss is the CLAPP hinge where every term is active, relu(1 - s u) = 1 - s u,
which is linear in u, plus a ridge penalty on the predictor:

    L(z, c; B) = 1/(2N) sum_k (1 - s_k z_k^T B c_k) + lambda/2 ||B||^2

Its predictor optimum is closed form, B* = M / lambda with the contrastive cross-moment
M = 1/(2N) sum_k s_k z_k c_k^T; every B below sits at the optimum of its own loss, computed
from the current (detached) activity. (Since dL/dB = 0 there, the gradient of the W's is the
same whether B is held fixed or re-optimised along: the envelope theorem.)

- Local CLAPP: layer l minimises L(z^l, c^l; B^l) with its own input detached.
- Local CLAPP with direct feedback: the context is the other view's top-layer code c^L, and
  B^l (D_l x D_L) is at the optimum of L(z^l, c^L; B^l).
- Global BP-SSL: L(z^L, c^L; B^L) on the top layer only, differentiated through all layers.

Why they agree. Let P = W^L ... W^{l+1} (the downstream product). Then z^L = P z^l and
c^L = P c^l, so M^L = P M^l P^T, and each update of W^l reads
-1/(2N) sum_k s_k (G c^l_k) (z^{l-1}_k)^T with
  global BP:        G = P^T B^L* P = P^T P M^l P^T P / lambda
  local CLAPP:      G = B^l*       = M^l / lambda
  direct feedback:  G = B^l* P     = M^l P^T P / lambda        (there B^l* = M^l P^T / lambda)
All three coincide when P^T P = I (an orthogonal downstream product), on the top layer always
(P = I), and in general not. A convolution is just a linear map of the flattened C x H x W
activity, so with 2D spatial dependence (codes = whole maps, B of size CHW x CHW, as CLAPP++
without pooling) the same holds for a CNN whose downstream convolutions are orthogonal
(circular padding: with zero padding only a centre-tap, i.e. 1x1, convolution is orthogonal).
Local codes that average over positions (CLAPP 2021) break it against a global loss that keeps
the spatial layout. Autograd is fine here: this module is a reference, not a rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LAMBDA = 0.01
Code = Callable[[Tensor], Tensor]


def spatial(z: Tensor) -> Tensor:
    """Code with 2D spatial dependence: the whole activity, flattened."""
    return z.flatten(1)


def pooled(z: Tensor) -> Tensor:
    """Code of CLAPP 2021: the mean over positions (a C-vector)."""
    return z.mean((2, 3)) if z.dim() == 4 else z


def layer(w: Tensor, x: Tensor) -> Tensor:
    """z = W x for a matrix W; a 3x3 circular convolution for a 4D kernel."""
    if w.dim() == 2:
        return x @ w.t()
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), w)


def forward(ws: list[Tensor], x: Tensor) -> list[Tensor]:
    """[z^0, z^1, ..., z^L]."""
    zs = [x]
    for w in ws:
        zs.append(layer(w, zs[-1]))
    return zs


def _pairs(z1: Tensor, z2: Tensor, c1: Tensor, c2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Anchors, contexts and signs of the 4N pairs."""
    n = z1.shape[0]
    z = torch.cat([z1, z1, z2, z2])
    c = torch.cat([c2, torch.roll(c2, -1, 0), c1, torch.roll(c1, -1, 0)])
    s = torch.cat([torch.ones(n), -torch.ones(n), torch.ones(n), -torch.ones(n)]).to(z1.dtype)
    return z, c, s


def linear_clapp_loss(
    z1: Tensor, z2: Tensor, c1: Tensor, c2: Tensor, B: Tensor, lam: float = LAMBDA
) -> Tensor:
    z, c, s = _pairs(z1, z2, c1, c2)
    u = ((z @ B) * c).sum(1)
    return (1 - s * u).sum() / (2 * z1.shape[0]) + lam / 2 * (B * B).sum()


def optimal_predictor(
    z1: Tensor, z2: Tensor, c1: Tensor, c2: Tensor, lam: float = LAMBDA
) -> Tensor:
    """argmin_B of `linear_clapp_loss`: M / lambda, M = 1/(2N) sum_k s_k z_k c_k^T."""
    z, c, s = _pairs(z1.detach(), z2.detach(), c1.detach(), c2.detach())
    return (z * s[:, None]).t() @ c / (2 * z1.shape[0] * lam)


def _clapp(z1: Tensor, z2: Tensor, c1: Tensor, c2: Tensor, lam: float) -> Tensor:
    return linear_clapp_loss(z1, z2, c1, c2, optimal_predictor(z1, z2, c1, c2, lam), lam)


def local_grads(
    ws: list[Tensor],
    x1: Tensor,
    x2: Tensor,
    feedback: bool = False,
    code: Code = spatial,
    detach_context: bool = True,
    lam: float = LAMBDA,
) -> list[Tensor]:
    """Each layer's gradient of its own loss, its input detached, its B at the optimum.
    `feedback`: the context is the other view's top-layer code (direct feedback)."""
    with torch.no_grad():
        a1, a2 = forward(ws, x1), forward(ws, x2)
    top1, top2 = code(a1[-1]), code(a2[-1])
    grads = []
    for i, w in enumerate(ws):
        w = w.detach().requires_grad_(True)
        z1, z2 = code(layer(w, a1[i])), code(layer(w, a2[i]))
        if feedback:
            c1, c2 = top1, top2
        else:
            c1, c2 = (z1.detach(), z2.detach()) if detach_context else (z1, z2)
        grads.append(torch.autograd.grad(_clapp(z1, z2, c1, c2, lam), w)[0])
    return grads


def global_grads(
    ws: list[Tensor],
    x1: Tensor,
    x2: Tensor,
    code: Code = spatial,
    detach_context: bool = True,
    lam: float = LAMBDA,
) -> list[Tensor]:
    """Backprop of the top layer's loss (B^L at the optimum) to every layer's weights."""
    leaves = [w.detach().requires_grad_(True) for w in ws]
    z1, z2 = code(forward(leaves, x1)[-1]), code(forward(leaves, x2)[-1])
    c1, c2 = (z1.detach(), z2.detach()) if detach_context else (z1, z2)
    return list(torch.autograd.grad(_clapp(z1, z2, c1, c2, lam), leaves))


def cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0, eps=1e-30))


def rel_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def random_orthogonal(n: int, gen: torch.Generator, dtype=torch.float64) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


def orthogonal_conv(c: int, gen: torch.Generator, dtype=torch.float64) -> Tensor:
    """A 3x3 kernel (c, c, 3, 3) whose circular convolution is an orthogonal map of c x H x W.

    Its transfer matrix at frequencies (a, b) is Q (Pa + e^{ia}(I - Pa)) (Pb + e^{ib}(I - Pb))
    with Q orthogonal and Pa, Pb orthogonal projectors: a product of unitaries at every
    frequency (a block-orthogonal convolution), with taps at offsets (0,0), (1,0), (0,1), (1,1).
    """

    def projector() -> Tensor:
        u = random_orthogonal(c, gen, dtype)[:, : max(1, c // 2)]
        return u @ u.t()

    q, pa, pb = random_orthogonal(c, gen, dtype), projector(), projector()
    eye = torch.eye(c, dtype=dtype)
    k = torch.zeros(c, c, 3, 3, dtype=dtype)
    for da, fa in ((0, pa), (1, eye - pa)):
        for db, fb in ((0, pb), (1, eye - pb)):
            k[:, :, 1 + da, 1 + db] = q @ fa @ fb  # cross-correlation: tap at offset (da, db)
    return k


def operator(ws: list[Tensor], in_shape: tuple[int, ...]) -> Tensor:
    """The matrix of the network map on flattened inputs of `in_shape`."""
    n = torch.Size(in_shape).numel()
    eye = torch.eye(n, dtype=ws[0].dtype).view(n, *in_shape)
    return forward(ws, eye)[-1].flatten(1).t()
