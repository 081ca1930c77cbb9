"""Every local rule trains end to end through `edge.app.train`: its own loss falls (digits, a
512-image subset, two epochs). Whether the features improve is a benchmark question (a
probe on digits cannot tell: a random conv net already scores ~0.98 there)."""

from __future__ import annotations

import math

import pytest

from edge.app.config import TrainConfig
from edge.app.train import train


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clapp", "clapp++", "clapp++dfb", "clapp++both", "ff"])
def test_rule_trains_on_digits(name: str, tmp_path) -> None:
    cfg = TrainConfig(rule=name, data="digits", epochs=2, subset=512)
    result = train(cfg, tmp_path, progress=False, probe=False)
    losses = [h["loss"] for h in result["history"]]
    assert all(math.isfinite(v) for v in losses)
    assert losses[1] < losses[0], losses
