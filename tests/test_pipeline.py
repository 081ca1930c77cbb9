"""Layer-pipelined local training (gloo, CPU processes): stage r runs step t - r of its own
blocks on what stage r - 1 sent; the run equals one process stepping the same batches in order
(bitwise at equal thread counts), through the launcher too; context rules are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge.app import distributed as D
from edge.app.config import TrainConfig
from edge.app.pipeline import PipelineEngine, block_costs, block_of, split, stage_step
from edge.app.train import FloatEngine, build, optim
from edge.data import load, two_views, view_config
from edge.errors import EdgeError
from edge.step import local_step

SMALL = dict(data="digits", subset=256, batch_size=32, width=0.25, net="digits")
CASES = [("clapp++", {}), ("ff", {}), ("clapp", {"negatives": "memory:5"}),
         ("clapp++", {"head_labels": 3})]
STEPS = 4
ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--rule", "clapp++", "--data", "digits", "--subset", "256", "--batch-size", "32",
        "--width", "0.25"]


def _run(make_engine, rule: str, extra: dict) -> tuple[dict, dict, list]:
    cfg = TrainConfig(rule=rule, **{**SMALL, **extra})
    ds = load(cfg.data, None, cfg.subset)
    net, rule_obj, params = build(cfg, ds.in_shape)
    head = None
    if cfg.head_labels:
        from edge.head import PrototypeHead

        head = PrototypeHead(ds.num_classes, net.shapes()[-1])
    engine = make_engine(head)
    engine.bind(net, rule_obj, optim(cfg))
    engine.start(params, [])
    gen = torch.Generator().manual_seed(2)
    views, losses = view_config("edge", ds), []
    for _ in range(STEPS):
        idx = torch.randperm(ds.x_ssl.shape[0], generator=gen)[: cfg.batch_size]
        v1, v2 = two_views(ds.x_ssl[idx], gen, views, ds.mean, ds.std)
        labels = torch.where(idx % 3 == 0, ds.y_train[idx], -1)
        losses.append(engine.step(v1, v2, None, labels)["layer_loss"])
    params, state, _ = engine.tensors()
    return params, state, losses


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    comm = D.connect("pipeline")
    results = [_run(lambda head: PipelineEngine(comm, head=head), r, e) for r, e in CASES]
    torch.save(results, f"{out}.{rank}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _spawn(world: int, out: Path) -> list:
    ctx = torch.multiprocessing.get_context("spawn")
    port = D.free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * world
    return [torch.load(f"{out}.{r}") for r in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_pipelined_run_is_the_sequential_run(tmp_path, world):
    """Every stage ends with the one-process run's weights and state, bit for bit; each
    stage's losses are the one-process step's layer losses of its own blocks."""
    ranks = _spawn(world, tmp_path / "pp.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' kernels, for bitwise equality
    try:
        refs = [_run(lambda head: FloatEngine(head=head), r, e) for r, e in CASES]
    finally:
        torch.set_num_threads(threads)
    for c, ((rule, extra), (ref_p, ref_s, ref_l)) in enumerate(zip(CASES, refs, strict=True)):
        for params, state, _ in (r[c] for r in ranks):
            assert params.keys() == ref_p.keys() and state.keys() == ref_s.keys()
            for k in ref_p:
                assert torch.equal(params[k], ref_p[k]), (rule, extra, k)
            for k in ref_s:
                assert torch.equal(state[k], ref_s[k]), (rule, extra, k)
        stage_losses = torch.cat([torch.stack(r[c][2]) for r in ranks], 1)  # step, block
        assert torch.equal(stage_losses, torch.stack(ref_l))


def test_stage_steps_chained_are_local_step():
    """The loop the stages share: blocks [0, 1) then [1, 3) chained is local_step."""
    cfg = TrainConfig(rule="clapp++", **SMALL)
    net, rule, params = build(cfg, (1, 8, 8))
    opt = optim(cfg)
    engine = FloatEngine()
    engine.bind(net, rule, opt)
    engine.start(params, [])
    x1, x2 = torch.randn(2, 8, 1, 8, 8).unbind(0)
    ref_p, ref_s, ref_m = local_step(net, rule, opt, engine.params, engine.state, x1, x2)
    step = engine.state["step"] + 1
    x, p, s, losses = stage_step(net, rule, opt, engine.params, engine.state,
                                 rule.inputs(x1, x2), range(0, 1), step)
    _, p, s, more = stage_step(net, rule, opt, p, s, x, range(1, 3), step)
    assert all(torch.equal(p[k], ref_p[k]) for k in ref_p)
    assert all(torch.equal(s[k], ref_s[k]) for k in ref_s)
    assert torch.equal(torch.stack(losses + more), ref_m["layer_loss"])


def test_split_balances_contiguous_stages():
    assert split([1, 1, 1, 1], 2) == [2]
    assert split([5, 1, 1, 1, 1, 1], 2) == [1]
    assert split([1, 2, 3, 4, 5, 6], 3) == [3, 5]  # stage costs 6, 9, 6
    assert split([3, 3], 2) == [1] and split([7], 1) == []
    with pytest.raises(EdgeError, match="3 pipeline stages need at least 3 blocks"):
        split([1, 1], 3)
    net, _, params = build(TrainConfig(rule="clapp++", **SMALL), (1, 8, 8))
    costs = block_costs(net, params)
    assert len(costs) == 3 and all(c > m for c, m in zip(costs, net.macs(), strict=True))
    assert block_of("m.enc.2.0.w", 3) == 2 and block_of("mem.rule.1.z", 3) == 1
    assert block_of("head.sum", 3) == 2 and block_of("step", 3) is None


@pytest.mark.parametrize("rule", ["clapp++dfb", "clapp++both", "bp-infonce"])
def test_rules_the_pipeline_cannot_run_are_refused(rule):
    cfg = TrainConfig(rule=rule, **SMALL)
    net, rule_obj, _ = build(cfg, (1, 8, 8))
    comm = D.Comm(rank=0, world=2, local_rank=0, mode="pipeline")
    with pytest.raises(EdgeError, match="use data parallel"):
        PipelineEngine(comm).bind(net, rule_obj, optim(cfg))
    with pytest.raises(EdgeError, match="4 pipeline stages need at least 4 blocks"):
        PipelineEngine(D.Comm(0, 4, 0, "pipeline")).bind(
            net, build(TrainConfig(rule="clapp++", **SMALL), (1, 8, 8))[1], optim(cfg))


@pytest.mark.slow
def test_pipelined_edge_train_equals_one_process(tmp_path):
    one = _edge([*ARGS, "--epochs", "2", "--out", str(tmp_path / "one")], 1)
    two = _edge([*ARGS, "--epochs", "2", "--out", str(tmp_path / "two")], 2, "pipeline")
    assert two["weights_digest"] == one["weights_digest"]
    assert two["probe_accuracy"] == one["probe_accuracy"]
    _edge([*ARGS, "--epochs", "1", "--out", str(tmp_path / "split")], 2, "pipeline")
    resumed = _edge([*ARGS, "--epochs", "2", "--resume", "--out", str(tmp_path / "split")], 2,
                    "pipeline")
    assert resumed["weights_digest"] == one["weights_digest"]
    # the step loss: one float32 sum of the layer losses, or the stages' partial float32 sums
    # added in float64: a few float32 roundings apart
    for a, b in zip(one["history"], two["history"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"])


def _edge(args: list[str], nproc: int, mode: str = "data") -> dict:
    """`edge train ... --json` through the launcher (one thread a worker); its JSON."""
    code = ("import sys; from edge.app.distributed import launch; "
            f"sys.exit(launch(sys.argv[1:], {nproc}, {mode!r}, threads=1))")
    r = subprocess.run([sys.executable, "-c", code, "train", *args, "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)
