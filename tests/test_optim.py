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


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_eager_update_equals_update(name):
    """The fused eager update is the same arithmetic as the traced one (to float rounding),
    leaves its inputs untouched, and keeps the state keys."""
    cfg = OptimConfig(name, lr=0.01, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    p = torch.randn(4, 3, 3, 3, generator=g)
    a_p, a_s = p.clone(), cfg.init_state({"w": p})
    b_p, b_s = p.clone(), cfg.init_state({"w": p})
    for t in range(1, 6):
        grad = torch.randn(p.shape, generator=g)
        step = torch.tensor(float(t))
        before = (b_p.clone(), {k: v.clone() for k, v in b_s.items()})
        a_p, upd_a = cfg.update("w", a_p, grad, a_s, step)
        new_b, upd_b = cfg.update_eager("w", b_p, grad, b_s, step)
        assert torch.equal(b_p, before[0])
        assert all(torch.equal(b_s[k], before[1][k]) for k in b_s)  # inputs not modified
        assert upd_a.keys() == upd_b.keys()
        a_s, b_s, b_p = {**a_s, **upd_a}, {**b_s, **upd_b}, new_b
    # float32 rounding (the fused kernel divides by sqrt(bias correction) separately): within
    # 1e-4 of the parameters' total movement (5 steps of at most lr)
    torch.testing.assert_close(b_p, a_p, rtol=0, atol=1e-4 * 5 * cfg.lr)
    assert not torch.equal(a_p, p)
    for k in a_s:
        torch.testing.assert_close(b_s[k], a_s[k], rtol=1e-6, atol=1e-7)
