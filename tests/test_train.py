"""The training loop: determinism, exact resume, atomic checkpoints, NaN handling."""

import json

import pytest
import torch

from edge import checkpoint
from edge.errors import EdgeError
from edge.app.train import TrainConfig, train

SMALL = dict(data="digits", subset=256, batch_size=32, width=0.25, net="digits")


def test_train_writes_result_and_checkpoint(tmp_path):
    r = train(TrainConfig(rule="clapp++", epochs=1, **SMALL), tmp_path, progress=False)
    for key in (
        "rule",
        "data",
        "epochs",
        "probe_accuracy",
        "random_probe_accuracy",
        "seconds",
        "checkpoint",
        "weights_digest",
    ):
        assert key in r
    assert 0.1 < r["probe_accuracy"] <= 1.0
    assert (
        json.loads((tmp_path / "result.json").read_text())["weights_digest"] == r["weights_digest"]
    )
    params, _, meta = checkpoint.load(tmp_path)
    assert checkpoint.weights_digest(params) == r["weights_digest"]
    assert meta["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt-")] == []


@pytest.mark.parametrize("rule", ["clapp++", "bp-infonce"])
def test_same_seed_same_weights_and_resume_is_exact(tmp_path, rule):
    cfg = TrainConfig(rule=rule, epochs=2, **SMALL)
    full = train(cfg, tmp_path / "full", progress=False)
    again = train(cfg, tmp_path / "again", progress=False)
    assert again["weights_digest"] == full["weights_digest"]
    half = TrainConfig(rule=rule, epochs=1, **SMALL)
    train(half, tmp_path / "split", progress=False)
    resumed = train(cfg, tmp_path / "split", resume=True, progress=False)
    assert resumed["weights_digest"] == full["weights_digest"]
    other = train(
        TrainConfig(rule=rule, epochs=2, seed=1, **SMALL), tmp_path / "s1", progress=False
    )
    assert other["weights_digest"] != full["weights_digest"]


def test_resume_refuses_another_run(tmp_path):
    train(TrainConfig(rule="clapp++", epochs=1, **SMALL), tmp_path, progress=False)
    with pytest.raises(EdgeError, match="another run"):
        train(
            TrainConfig(rule="clapp++", epochs=2, **{**SMALL, "width": 0.5}),
            tmp_path,
            resume=True,
            progress=False,
        )


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = TrainConfig(rule="clapp++", epochs=3, **SMALL)
    import edge.app.train as t

    real = t.train_step
    calls = {"n": 0}

    def poisoned(*args, **kw):
        calls["n"] += 1
        p, s, m = real(*args, **kw)
        if calls["n"] > 8:  # 8 steps per epoch: epoch 2 diverges
            m = {**m, "loss": torch.tensor(float("nan"))}
        return p, s, m

    monkeypatch.setattr(t, "train_step", poisoned)
    with pytest.raises(EdgeError, match="loss became nan at epoch 2 step 1"):
        train(cfg, tmp_path, progress=False)
    _, _, meta = checkpoint.load(tmp_path)
    assert meta["epoch"] == 1


@pytest.mark.parametrize(
    "kw",
    [{"epochs": 0}, {"batch_size": -1}, {"subset": 0}, {"rule": "hebb"}, {"data": "imagenet"},
     {"alignment_every": 0}],
)
def test_bad_config(kw):
    with pytest.raises(EdgeError):
        TrainConfig(**kw)


def test_batch_larger_than_data(tmp_path):
    with pytest.raises(EdgeError, match="larger than"):
        train(
            TrainConfig(rule="clapp++", epochs=1, **{**SMALL, "subset": 16}),
            tmp_path,
            progress=False,
        )


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    params = {"enc.0.w": torch.ones(3)}
    checkpoint.save(tmp_path / "c.safetensors", params, {}, {"epoch": 1})
    import edge.checkpoint as c

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(c, "save_file", boom)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path / "c.safetensors", {"enc.0.w": torch.zeros(3)}, {}, {"epoch": 2})
    p, _, meta = checkpoint.load(tmp_path / "c.safetensors")
    assert meta["epoch"] == 1 and p["enc.0.w"].sum() == 3
    assert len(list(tmp_path.iterdir())) == 1


def test_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "checkpoint.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EdgeError, match="not an edge checkpoint"):
        checkpoint.load(bad)


def test_alignment_every_measures_only_the_sampled_batches(tmp_path):
    """With alignment_every past the epoch's length only the first batch is measured: the
    recorded alignment is then exactly alignment() of the initial weights on that batch."""
    from edge.alignment import alignment
    from edge.data import default_views, load, two_views
    from edge.app.train import build, epoch_generator, initial_params

    cfg = TrainConfig(rule="clapp++", epochs=1, alignment=True, alignment_every=1000, **SMALL)
    r = train(cfg, tmp_path, progress=False)
    ds = load("digits", None, SMALL["subset"])
    net, rule = build(cfg, ds.in_shape)
    gen = epoch_generator(cfg.seed, 0)
    perm = torch.randperm(ds.x_train.shape[0], generator=gen)
    x1, x2 = two_views(ds.x_train[perm[: cfg.batch_size]], gen, default_views("digits"),
                       ds.mean, ds.std)
    want = alignment(net, rule, initial_params(cfg, net, rule), x1, x2, seed=cfg.seed)
    assert r["alignment"] == pytest.approx(want, abs=1e-6)
