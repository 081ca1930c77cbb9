"""The paper's deep-linear theory, checked numerically (see `edge.theory` for the setup)."""

from __future__ import annotations

import pytest
import torch

from edge import theory as T

D0, D, DEPTH, N = 6, 5, 4, 64
F64 = torch.float64


def views(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two noisy views of N random images: positives share their image."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, *shape, generator=g, dtype=F64)
    return (s + 0.5 * torch.randn(s.shape, generator=g, dtype=F64),
            s + 0.5 * torch.randn(s.shape, generator=g, dtype=F64))


def gaussian(*shape: int, g: torch.Generator) -> torch.Tensor:
    fan_in = torch.Size(shape[1:]).numel()
    return torch.randn(*shape, generator=g, dtype=F64) / fan_in**0.5


def mlp_weights(orthogonal: bool, seed: int = 1) -> list[torch.Tensor]:
    """W^1 Gaussian (it is never downstream); W^2..W^L orthogonal or Gaussian."""
    g = torch.Generator().manual_seed(seed)
    rest = [T.random_orthogonal(D, g) if orthogonal else gaussian(D, D, g=g)
            for _ in range(DEPTH - 1)]
    return [gaussian(D, D0, g=g), *rest]


def conv_weights(orthogonal: bool, c: int = 3, depth: int = 3, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    rest = [T.orthogonal_conv(c, g) if orthogonal else gaussian(c, c, 3, 3, g=g)
            for _ in range(depth - 1)]
    return [gaussian(c, c, 3, 3, g=g), *rest]


def test_optimal_predictor_is_the_ridge_optimum() -> None:
    x1, x2 = views((D0,))
    B = T.optimal_predictor(x1, x2, x1, x2).requires_grad_(True)
    (g,) = torch.autograd.grad(T.linear_clapp_loss(x1, x2, x1, x2, B), B)
    assert float(g.abs().max()) < 1e-12
    assert float(B.detach().norm()) > 1.0


def test_the_downstream_products_are_what_the_claims_assume() -> None:
    ws = mlp_weights(orthogonal=True)
    for l in range(1, DEPTH):
        P = T.operator(ws[l:], (D,))
        assert torch.allclose(P.t() @ P, torch.eye(D, dtype=F64), atol=1e-12)
    P = T.operator(mlp_weights(orthogonal=False)[1:], (D,))
    assert float((P.t() @ P - torch.eye(D, dtype=F64)).abs().max()) > 0.1
    ws = conv_weights(orthogonal=True)
    P = T.operator(ws[1:], (3, 5, 5))
    assert torch.allclose(P.t() @ P, torch.eye(75, dtype=F64), atol=1e-12)
    assert int((ws[1][:, :, 1:, 1:].abs().sum((0, 1)) > 1e-3).sum()) == 4  # a real 2D kernel


@pytest.mark.parametrize("feedback", [False, True], ids=["same-layer", "direct-feedback"])
def test_orthogonal_downstream_local_equals_backprop(feedback: bool) -> None:
    x1, x2 = views((D0,))
    ws = mlp_weights(orthogonal=True)
    local, bp = T.local_grads(ws, x1, x2, feedback=feedback), T.global_grads(ws, x1, x2)
    for a, b in zip(local, bp, strict=True):
        assert float(b.norm()) > 1e-3
        assert T.cosine(a, b) > 1 - 1e-6
        assert T.rel_error(a, b) < 1e-5


def test_equality_does_not_need_the_stop_gradient_on_the_context() -> None:
    x1, x2 = views((D0,))
    ws = mlp_weights(orthogonal=True)
    local = T.local_grads(ws, x1, x2, detach_context=False)
    bp = T.global_grads(ws, x1, x2, detach_context=False)
    for a, b in zip(local, bp, strict=True):
        assert T.rel_error(a, b) < 1e-5
    # and the context path does contribute: the gradients differ from the detached ones
    assert T.rel_error(bp[0], T.global_grads(ws, x1, x2)[0]) > 1e-3


@pytest.mark.parametrize("feedback", [False, True], ids=["same-layer", "direct-feedback"])
def test_gaussian_downstream_local_differs_but_the_top_layer_is_exact(feedback: bool) -> None:
    x1, x2 = views((D0,))
    ws = mlp_weights(orthogonal=False)
    local, bp = T.local_grads(ws, x1, x2, feedback=feedback), T.global_grads(ws, x1, x2)
    cos = [T.cosine(a, b) for a, b in zip(local, bp, strict=True)]
    assert all(c < 0.99 for c in cos[:-1]), cos
    assert cos[-1] > 1 - 1e-12 and T.rel_error(local[-1], bp[-1]) < 1e-12


@pytest.mark.parametrize("feedback", [False, True], ids=["same-layer", "direct-feedback"])
def test_linear_cnn_with_spatial_dependence_local_equals_backprop(feedback: bool) -> None:
    x1, x2 = views((3, 5, 5))
    ws = conv_weights(orthogonal=True)
    local, bp = T.local_grads(ws, x1, x2, feedback=feedback), T.global_grads(ws, x1, x2)
    for a, b in zip(local, bp, strict=True):
        assert T.cosine(a, b) > 1 - 1e-6 and T.rel_error(a, b) < 1e-5


def test_linear_cnn_without_spatial_dependence_or_orthogonality_differs() -> None:
    x1, x2 = views((3, 5, 5))
    ws = conv_weights(orthogonal=True)
    bp = T.global_grads(ws, x1, x2)  # the global loss keeps the spatial layout
    pooled = T.local_grads(ws, x1, x2, code=T.pooled)  # CLAPP 2021: mean over positions
    assert all(T.cosine(a, b) < 0.99 for a, b in zip(pooled, bp, strict=True))
    ws = conv_weights(orthogonal=False)
    local, bp = T.local_grads(ws, x1, x2), T.global_grads(ws, x1, x2)
    cos = [T.cosine(a, b) for a, b in zip(local, bp, strict=True)]
    assert all(c < 0.99 for c in cos[:-1]) and cos[-1] > 1 - 1e-12, cos
