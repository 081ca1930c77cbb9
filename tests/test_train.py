"""The training loop: engines built from the config, determinism, exact resume, atomic
checkpoints, checked updates, used run directories, Ctrl-C, bad configs."""

from __future__ import annotations

import json

import pytest
import torch

from edge import checkpoint
from edge.app.config import TrainConfig
from edge.app.train import Interrupted, build, train
from edge.errors import EdgeError
from edge.nets import encode
from edge.probe import probe_accuracy

SMALL = dict(data="digits", subset=256, batch_size=32, width=0.25, net="digits")


def test_train_writes_result_and_checkpoint_that_agree(tmp_path):
    r = train(TrainConfig(rule="clapp++", epochs=1, **SMALL), tmp_path, progress=False)
    assert json.loads((tmp_path / "result.json").read_text())["weights_digest"] == \
        r["weights_digest"]
    params, _, meta = checkpoint.load(tmp_path)
    assert checkpoint.weights_digest(params) == r["weights_digest"] and meta["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt-")] == []
    # the probe numbers are the probes of what was saved and of the initial weights
    from edge.data import load

    ds = load("digits", None, SMALL["subset"])
    cfg = TrainConfig(rule="clapp++", epochs=1, **SMALL)
    net, _, initial = build(cfg, ds.in_shape)
    assert r["probe_accuracy"] == probe_accuracy(net, params, ds)
    assert r["random_probe_accuracy"] == probe_accuracy(net, initial, ds)
    assert any(not torch.equal(params[k], initial[k]) for k in initial)


@pytest.mark.parametrize("rule", ["clapp++", "bp-infonce"])
def test_same_seed_same_weights_and_resume_is_exact(tmp_path, rule):
    cfg = TrainConfig(rule=rule, epochs=2, **SMALL)
    full = train(cfg, tmp_path / "full", progress=False, probe=False)
    again = train(cfg, tmp_path / "again", progress=False, probe=False)
    assert again["weights_digest"] == full["weights_digest"]
    train(TrainConfig(rule=rule, epochs=1, **SMALL), tmp_path / "split", progress=False,
          probe=False)
    resumed = train(cfg, tmp_path / "split", resume=True, progress=False, probe=False)
    assert resumed["weights_digest"] == full["weights_digest"]
    other = train(TrainConfig(rule=rule, epochs=2, seed=1, **SMALL), tmp_path / "s1",
                  progress=False, probe=False)
    assert other["weights_digest"] != full["weights_digest"]


def test_the_config_picks_the_engine(tmp_path):
    """train(TrainConfig(quant=...)) from Python trains what it says it trains."""
    cfg = TrainConfig(rule="clapp++", epochs=1, quant="int8-w16", mode="integer", **SMALL)
    r = train(cfg, tmp_path / "int", progress=False, probe=False)
    params, state, meta = checkpoint.load(tmp_path / "int")
    assert r["quantization"]["mode"] == "integer" and meta["quant"]["plan"]["quant"] == "int8-w16"
    assert all(not v.is_floating_point() for v in params.values())  # integer stores
    assert {str(v.dtype) for k, v in params.items() if k.endswith(".w")} == {"torch.int16"}
    qat = train(TrainConfig(rule="ff", epochs=1, quant="int8", mode="qat", **SMALL),
                tmp_path / "qat", progress=False, probe=False)
    assert qat["quantization"]["mode"] == "qat"


def test_integer_runs_resume_bit_exactly(tmp_path):
    kw = dict(rule="clapp++", quant="int8-w16", mode="integer", **SMALL)
    full = train(TrainConfig(epochs=2, **kw), tmp_path / "full", progress=False, probe=False)
    train(TrainConfig(epochs=1, **kw), tmp_path / "half", progress=False, probe=False)
    resumed = train(TrainConfig(epochs=2, **kw), tmp_path / "half", resume=True, progress=False,
                    probe=False)
    assert resumed["weights_digest"] == full["weights_digest"]


def test_integer_step_on_onnxruntime_gives_the_torch_digest(tmp_path):
    kw = dict(rule="clapp++", epochs=1, quant="int8-w16", mode="integer", data="digits",
              subset=64, batch_size=16, width=0.25)
    a = train(TrainConfig(**kw), tmp_path / "torch", progress=False, probe=False)
    b = train(TrainConfig(runtime="onnxruntime", **kw), tmp_path / "ort", progress=False,
              probe=False)
    assert a["weights_digest"] == b["weights_digest"]


def test_resume_refuses_another_run_and_a_missing_checkpoint(tmp_path):
    train(TrainConfig(rule="clapp++", epochs=1, **SMALL), tmp_path, progress=False, probe=False)
    with pytest.raises(EdgeError, match="another run"):
        train(TrainConfig(rule="clapp++", epochs=2, **{**SMALL, "width": 0.5}), tmp_path,
              resume=True, progress=False)
    with pytest.raises(EdgeError, match="holds no checkpoint"):
        train(TrainConfig(rule="clapp++", epochs=2, **SMALL), tmp_path / "nothing",
              resume=True, progress=False)


