"""Where `edge simulate` gets its graphs: a bundle directory, or a rule built on the spot.

For a rule, the local step is exported exactly as `edge export` would (fp32, AdamW), and the
backprop side is the same network trained with BP-InfoNCE, traced through autograd into its
real forward+backward graph (`edge.sim.backprop.joint_schedule`), never a formula.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import torch

from edge.app.commands import IN_SHAPES
from edge.errors import EdgeError
from edge.sim.schedule import Schedule


def from_bundle(bundle: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    from export.bundle import check_bundle

    manifest = check_bundle(bundle)
    model = onnx.load(str(Path(bundle) / manifest.step.file))
    return model, manifest.step.memory_view()


def _net_rule(rule_name: str, data: str, net_name: str | None, width: float):
    from edge import rules
    from edge.nets import default_preset, init_params, preset

    if data not in IN_SHAPES:
        raise EdgeError(f"unknown data set {data!r}; valid: {', '.join(IN_SHAPES)}")
    net = preset(net_name or default_preset(data), IN_SHAPES[data], width)
    rule = rules.get(rule_name)
    rule.check(net)
    gen = torch.Generator().manual_seed(0)
    params = init_params(net, gen)
    params.update(rule.init(net, gen))
    return net, rule, params


def layers_from_bundle(bundle: Path) -> list[tuple[onnx.ModelProto, dict[str, Any]]]:
    """The bundle's per-layer graphs with their manifest views ([] if it has none)."""
    from export.bundle import check_bundle

    manifest = check_bundle(bundle)
    return [(onnx.load(str(Path(bundle) / io.file)), io.memory_view()) for io in manifest.layers]


def layers_from_rule(
    rule_name: str, data: str, net_name: str | None, width: float, batch: int
) -> list[tuple[onnx.ModelProto, dict[str, Any]]]:
    """Per-layer graphs as `edge export --per-layer` writes them; [] for a rule that needs a
    whole-network context (its layers cannot train one graph at a time)."""
    from edge.optim import OptimConfig
    from export.layers import layer_step_graphs
    from export.program import fp32_program

    net, rule, params = _net_rule(rule_name, data, net_name, width)
    opt = OptimConfig("adamw", lr=1e-3)
    if fp32_program(net, rule, opt).layer is None:
        return []
    models, ios = layer_step_graphs(net, rule, opt, params, opt.init_state(params), batch)
    return [(m, io.memory_view()) for m, io in zip(models, ios, strict=True)]


def from_rule(
    rule_name: str, data: str, net_name: str | None, width: float, batch: int
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    from edge.optim import OptimConfig
    from export.training_step import training_step

    net, rule, params = _net_rule(rule_name, data, net_name, width)
    opt = OptimConfig("adamw", lr=1e-3)
    model, manifest = training_step(net, rule, opt, params, opt.init_state(params), batch)
    return model, manifest.step.memory_view()


def backprop_schedule(data: str, net_name: str | None, width: float, batch: int) -> Schedule:
    """BP-InfoNCE on the same network: one SGD step, traced through autograd."""
    from edge.sim.backprop import joint_schedule

    net, rule, params = _net_rule("bp-infonce", data, net_name, width)
    names = list(params)
    x = torch.zeros(batch, *IN_SHAPES[data])

    def step(*args: torch.Tensor):
        p = dict(zip(names, args[: len(names)], strict=True))
        loss = rule.loss(net, p, args[-2], args[-1])
        grads = torch.autograd.grad(loss, list(p.values()))
        return tuple(w - 1e-3 * g for w, g in zip(p.values(), grads, strict=True))

    n = len(names)
    return joint_schedule(
        step,
        *params.values(),
        x,
        x.clone(),
        params=range(n),
        bindings={i: i for i in range(n)},
        name=f"bp-infonce-{net.name}",
    )


def manifest_file(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeError(f"cannot read manifest {path}: {e}") from None
