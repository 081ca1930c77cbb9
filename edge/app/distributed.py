"""Data-parallel training on torch.distributed, and the launcher behind `edge train --nproc N`.

Who starts it: `torchrun --nproc-per-node N -m edge train ...` or `launch(argv, N)` (what
`edge train --nproc N` calls) start N workers with RANK, WORLD_SIZE, MASTER_ADDR ... set;
`train()` reads them (`from_env`) and trains with the engine built here. `EDGE_PARALLEL`
picks the mode: `data` (default, this module) or `pipeline` (`edge.app.pipeline`). Backend:
NCCL when `--device cuda` (rank r on cuda:LOCAL_RANK), gloo otherwise.

Schedule of one data-parallel step, R ranks, global batch N = R n (`--batch-size` is N):
  1. Every rank draws the same global batch and views (train(): one generator per epoch,
     seeded by (seed, epoch)), builds the rule's stacked streams of the whole batch
     (`rule.inputs`: so Forward-Forward's hybrids are the global batch's), and keeps rows
     [r n, (r + 1) n) of each stream (`ShardedRule.inputs`).
  2. `edge.step.local_step` runs unchanged, the only step loop: block i forward on the shard,
     the rule's dL/dy, the block's adjoint, then `opt.update` per parameter. The optimizer
     here is `ReducingOptimizer`: its update launches an async all-reduce of the gradient and
     returns the parameter unchanged; block i + 1 forwards while block i's gradients travel.
     Reductions found complete at a later update are applied then, the rest when the loop
     ends (`finish`): the base optimizer's update on the mean gradient. Deferring is exact
     because no later block of a step reads block i's new weights (the context of
     clapp++dfb is computed from the incoming weights before the loop).
  3. The layer losses are averaged over the ranks: every rank holds the same parameters,
     state and metrics after every step.

Equality with one process. The negatives pair image i with image i + 1 (mod N) of the GLOBAL
batch: a rank takes the context codes of the first image of the next rank's shard (a halo of
one row per view, all-gathered per block) for its last anchor. With `negatives=K` memories,
the anchor at global position p takes memory row p mod K and every rank pushes all ranks'
view-2 codes in global order. The on-device head updates on all ranks' top-block rows
(gathered) with the global labels. So the
data-parallel step computes the one-process step on the same global batch: the same terms,
summed in another order (per shard, then over ranks; the mean divides by R instead of the
loss's 1/(2N)). In float64 the two agree to rounding (tests: 1e-9 relative); in float32 the
orders differ by rounding, and training amplifies it (a hinge term on its margin switches).

Global baselines (bp-infonce, bp-clapp++): each rank forwards its shard with autograd, the
top-block outputs are all-gathered (other ranks' rows detached), and the rule's own loss runs
on the global batch; a rank's encoder gradient is the global loss's through its own rows,
so encoder gradients are summed over the ranks; the head's (the same on every rank) averaged.

Checkpoints, probes and result.json are written by rank 0 only (`writer`); every rank
resumes from the same checkpoint. Process groups: the default one carries the gradients;
a second (`small`) carries the halo, memory and metric collectives so they never queue
behind a gradient all-reduce.
"""

from __future__ import annotations

import atexit
import functools
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from edge.app.train import FloatEngine
from edge.errors import EdgeError
from edge.step import local_step

MODES = ("data", "pipeline")
ENV_MODE = "EDGE_PARALLEL"


@dataclass
class Comm:
    """This process's place in the group: rank, world size, mode and the side group."""

    rank: int
    world: int
    local_rank: int
    mode: str = "data"
    small: Any = None
    bounds: list[int] | None = field(default=None)  # pipeline: first block of stages 1..
    device: str = "cpu"  # where collectives' own tensors live (NCCL: the rank's GPU)

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def engine(self, cfg: Any, head: Any = None) -> Any:
        """The engine of this mode for `cfg` (train() calls it instead of make_engine)."""
        if self.mode == "pipeline":
            from edge.app.pipeline import PipelineEngine

            return PipelineEngine(self, cfg.device, head)
        return DataParallelEngine(self, cfg.device, head)

    def epoch_loss(self, total: float) -> float:
        """An epoch's summed step losses over the whole network (pipeline: over stages)."""
        if self.mode != "pipeline":
            return total  # every rank already holds the global loss
        t = torch.tensor([total], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.small)
        return float(t)

    def gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's `t` (same shape everywhere), in rank order, on the side group."""
        t = t.detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.small)
        return parts

    def shard(self, n_global: int) -> slice:
        n = n_global // self.world
        return slice(self.rank * n, (self.rank + 1) * n)