def test_a_used_run_directory_is_refused_unless_overwritten(tmp_path):
    cfg = TrainConfig(rule="clapp++", epochs=1, **SMALL)
    first = train(cfg, tmp_path, progress=False, probe=False)
    with pytest.raises(EdgeError, match="already holds a run; pass --resume .* or --overwrite"):
        train(TrainConfig(rule="clapp", epochs=1, **SMALL), tmp_path, progress=False)
    assert checkpoint.weights_digest(checkpoint.load(tmp_path)[0]) == first["weights_digest"]
    other = train(TrainConfig(rule="clapp", epochs=1, **SMALL), tmp_path, overwrite=True,
                  progress=False, probe=False)
    assert checkpoint.weights_digest(checkpoint.load(tmp_path)[0]) == other["weights_digest"]


def _poison(monkeypatch, after: int, what: str):
    import edge.app.train as t

    real, calls = t.train_step, {"n": 0}

    def poisoned(*args, **kw):
        calls["n"] += 1
        p, s, m = real(*args, **kw)
        if calls["n"] > after:
            if what == "loss":
                m = {**m, "loss": torch.tensor(float("nan"))}
            else:
                p = {**p, "enc.0.0.w": p["enc.0.0.w"] * float("inf")}
        return p, s, m

    monkeypatch.setattr(t, "train_step", poisoned)


@pytest.mark.parametrize("what", ["loss", "params"])
def test_non_finite_steps_stop_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, what):
    _poison(monkeypatch, 8, what)  # 8 steps per epoch: epoch 2 diverges
    needle = "loss became nan" if what == "loss" else "made parameters non-finite"
    with pytest.raises(EdgeError, match=f"{needle} at epoch 2 step 1; stopped \\(kept "):
        train(TrainConfig(rule="clapp++", epochs=3, **SMALL), tmp_path, progress=False)
    params, _, meta = checkpoint.load(tmp_path)
    assert meta["epoch"] == 1 and all(bool(torch.isfinite(v).all()) for v in params.values())


def test_a_huge_learning_rate_never_saves_non_finite_weights(tmp_path):
    with pytest.raises(EdgeError, match="non-finite|loss became"):
        train(TrainConfig(rule="clapp++", epochs=2, lr=1e30, **SMALL), tmp_path, progress=False)
    assert not (tmp_path / checkpoint.FILENAME).exists()


def test_ctrl_c_says_what_was_saved(tmp_path, monkeypatch):
    import edge.app.train as t

    real, calls = t.train_step, {"n": 0}

    def interrupted(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(t, "train_step", interrupted)
    with pytest.raises(Interrupted, match="the checkpoint of epoch 1 is in .*--resume"):
        train(TrainConfig(rule="clapp++", epochs=3, **SMALL), tmp_path, progress=False)
    monkeypatch.setattr(t, "train_step", real)
    full = train(TrainConfig(rule="clapp++", epochs=2, **SMALL), tmp_path / "full",
                 progress=False, probe=False)
    resumed = train(TrainConfig(rule="clapp++", epochs=2, **SMALL), tmp_path, resume=True,
                    progress=False, probe=False)
    assert resumed["weights_digest"] == full["weights_digest"]


@pytest.mark.parametrize("kw,needle", [
    ({"epochs": 0}, "--epochs must be positive"),
    ({"batch_size": -1}, "--batch-size must be positive"),
    ({"subset": 0}, "--subset must be positive"),
    ({"alignment_every": 0}, "--alignment-every must be positive"),
    ({"lr": float("inf")}, "--lr must be a positive finite"),
    ({"lr": -1.0}, "--lr must be a positive finite"),
    ({"weight_decay": -1.0}, "--weight-decay must be >= 0"),
    ({"device": "tpu"}, "unknown --device 'tpu'; valid: cpu"),
    ({"quant": "int4"}, "unknown --quant"),
    ({"runtime": "tensorrt"}, "unknown --runtime"),
    ({"runtime": "onnxruntime", "quant": "int8", "mode": "qat"}, "--mode qat trains"),
    ({"profile": "npu"}, "apply to an exported step"),
])
def test_bad_config_is_one_line(kw, needle):
    with pytest.raises(EdgeError) as e:
        TrainConfig(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw,needle", [
    ({"rule": "hebb"}, "unknown rule 'hebb'"),
    ({"net": "vgg7"}, "unknown network 'vgg7'"),
    ({"data": "imagenet"}, "unknown data set 'imagenet'"),
    ({"rule_hparams": {"nosuchkey": 1}}, "valid: pool, predictor, rank"),
    ({"batch_size": 1}, "no in-batch negative"),
])
def test_bad_names_are_one_line_errors_before_training(tmp_path, kw, needle):
    with pytest.raises(EdgeError) as e:
        train(TrainConfig(**{**SMALL, "epochs": 1, **kw}), tmp_path, progress=False)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_batch_larger_than_data(tmp_path):
    with pytest.raises(EdgeError, match="larger than"):
        train(TrainConfig(rule="clapp++", epochs=1, **{**SMALL, "subset": 16}), tmp_path,
              progress=False)


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
    from edge.app.train import epoch_generator
    from edge.data import load, two_views, view_config

    cfg = TrainConfig(rule="clapp++", epochs=1, alignment=True, alignment_every=1000, **SMALL)
    r = train(cfg, tmp_path, progress=False, probe=False)
    ds = load("digits", None, SMALL["subset"])
    net, rule, params = build(cfg, ds.in_shape)
    gen = epoch_generator(cfg.seed, 0)
    perm = torch.randperm(ds.x_train.shape[0], generator=gen)
    x1, x2 = two_views(ds.x_train[perm[: cfg.batch_size]], gen, view_config("edge", ds),
                       ds.mean, ds.std)
    assert r["alignment"] == pytest.approx(alignment(net, rule, params, x1, x2, seed=cfg.seed),
                                           abs=1e-6)
    assert len(r["alignment"]) == len(net.blocks)


