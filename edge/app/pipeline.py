"""Layer-pipelined local training: rank r owns a contiguous group of blocks, forward messages
only (`EDGE_PARALLEL=pipeline` with torchrun, or `launch(argv, N, "pipeline")`).

Schedule (block l on batch t - stage(l)): at tick k, stage r runs step k - r. Stage 0 builds
the rule's stacked streams of batch t; stage r > 0 receives them from stage r - 1 as the
input of its first block. The stage runs `stage_step` (the body of `edge.step.local_step`,
`block_step`, over its own blocks), sends its last block's output to stage r + 1 (async; at
most `DEPTH` sends in flight) and goes on with batch t + 1. Nothing flows back.

What it equals. A local rule's block update at step t reads its own weights and state after
step t - 1 and its input, computed by the blocks below with THEIR weights after step t - 1
(`local_step` runs block i - 1 forward before updating it). In the pipeline, stage r runs
batch t after its own batches < t, on an input that stage r - 1 computed while running batch
t, i.e. also with its weights after batches < t. So the pipelined run is the one-process run
of `local_step` on the same batches in the same order, operation for operation: nothing is
stale, and the result is the same up to the kernels' own rounding (bitwise with the same
kernels and thread counts). The skew buys overlap: while stage r works on batch t, stage
r - 1 already works on batch t + 1.

Rules with a whole-network context (clapp++dfb, clapp++both) read the top block's code of
batch t before any block updates on it: in a pipeline that is a backward message (or a
different, stale rule), so they are refused, as are the global baselines. At the end of an
epoch the stages drain (checkpoint: every rank all-gathers the others' blocks, rank 0 writes),
a bubble of R - 1 steps an epoch. The step loss a stage reports is its own blocks'; the
epoch loss is summed over the stages (`Comm.epoch_loss`).

Stages: contiguous block ranges balancing the per-sample cost (a block's multiply-adds plus
its predictor's size), or the first blocks of stages 1.. from EDGE_PIPELINE_SPLIT ("2,4").
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from edge.app.train import FloatEngine
from edge.errors import EdgeError
from edge.layers import EAGER
from edge.step import block_step

DEPTH = 2  # sends in flight per stage
_BLOCK = re.compile(r"(?:^|\.)(?:enc|rule)\.(\d+)\.")


def block_of(key: str, n_blocks: int) -> int | None:
    """The block a parameter or state entry belongs to (head.*: the top block; step: none)."""
    m = _BLOCK.search(key)
    if m:
        return int(m.group(1))
    return n_blocks - 1 if key.startswith("head.") else None


def split(costs: list[float], stages: int) -> list[int]:
    """First block of each stage after the first: contiguous ranges minimising the largest
    stage cost (ties: the earliest boundaries)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise EdgeError(f"{stages} pipeline stages need at least {stages} blocks; the network "
                        f"has {n}")
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + c)
    # best[s][j]: the smallest largest-stage cost of blocks [0, j) in s stages
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], pre[j] - pre[i])
                if v < best[s][j]:
                    best[s][j], cut[s][j] = v, i
    bounds, j = [], n
    for s in range(stages, 1, -1):
        j = cut[s][j]
        bounds.append(j)
    return bounds[::-1]


def block_costs(net: Any, params: dict[str, Tensor]) -> list[float]:
    """Per-sample cost of each block's step: its multiply-adds plus its predictor's size."""
    costs = [float(m) for m in net.macs()]
    for k, v in params.items():
        if k.startswith("rule."):
            costs[int(k.split(".")[1])] += float(v.numel())
    return costs


def stage_step(net: Any, rule: Any, opt: Any, params: dict, state: dict, x: Any,
               blocks: range, step: Tensor, ex: Any = EAGER, head: Any = None,
               labels: Tensor | None = None) -> tuple[Any, dict, dict, list[Tensor]]:
    """`edge.step.local_step` restricted to `blocks` from their input x: -> (the last
    block's next input, new params, new state, the blocks' losses). The rule must need no
    context; `head` learns on the top block's output if it is among `blocks`."""
    new_params, new_state, losses = dict(params), dict(state), []
    for i in blocks:
        x, p, s, loss = block_step(net, rule, opt, ex, i, params, state, x, None, step)
        new_params.update(p)
        new_state.update(s)
        losses.append(loss)
    if head is not None and blocks.stop == len(net.blocks):
        new_state.update(head.update(ex, x, labels, state))
    new_state["step"] = step
    return x, new_params, new_state, losses


