"""Every local rule trains end to end through `edge.app.train` (digits, a 512-image subset)."""

from __future__ import annotations

import math

import pytest

from edge.app.train import TrainConfig, train


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clapp", "clapp++", "clapp++dfb", "clapp++both", "ff"])
def test_rule_trains_on_digits(name: str, tmp_path) -> None:
    cfg = TrainConfig(rule=name, data="digits", epochs=2, subset=512)
    result = train(cfg, tmp_path, progress=False)
    losses = [h["loss"] for h in result["history"]]
    assert all(math.isfinite(v) for v in losses)
    assert losses[1] < losses[0], losses
    assert result["probe_accuracy"] > 0.5  # chance is 0.1
    assert (tmp_path / "result.json").exists()