def check(cfg: Any, world: int, mode: str = "data") -> None:
    """EdgeError if `cfg` cannot run on `world` processes in `mode` (before any is started)."""
    if mode not in MODES:
        raise EdgeError(f"unknown {ENV_MODE}={mode!r}; valid: {', '.join(MODES)}")
    if world < 1:
        raise EdgeError(f"--nproc must be >= 1, got {world}")
    if cfg.quant != "fp32" or cfg.runtime != "torch":
        raise EdgeError("--nproc runs the fp32 torch step; drop --quant and --runtime")
    if mode == "data" and cfg.batch_size % world:
        raise EdgeError(f"--batch-size {cfg.batch_size} does not split over {world} ranks; "
                        f"use a multiple of {world}")
    if mode == "pipeline" and cfg.alignment:
        raise EdgeError("--alignment reads the whole network each step; the pipelined mode "
                        "holds one stage per rank: drop --alignment or use data parallel")


def from_env(cfg: Any) -> Comm | None:
    """The group torchrun (or `launch`) describes in the environment, joined; None when
    WORLD_SIZE is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    mode = os.environ.get(ENV_MODE, "data")
    check(cfg, world, mode)
    split = os.environ.get("EDGE_PIPELINE_SPLIT", "")
    try:
        bounds = [int(b) for b in split.split(",")] if split else None
    except ValueError:
        raise EdgeError(f"EDGE_PIPELINE_SPLIT={split!r}: want the first block of every "
                        "stage after the first, e.g. 2,4") from None
    return connect(mode, cuda=cfg.device.startswith("cuda"), bounds=bounds)


def connect(mode: str = "data", cuda: bool = False, bounds: list[int] | None = None) -> Comm:
    """Join (or reuse) the default process group from the env:// variables."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if cuda:
            if not torch.cuda.is_available():
                raise EdgeError("--device cuda: no CUDA device here; use --device cpu (gloo)")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
        # Exiting with the group alive lets gloo's worker threads outlive the interpreter:
        # an intermittent "terminate called without an active exception" abort at exit
        # (pytorch/pytorch#190489). The group edge made, edge destroys.
        atexit.register(_destroy_group)
    key = id(dist.group.WORLD)  # one side group per default group (new_group is collective)
    if key not in _SIDE:
        _SIDE[key] = dist.new_group(backend=dist.get_backend())
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    return Comm(dist.get_rank(), dist.get_world_size(), local, mode, _SIDE[key], bounds, device)


_SIDE: dict[int, Any] = {}


def _destroy_group() -> None:
    if dist.is_initialized():
        _SIDE.clear()
        dist.destroy_process_group()


# ----------------------------------------------------------------------- gradient reduction
@dataclass
class _Pending:
    name: str
    p: Tensor
    g: Tensor
    state: dict
    step: Tensor
    noise: Any
    work: Any


