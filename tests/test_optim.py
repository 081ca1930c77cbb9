"""The functional optimizers equal torch.optim step for step."""

import pytest
import torch

from edge.errors import EdgeError
from edge.optim import OptimConfig


@pytest.mark.parametrize(
    "cfg,ref",
    [
        (
            OptimConfig("sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
        ),
        (
            OptimConfig("adamw", lr=0.01, weight_decay=0.1),
            lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
        ),
    ],
)
def test_matches_torch_optim(cfg, ref):
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(
        5,
        3,
        generator=g,
    )
    grads = [
        torch.randn(
            5,
            3,
            generator=g,
        )
        for _ in range(5)
    ]
    leaf = p0.clone().requires_grad_(True)
    opt = ref([leaf])
    params, state = {"w": p0.clone()}, cfg.init_state({"w": p0})
    for gr in grads:
        leaf.grad = gr.clone()
        opt.step()
        step = state["step"] + 1
        params["w"], upd = cfg.update("w", params["w"], gr, state, step)
        state.update(upd)
        state["step"] = step
    torch.testing.assert_close(
        params["w"], leaf.detach(), rtol=2e-6, atol=1e-7
    )  # float32, as in training


@pytest.mark.parametrize("kw", [{"name": "lion"}, {"lr": 0.0}, {"lr": -1.0}])
def test_bad_config(kw):
    with pytest.raises(EdgeError):
        OptimConfig(**kw)
