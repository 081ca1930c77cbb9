"""Data parallel on torch.distributed (gloo, 2 CPU processes): the step is the global batch's
step, `edge train` through the launcher matches one process, rank 0 writes, resume is exact,
bad configurations are refused before anything starts; the full benchmark's smoke runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge import checkpoint
from edge.app import distributed as D
from edge.app.config import TrainConfig
from edge.app.train import FloatEngine, build, optim
from edge.data import load, two_views, view_config
from edge.errors import EdgeError

SMALL = dict(data="digits", subset=256, batch_size=32, width=0.25, net="digits")
# (rule, extra config): every local rule family, memory negatives, the head, both baselines
CASES = [("clapp++", {}), ("clapp++dfb", {}), ("ff", {}), ("clapp", {"negatives": "memory:5"}),
         ("clapp++both", {"negatives": "memory:40"}), ("clapp++", {"head_labels": 3}),
         ("bp-infonce", {}), ("bp-clapp++", {})]
STEPS = 3
ROOT = Path(__file__).resolve().parent.parent


def _batches(cfg: TrainConfig, ds, dtype) -> list:
    gen = torch.Generator().manual_seed(1)
    views = view_config("edge", ds)
    out = []
    for _ in range(STEPS):
        idx = torch.randperm(ds.x_ssl.shape[0], generator=gen)[: cfg.batch_size]
        labels = torch.where(idx % 3 == 0, ds.y_train[idx], -1)
        v1, v2 = two_views(ds.x_ssl[idx], gen, views, ds.mean, ds.std)
        out.append((v1.to(dtype), v2.to(dtype), labels))
    return out


def _run(engine_for, rule: str, extra: dict, dtype=torch.float64) -> tuple[dict, dict, list]:
    """STEPS steps of the engine in float64 from the run's initial weights."""
    cfg = TrainConfig(rule=rule, **{**SMALL, **extra})
    ds = load(cfg.data, None, cfg.subset)
    net, rule_obj, params = build(cfg, ds.in_shape)
    head = None
    if cfg.head_labels:
        from edge.head import PrototypeHead

        head = PrototypeHead(ds.num_classes, net.shapes()[-1])
    engine = engine_for(head)
    engine.bind(net, rule_obj, optim(cfg))
    engine.start({k: v.to(dtype) for k, v in params.items()}, [])
    engine.resume(engine.params, {k: v.to(dtype) for k, v in engine.state.items()}, {})
    losses = []
    for v1, v2, labels in _batches(cfg, ds, dtype):
        m = engine.step(v1, v2, None, labels) if head is not None else engine.step(v1, v2, None)
        assert "finite_params" not in m
        losses.append(m["layer_loss"])
    params, state, _ = engine.tensors()
    return params, state, losses


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    comm = D.connect("data")
    results = [_run(lambda head: D.DataParallelEngine(comm, head=head), r, e) for r, e in CASES]
    if rank == 0:
        torch.save(results, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _spawn(worker, world: int, out: Path) -> None:
    ctx = torch.multiprocessing.get_context("spawn")
    port = D.free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * world


@pytest.mark.slow
def test_data_parallel_step_is_the_global_batch_step(tmp_path):
    """2 ranks on shards of 16 compute the one-process step on the batch of 32: same negatives
    (the halo), memories, head sums and baseline losses; float64 leaves only rounding."""
    _spawn(_worker, 2, tmp_path / "dp.pt")
    got = torch.load(tmp_path / "dp.pt")
    for (rule, extra), (params, state, losses) in zip(CASES, got, strict=True):
        ref_p, ref_s, ref_l = _run(lambda head: FloatEngine(head=head), rule, extra)
        for k, v in ref_p.items():
            assert torch.allclose(params[k], v, rtol=1e-9, atol=1e-12), (rule, extra, k)
        for k, v in ref_s.items():
            assert torch.allclose(state[k], v, rtol=1e-9, atol=1e-12), (rule, extra, k)
        for a, b in zip(losses, ref_l, strict=True):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), (rule, extra)
        initial = build(TrainConfig(rule=rule, **{**SMALL, **extra}), (1, 8, 8))[2]
        assert all(not torch.equal(ref_p[k].float(), v) for k, v in initial.items()
                   if k.startswith("enc.") and k.endswith(".w")), (rule, "did not train")