def test_from_torch_init_trains_the_given_network(tmp_path):
    from torch import nn

    from edge.nets import from_torch

    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                      nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.AvgPool2d(2)).eval()
    net, params = from_torch(m, (1, 8, 8))
    r = train(TrainConfig(rule="clapp++", epochs=1, **{**SMALL, "net": None}), tmp_path,
              progress=False, probe=False, init=(net, params))
    trained, _, meta = checkpoint.load(tmp_path)
    assert meta["net"]["name"] == "from_torch" and r["net"] == "from_torch"
    # the BatchNorm was folded into the first conv, then training moved the weights
    assert "enc.0.1.gamma" not in trained and trained["enc.0.0.w"].shape == (8, 1, 3, 3)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(encode(net, params, x)[-1], m(x), atol=1e-5)
    assert not torch.equal(trained["enc.0.0.w"], params["enc.0.0.w"])


def test_a_pretrained_torch_model_adapts_locally_and_its_step_exports(tmp_path):
    """Issue 13's path for a user's model: an nn.Sequential (conv, BN, ReLU6, depthwise conv,
    avg-pool, linear) trained briefly with backprop on digits, converted, trained on with
    clapp++, exported, and its step run in onnxruntime against torch's."""
    from torch import nn

    from edge import rules
    from edge.data import load, to_float
    from edge.nets import fold_batchnorm, from_torch
    from edge.optim import OptimConfig
    from edge.step import init_state, train_step
    from export.runner import make_stepper

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                      nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.AvgPool2d(2),
                      nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU())
    ds = load("digits", None, 256)
    x, y = to_float(ds.x_train, ds), ds.y_train
    clf = nn.Linear(16, ds.num_classes)
    opt = torch.optim.Adam([*m.parameters(), *clf.parameters()], lr=1e-2)
    losses = []
    for _ in range(30):  # backprop pretraining: a classifier on top of the encoder
        loss = nn.functional.cross_entropy(clf(m(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    m.eval()
    net, params = from_torch(m, (1, 8, 8))
    with torch.no_grad():  # converted with its weights (BN folded): the same function
        assert torch.allclose(encode(net, params, x)[-1], m(x), atol=1e-4)
    train(TrainConfig(rule="clapp++", epochs=1, **{**SMALL, "net": None}), tmp_path,
          progress=False, probe=False, init=(net, params))
    trained, _, _ = checkpoint.load(tmp_path)
    enc = {k: v for k, v in trained.items() if k.startswith("enc.")}
    assert any(not torch.equal(enc[k], params[k]) for k in params)  # clapp++ moved it
    rule, o = rules.get("clapp++"), OptimConfig("adamw", lr=1e-3)
    net = fold_batchnorm(net, params)[0]  # as training ran it: BatchNorm folded
    p0 = {**trained}
    s0 = init_state(net, rule, o, p0)
    x1, x2 = x[:16], x[16:32]
    want = train_step(net, rule, o, p0, s0, x1, x2)
    got = make_stepper("onnxruntime", net, rule, o)(p0, s0, x1, x2)
    for k in want[0]:  # float tolerance: onnxruntime sums in another order
        ref = want[0][k]
        assert float((got[0][k] - ref).norm() / ref.norm().clamp_min(1e-30)) < 1e-5, k