class ReducingOptimizer:
    """An optimizer (`edge.optim.OptimConfig`) whose update all-reduces the gradient first.

    `update` launches the async all-reduce (sum) and returns (p, {}); the real update is the
    base optimizer's on `scale(name) *` the summed gradient, applied once the reduction is
    done: at a later `update` call if it has completed, else in `finish`."""

    def __init__(self, base: Any, scale: Any):
        self.base, self.scale = base, scale
        self.pending: list[_Pending] = []
        self.done: dict[str, tuple[Tensor, dict[str, Tensor]]] = {}

    def init_state(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.base.init_state(params)

    def update(self, name: str, p: Tensor, g: Tensor, state: dict[str, Tensor], step: Tensor,
               noise: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        self._apply(wait=False)
        g = g.contiguous()
        self.pending.append(_Pending(name, p, g, state, step, noise,
                                     dist.all_reduce(g, async_op=True)))
        return p, {}

    def _apply(self, wait: bool) -> None:
        keep = []
        for job in self.pending:
            if wait or job.work.is_completed():
                job.work.wait()
                g = job.g * self.scale(job.name)
                update = getattr(self.base, "update_eager", self.base.update)
                self.done[job.name] = update(job.name, job.p, g, job.state, job.step, job.noise)
            else:
                keep.append(job)
        self.pending = keep

    def finish(self, params: dict[str, Tensor], state: dict[str, Tensor]) -> None:
        """Wait for every reduction of the step and write its update into params/state."""
        self._apply(wait=True)
        for name, (p, upd) in self.done.items():
            params[name] = p
            state.update(upd)
        self.done = {}


# ----------------------------------------------------------------------------- local rules
class ShardedRule:
    """A local rule on rank r's shard that computes the global batch's step (module
    docstring): the global streams sharded, the CLAPP family's negatives across shards."""

    def __init__(self, rule: Any, comm: Comm):
        self.rule, self.comm = rule, comm
        from edge.rules.hinge import HingeRule

        self.hinge = isinstance(rule, HingeRule)

    def __getattr__(self, key: str) -> Any:
        return getattr(self.rule, key)

    def inputs(self, x1: Tensor, x2: Tensor) -> Tensor:
        x = self.rule.inputs(x1, x2)
        n_global = int(x1.shape[0])
        sl = self.comm.shard(n_global)
        return torch.cat([x[s * n_global + sl.start : s * n_global + sl.stop]
                          for s in range(self.rule.streams)])

    def output_grads(self, i, ex, y, params, ctx, state=None):
        if not self.hinge:  # Forward-Forward: per-sample terms, a mean over the batch
            return self.rule.output_grads(i, ex, y, params, ctx, state)
        from edge.rules.hinge import hinge_grads, push

        rule, comm = self.rule, self.comm
        code = rule.codes[i]
        z, zs = code.forward(ex, y)
        n = z.shape[0] // 2
        loss, gz1, gz2, grads, new = z.new_zeros(()), 0, 0, {}, {}
        for prefix, kind in rule.terms:
            c = rule._contexts(kind, z, ctx)
            c1, c2 = c[:n], c[n:]
            if rule.negatives:
                key = rule.mem_key(i, kind)
                mem = state[key]
                rows = (torch.arange(n, device=mem.device) + comm.rank * n) % mem.shape[0]
                neg1 = neg2 = mem[rows]
                if kind == "same" or i == len(rule.codes) - 1:
                    new[key] = push(mem, torch.cat(comm.gather(c2)))
            else:  # the next shard's first image closes this shard's ring
                halo = comm.gather(torch.stack((c1[0], c2[0])))[(comm.rank + 1) % comm.world]
                neg1 = torch.cat((c2[1:], halo[1:2]))
                neg2 = torch.cat((c1[1:], halo[0:1]))
            term, g1, g2, gP = hinge_grads(z[:n], z[n:], c1, c2, rule._pred(i, prefix, params, ex),
                                           neg1, neg2)
            loss, gz1, gz2 = loss + term, gz1 + g1, gz2 + g2
            grads.update({f"rule.{i}.{prefix}{k}": g for k, g in gP.items()})
        return loss, code.adjoint(ex, zs, torch.cat((gz1, gz2))), grads, new


class ShardedHead:
    """The on-device head fed the global batch: the top block's view-1 rows of every shard,
    gathered, with the global labels (its update is then the one-process update)."""

    def __init__(self, head: Any, comm: Comm):
        self.head, self.comm = head, comm

    def update(self, ex: Any, y: Tensor, labels: Tensor, state: dict) -> dict:
        n = int(labels.shape[0]) // self.comm.world
        return self.head.update(ex, torch.cat(self.comm.gather(y[:n])), labels, state)


# ------------------------------------------------------------------------ global baselines
class _Pass:
    def forward(self, ex: Any, i: int, params: dict, x: Tensor) -> tuple[Tensor, None]:
        return x, None


@dataclass
class _TopOnly:
    """A network whose blocks pass their input on: a baseline's loss on given top outputs."""

    blocks: list


def sharded_bp_step(net: Any, rule: Any, opt: ReducingOptimizer, comm: Comm,
                    params: dict[str, Tensor], state: dict[str, Tensor], x1: Tensor, x2: Tensor,
                    donate: bool = False) -> tuple[dict, dict, dict]:
    """`edge.baselines.step.bp_step` on rank r's shard of the global batch (x1, x2)."""
    from edge.layers import EAGER

    sl = comm.shard(int(x1.shape[0]))
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    y = torch.cat((x1[sl], x2[sl]))
    for i, block in enumerate(net.blocks):
        y, _ = block.forward(EAGER, i, leaves, y)
    parts = comm.gather(y)
    parts[comm.rank] = y
    n = y.shape[0] // 2
    top = _TopOnly([_Pass()] * len(net.blocks))
    loss = rule.loss(top, leaves, torch.cat([p[:n] for p in parts]),
                     torch.cat([p[n:] for p in parts]))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    step = state["step"] + 1
    new_params, new_state = dict(params), dict(state)
    with torch.no_grad():
        for (name, p), g in zip(params.items(), grads, strict=True):
            opt.update(name, p, g, state, step)
    new_state["step"] = step
    loss = loss.detach()
    return new_params, new_state, {"loss": loss, "layer_loss": loss.reshape(1)}


# --------------------------------------------------------------------------------- engine
class DataParallelEngine(FloatEngine):
    """`edge.app.train.FloatEngine` whose step is the data-parallel step (module docstring);
    `step` takes the global batch's views (and labels) and shards them itself."""

    def __init__(self, comm: Comm, device: str = "cpu", head: Any = None):
        super().__init__(None, device, head)
        self.comm = comm

    def bind(self, net: Any, rule: Any, opt: Any) -> None:
        self.net, self.rule, self.opt = net, rule, opt
        world = self.comm.world
        if rule.is_local:
            self.reducer = ReducingOptimizer(opt, lambda name: 1.0 / world)
            inner = functools.partial(local_step, net, ShardedRule(rule, self.comm),
                                      self.reducer)
        else:
            enc = set(net.param_shapes())
            self.reducer = ReducingOptimizer(opt, lambda name: 1.0 if name in enc else 1 / world)
            inner = functools.partial(sharded_bp_step, net, rule, self.reducer, self.comm)
        self.step_fn = functools.partial(self._dp_step, inner)

    def _dp_step(self, inner: Any, params: dict, state: dict, v1: Tensor, v2: Tensor,
                 donate: bool = False, head: Any = None, labels: Tensor | None = None):
        extra = {} if head is None else {"head": ShardedHead(head, self.comm), "labels": labels}
        new_params, new_state, metrics = inner(params, state, v1, v2, donate=False, **extra)
        self.reducer.finish(new_params, new_state)
        layer = metrics["layer_loss"].detach().clone()
        dist.all_reduce(layer, group=self.comm.small)
        layer = layer / self.comm.world
        return new_params, new_state, {**metrics, "loss": layer.sum(), "layer_loss": layer}


# -------------------------------------------------------------------------------- launcher
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(argv: list[str], nproc: int, mode: str = "data", threads: int | None = None) -> int:
    """Run `python -m edge *argv` as `nproc` local workers of one group (what torchrun
    would set up: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) in `mode`.
    Rank 0's output is shown; the others' stdout is dropped and their stderr shown only if
    they fail alone. If a worker fails the others are stopped. -> rank 0's exit status (or
    the first failure's)."""
    if mode not in MODES:
        raise EdgeError(f"unknown parallel mode {mode!r}; valid: {', '.join(MODES)}")
    if nproc < 1:
        raise EdgeError(f"--nproc must be >= 1, got {nproc}")
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": os.environ.get("MASTER_PORT") or str(free_port()),
           "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), ENV_MODE: mode,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    procs, logs = [], []
    for r in range(nproc):
        log = None if r == 0 else tempfile.TemporaryFile()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "edge", *argv],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=None if r == 0 else subprocess.DEVNULL, stderr=log))
        logs.append(log)
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            time.sleep(0.05)
    except KeyboardInterrupt:
        for p in procs:
            p.wait()
    codes = [p.wait() for p in procs]
    for r, (code, log) in enumerate(zip(codes, logs, strict=True)):
        if log is not None:
            if code not in (0, -15) and codes[0] == 0:
                log.seek(0)
                sys.stderr.write(f"[rank {r}] " + log.read().decode(errors="replace"))
            log.close()
    return codes[0] if codes[0] != 0 else next((c for c in codes if c != 0), 0)