class PipelineEngine(FloatEngine):
    """`edge.app.train.FloatEngine` as one pipeline stage (module docstring). Every rank keeps
    whole-network dicts; its own blocks' entries are current, the others' are refreshed by
    `tensors` (at the end of every epoch)."""

    def __init__(self, comm: Any, device: str = "cpu", head: Any = None):
        super().__init__(None, device, head)
        self.comm = comm
        self.sends: deque = deque()

    def bind(self, net: Any, rule: Any, opt: Any) -> None:
        if not rule.is_local:
            raise EdgeError(f"{rule.name} backpropagates through the whole network; the "
                            "pipelined mode trains local rules (use data parallel)")
        if rule.needs_context:
            raise EdgeError(f"{rule.name} needs the top block's code before the lower blocks "
                            "update, a backward message the pipeline has not; use data parallel")
        if self.comm.world > len(net.blocks):
            raise EdgeError(f"{self.comm.world} pipeline stages need at least "
                            f"{self.comm.world} blocks; {net.name} has {len(net.blocks)}")
        self.net, self.rule, self.opt = net, rule, opt

    def resume(self, params: dict, state: dict, meta: dict) -> None:
        super().resume(params, state, meta)
        bounds = self.comm.bounds or split(block_costs(self.net, params), self.comm.world)
        if len(bounds) != self.comm.world - 1 or bounds != sorted(set(bounds)) or \
                not 0 < bounds[0] <= bounds[-1] < len(self.net.blocks):
            raise EdgeError(f"EDGE_PIPELINE_SPLIT={','.join(map(str, bounds))} must list "
                            f"{self.comm.world - 1} increasing first blocks in 1.."
                            f"{len(self.net.blocks) - 1}")
        edges = [0, *bounds, len(self.net.blocks)]
        self.blocks = range(edges[self.comm.rank], edges[self.comm.rank + 1])

    def step(self, v1: Tensor, v2: Tensor, gen: torch.Generator,
             labels: Tensor | None = None) -> dict:
        rank, net = self.comm.rank, self.net
        if rank == 0:
            x = self.rule.inputs(v1, v2)
        else:
            shape = net.block_inputs()[self.blocks.start]
            x = torch.empty((self.rule.streams * int(v1.shape[0]), *shape), dtype=v1.dtype,
                            device=v1.device)
            dist.recv(x, src=rank - 1)
        step = self.state["step"] + 1
        x, new_params, new_state, losses = stage_step(
            net, self.rule, self.opt, self.params, self.state, x, self.blocks, step,
            head=self.head, labels=labels)
        if rank < self.comm.world - 1:
            x = x.contiguous()
            self.sends.append((dist.isend(x, dst=rank + 1), x))
            while len(self.sends) > DEPTH:
                self.sends.popleft()[0].wait()
        layer = torch.stack(losses)
        metrics = {"loss": layer.sum(), "layer_loss": layer}
        if not all(bool(torch.isfinite(new_params[k]).all()) for k in self._own(new_params)):
            return {**metrics, "finite_params": torch.tensor(False)}
        self.params, self.state = new_params, new_state
        return metrics

    def _own(self, d: dict) -> list[str]:
        n = len(self.net.blocks)
        return [k for k in d if block_of(k, n) in self.blocks]

    def tensors(self) -> tuple[dict, dict, dict]:
        """The whole network's parameters and state (a collective: every rank calls it)."""
        while self.sends:
            self.sends.popleft()[0].wait()
        mine = ({k: self.params[k].cpu() for k in self._own(self.params)},
                {k: self.state[k].cpu() for k in self._own(self.state)})
        parts: list[Any] = [None] * self.comm.world
        dist.all_gather_object(parts, mine, group=self.comm.small)
        for p, s in parts:
            self.params.update({k: v.to(self.device) for k, v in p.items()})
            self.state.update({k: v.to(self.device) for k, v in s.items()})
        return self.params, self.state, {}
