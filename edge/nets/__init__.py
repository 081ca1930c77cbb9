"""Networks: blocks of layer primitives, specs (presets, TOML files, torch modules), params.

    NetSpec, Block             `edge.nets.spec`, `edge.nets.block`
    preset(name, in_shape, width), PRESETS, resolve(name_or_path, in_shape, width)
    load_spec(path)            a TOML spec file
    from_torch(module, in_shape) -> (NetSpec, params);  to_torch(net, params) -> nn.Module
    fold_batchnorm(net, params) -> (net, params)        BN merged into the conv before it
    encode(net, params, x)     every block's output (eager, no gradients)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.layers import EAGER, BatchNorm
from edge.nets.block import Block
from edge.nets.presets import PRESETS, default_preset, preset
from edge.nets.spec import NetSpec, load_spec

__all__ = [
    "PRESETS", "Block", "NetSpec", "default_preset", "encode", "fold_batchnorm", "from_torch",
    "load_spec", "preset", "resolve", "to_torch",
]


def resolve(name: str, in_shape: tuple[int, ...], width: float = 1.0) -> NetSpec:
    """A preset name, or a path to a .toml spec (`--net` on every command)."""
    if name.endswith(".toml") or Path(name).suffix == ".toml" or "/" in name:
        if width != 1.0:
            raise EdgeError("--width applies to presets; scale the channels in the spec file")
        return load_spec(name, in_shape)
    return preset(name, in_shape, width)


def init_params(net: NetSpec, gen: torch.Generator) -> dict[str, Tensor]:
    return net.init_params(gen)


def fold_batchnorm(net: NetSpec, params: dict[str, Tensor]) -> tuple[NetSpec, dict[str, Tensor]]:
    """Every BatchNorm that directly follows a conv or linear layer merged into it
    (`edge.layers.bn`); other BatchNorms stay. Parameters are renamed to the new positions."""
    blocks, out = [], {}
    for i, b in enumerate(net.blocks):
        chains = b.chains(i)
        new: dict[str, list] = {}
        for part, chain in chains.items():
            kept: list[tuple[str, object]] = []  # (old key, primitive)
            for key, p in chain:
                prev = kept[-1] if kept else None
                if isinstance(p, BatchNorm) and prev is not None and prev[1].has_weights:
                    bn = {s: params[f"{key}.{s}"] for s in p.param_shapes()}
                    pk = prev[0]
                    params = {**params}
                    params[f"{pk}.w"], params[f"{pk}.b"] = p.fold(bn, params[f"{pk}.w"],
                                                                  params[f"{pk}.b"])
                    continue
                kept.append((key, p))
            new[part] = kept
        nb = Block(tuple(p for _, p in new["body"]),
                   None if not b.residual else tuple(p for _, p in new["shortcut"]),
                   tuple(p for _, p in new["post"]))
        for part, kept in new.items():
            for (old, p), (key, _) in zip(kept, nb.chains(i)[part], strict=True):
                out.update({f"{key}.{s}": params[f"{old}.{s}"] for s in p.param_shapes()})
        blocks.append(nb)
    folded = NetSpec(net.name, net.in_shape, tuple(blocks))
    rest = {k: v for k, v in params.items() if not k.startswith("enc.")}
    return folded, {**out, **rest}


def encode(net: NetSpec, params: dict[str, Tensor], x: Tensor) -> list[Tensor]:
    """Every block's output for input `x` (no gradients kept)."""
    outs = []
    with torch.no_grad():
        for i, b in enumerate(net.blocks):
            x, _ = b.forward(EAGER, i, params, x)
            outs.append(x)
    return outs


def from_torch(module, in_shape):  # noqa: ANN001 - see edge.nets.torch_io
    from edge.nets.torch_io import from_torch as convert

    return convert(module, in_shape)


def to_torch(net: NetSpec, params: dict[str, Tensor]):
    from edge.nets.torch_io import to_torch as convert

    return convert(net, params)
