"""`edge train --quant`: integer weights in the checkpoint, the digest over them, exact resume."""

import pytest
import torch

from edge import checkpoint
from edge.errors import EdgeError
from edge.app.train import TrainConfig, train
from quant.engine import QuantEngine

SMALL = dict(data="digits", subset=256, batch_size=32, width=0.25, net="digits")


@pytest.mark.slow
def test_integer_mode_checkpoint_and_resume(tmp_path):
    cfg = TrainConfig(rule="clapp++", epochs=2, quant="int8-w16", mode="integer", **SMALL)
    full = train(cfg, tmp_path / "full", progress=False, engine=QuantEngine("int8-w16", "integer"))
    params, state, meta = checkpoint.load(tmp_path / "full")
    assert params["enc.0.w"].dtype == torch.int16  # high-resolution integer store
    assert checkpoint.weights_digest(params) == full["weights_digest"]
    assert any(k.startswith("exp.") for k in state)  # the scales travel with the weights
    assert meta["quant"]["mode"] == "integer"
    half = TrainConfig(rule="clapp++", epochs=1, quant="int8-w16", mode="integer", **SMALL)
    train(half, tmp_path / "split", progress=False, engine=QuantEngine("int8-w16", "integer"))
    resumed = train(cfg, tmp_path / "split", resume=True, progress=False,
                    engine=QuantEngine("int8-w16", "integer"))
    assert resumed["weights_digest"] == full["weights_digest"]
    assert 0.1 < full["probe_accuracy"] <= 1


@pytest.mark.parametrize("kw", [{"quant": "int4"}, {"mode": "float"},
                                {"quant": "int8", "alignment": True}])
def test_bad_quant_config(kw):
    with pytest.raises(EdgeError):
        TrainConfig(**kw)