def _edge(args: list[str], nproc: int, mode: str = "data") -> dict:
    """`edge train ... --json` through the launcher; its one JSON object."""
    code = ("import sys; from edge.app.distributed import launch; "
            f"sys.exit(launch(sys.argv[1:], {nproc}, {mode!r}, threads=1))")
    r = subprocess.run([sys.executable, "-c", code, "train", *args, "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


ARGS = ["--rule", "clapp++", "--data", "digits", "--subset", "256", "--batch-size", "32",
        "--width", "0.25"]
# float32: the shards' sums round differently; over 16 AdamW steps the parameters stay within
# 1e-5 of their largest entry (measured below 1e-6), the epoch losses within 1e-6 relative
PARAM_RTOL, LOSS_RTOL = 1e-5, 1e-6


def close_runs(a: Path, b: Path) -> float:
    """The largest parameter difference of two checkpoints, relative to each tensor's max."""
    pa, pb = checkpoint.load(a)[0], checkpoint.load(b)[0]
    assert pa.keys() == pb.keys()
    return max(float((pa[k] - pb[k]).abs().max() / pa[k].abs().max()) for k in pa)


@pytest.mark.slow
def test_edge_train_on_two_processes_matches_one_and_resumes_exactly(tmp_path):
    one = _edge([*ARGS, "--epochs", "2", "--out", str(tmp_path / "one")], 1)
    two = _edge([*ARGS, "--epochs", "2", "--out", str(tmp_path / "two")], 2)
    assert close_runs(tmp_path / "one", tmp_path / "two") < PARAM_RTOL
    for a, b in zip(one["history"], two["history"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= LOSS_RTOL * abs(a["loss"])
    assert two["probe_accuracy"] is not None and two["train_images"] == 256
    saved = checkpoint.load(tmp_path / "two")[0]
    assert checkpoint.weights_digest(saved) == two["weights_digest"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        ["checkpoint.safetensors", "result.json"]
    # resume: epoch 1 on two processes, then epoch 2 resumed on two: bit for bit
    _edge([*ARGS, "--epochs", "1", "--out", str(tmp_path / "split")], 2)
    resumed = _edge([*ARGS, "--epochs", "2", "--resume", "--out", str(tmp_path / "split")], 2)
    assert resumed["weights_digest"] == two["weights_digest"]


def test_configurations_it_cannot_run_are_refused_before_starting():
    with pytest.raises(EdgeError, match="does not split over 3 ranks"):
        D.check(TrainConfig(batch_size=64), 3)
    with pytest.raises(EdgeError, match="fp32 torch step"):
        D.check(TrainConfig(quant="int8"), 2)
    with pytest.raises(EdgeError, match="valid: data, pipeline"):
        D.check(TrainConfig(), 2, "model")
    with pytest.raises(EdgeError, match="drop --alignment"):
        D.check(TrainConfig(alignment=True), 2, "pipeline")
    with pytest.raises(EdgeError, match="valid: data, pipeline"):
        D.launch(["train"], 2, "tensor")
    D.check(TrainConfig(batch_size=66), 3)


def test_a_failing_worker_stops_the_group_with_one_line(tmp_path):
    """Every rank refuses a batch that does not split: exit 2, rank 0's one-line error."""
    code = "import sys; from edge.app.distributed import launch; sys.exit(launch(sys.argv[1:], 2))"
    r = subprocess.run([sys.executable, "-c", code, "train", *ARGS, "--batch-size", "33",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --batch-size 33 does not split over 2 ranks; use a multiple of 2"]
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_full_benchmark_smoke_runs_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.full", "--smoke", "--out",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["smoke"] and res["rows"]
    for row in res["rows"]:
        assert 0 <= row["probe"]["edge"] <= 1, row
    assert {row["rule"] for row in res["rows"]} >= {"clapp++", "bp-infonce"}
    assert any(row["resumed_from_epoch"] for row in res["rows"])


def test_cli_nproc_relaunches_itself_without_the_launcher_option(capsys):
    from edge.app.cli import _without_launch_options, main

    assert _without_launch_options(["train", "--nproc", "2", "--epochs", "1", "--nproc=3"]) \
        == ["train", "--epochs", "1"]
    for args, msg in ((["--parallel", "ring"], "unknown --parallel 'ring'; valid: data, "
                       "pipeline"), (["--nproc", "0"], "--nproc must be >= 1, got 0")):
        with pytest.raises(SystemExit) as e:
            main(["train", *args])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_cli_nproc_two_is_the_launcher(tmp_path):
    """`edge train --nproc 2` is `launch(argv, 2)`: the same run as the test's launcher."""
    via_cli = subprocess.run([sys.executable, "-m", "edge", "train", *ARGS, "--epochs", "1",
                              "--nproc", "2", "--out", str(tmp_path / "cli"), "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert via_cli.returncode == 0, via_cli.stderr[-2000:]
    direct = _edge([*ARGS, "--epochs", "1", "--out", str(tmp_path / "direct")], 2)
    assert json.loads(via_cli.stdout)["weights_digest"] == direct["weights_digest"]
