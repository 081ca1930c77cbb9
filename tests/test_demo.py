"""`edge demo --json`: one object, every figure measured; the locally trained encoder's
few-label head clearly above the untrained encoder's (issue 15's acceptance), the batch-1
integer step inside the nRF52840's SRAM."""

from __future__ import annotations

import json

import pytest

from edge.app.cli import main


@pytest.mark.slow
def test_demo_json(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path), "--json"])
    assert e.value.code == 0
    r = json.loads(capsys.readouterr().out)
    pre, sh, mem = r["pretrain"], r["shift"], r["memory"]
    assert pre["head_trained_encoder"] >= pre["head_untrained_encoder"] + 0.05, pre
    assert sh["no_adaptation"] < sh["adapted_on_device"] and sh["stream_images"] == 400
    assert sh["labelled_stream_images"] == 50
    assert mem["local_fits"] and mem["local_integer_step_bytes"] <= 256 * 1024
    assert mem["local_integer_step_bytes"] < mem["backprop_bytes_batch_2"]
    assert (tmp_path / "pretrain").is_dir() and (tmp_path / "adapt").is_dir()


def test_demo_refuses_bad_epochs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--epochs", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--epochs must be positive" in err and len(err.splitlines()) == 1
