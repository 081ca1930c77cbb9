"""Where `edge simulate` gets its graphs: a bundle directory, or a rule built on the spot.

For a rule, the local step is exported exactly as `edge export` would (the same options:
quantization and mode, optimizer, hyper-parameters, operator profile, per-block graphs), and
the backprop side is the same network trained with BP-InfoNCE, traced through autograd into
its real forward+backward graph (`edge.sim.backprop.joint_schedule`), never a formula. An
integer step is calibrated on random normal views: its memory depends on shapes and dtypes,
not on the calibrated exponents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import torch

from edge.app.commands import IN_SHAPES
from edge.app.config import TrainConfig
from edge.errors import EdgeError
from edge.sim.schedule import Schedule


def from_bundle(bundle: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    from export.bundle import check_bundle

    manifest = check_bundle(bundle)
    model = onnx.load(str(Path(bundle) / manifest.step.file))
    return model, manifest.step.memory_view()


def layers_from_bundle(bundle: Path) -> list[tuple[onnx.ModelProto, dict[str, Any]]]:
    """The bundle's per-layer graphs with their manifest views ([] if it has none)."""
    from export.bundle import check_bundle

    manifest = check_bundle(bundle)
    return [(onnx.load(str(Path(bundle) / io.file)), io.memory_view()) for io in manifest.layers]


def in_shape(data: str) -> tuple[int, ...]:
    if data in IN_SHAPES:
        return IN_SHAPES[data]
    from edge.data import load

    return load(data).in_shape


def program_for(cfg: TrainConfig, batch: int):
    """(net, rule, program, params, state) of the step `cfg` describes."""
    from edge.app.train import build, optim
    from export.step import fp32_program, integer_program, require_local

    shape = in_shape(cfg.data)
    net, rule, params = build(cfg, shape)
    require_local(rule)
    opt = optim(cfg)
    if cfg.quant == "fp32":
        from edge.step import init_state

        return net, rule, fp32_program(net, rule, opt), params, init_state(net, rule, opt, params)
    if cfg.mode != "integer":
        raise EdgeError("--mode qat steps are fp32 graphs; simulate --quant fp32, or --mode "
                        "integer for the integer step")
    from quant.calibrate import make_plan
    from quant.integer import rule_state

    gen = torch.Generator().manual_seed(cfg.seed)
    views = [(torch.randn(batch, *shape, generator=gen), torch.randn(batch, *shape,
                                                                     generator=gen))]
    plan, stores = make_plan(net, rule, params, views, cfg.quant, opt.lr)
    state = {"step": torch.zeros((), dtype=torch.int64),
             **rule_state(net, rule.integer_form(net), plan, stores)}
    return net, rule, integer_program(net, rule, plan, stores), stores, state


def from_rule(cfg: TrainConfig, batch: int, profile: str = "plain"
              ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    from export.step import step_graph

    net, rule, program, params, state = program_for(cfg, batch)
    model, manifest = step_graph(net, rule, program, params, state, batch, profile=profile)
    return model, manifest.step.memory_view()


def layers_from_rule(cfg: TrainConfig, batch: int, profile: str = "plain"
                     ) -> list[tuple[onnx.ModelProto, dict[str, Any]]]:
    """Per-block graphs as `edge export --per-layer` writes them; [] for a rule that needs a
    whole-network context (its blocks cannot train one graph at a time)."""
    from export.step import block_graphs

    net, rule, program, params, state = program_for(cfg, batch)
    if program.block is None:
        return []
    models, ios = block_graphs(net, rule, program, params, state, batch, profile=profile)
    return [(m, io.memory_view()) for m, io in zip(models, ios, strict=True)]


def backprop_schedule(cfg: TrainConfig, batch: int) -> Schedule:
    """BP-InfoNCE on the same network: one SGD step, traced through autograd."""
    from dataclasses import replace

    from edge.app.train import build
    from edge.sim.backprop import joint_schedule

    shape = in_shape(cfg.data)
    net, rule, params = build(replace(cfg, rule="bp-infonce", rule_hparams={}, quant="fp32",
                                      negatives="batch", head_labels=0),
                              shape)
    names = list(params)
    x = torch.zeros(batch, *shape)

    def step(*args: torch.Tensor):
        p = dict(zip(names, args[: len(names)], strict=True))
        loss = rule.loss(net, p, args[-2], args[-1])
        grads = torch.autograd.grad(loss, list(p.values()))
        return tuple(w - 1e-3 * g for w, g in zip(p.values(), grads, strict=True))

    n = len(names)
    return joint_schedule(step, *params.values(), x, x.clone(), params=range(n),
                          bindings={i: i for i in range(n)}, name=f"bp-infonce-{net.name}")


def manifest_file(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeError(f"cannot read manifest {path}: {e}") from None
