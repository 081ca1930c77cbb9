"""Torch modules in and out: adapt a pretrained model on the device, or hand a spec to torch.

    from_torch(module, in_shape) -> (NetSpec, params)
    to_torch(net, params) -> nn.Sequential          (the same function, as torch modules)
    Residual(body, shortcut=None, post=None)        a residual block as a torch module

`from_torch` reads an `nn.Sequential` (nested to any depth) of supported modules, with their
weights. Blocks (the units a local rule trains): every child `nn.Sequential` or `Residual` of
the top level is one block; loose top-level modules are grouped so that each block starts at
a weight layer (conv or linear) and holds the modules after it up to the next one. BatchNorm
is read in inference mode (running statistics, affine); dropout and identities are dropped;
a flatten of an already flat tensor is a no-op. Anything else is a one-line error naming the
module and listing what is supported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from edge.errors import EdgeError
from edge.layers import (
    AvgPool,
    BatchNorm,
    Conv,
    Flatten,
    GlobalAvgPool,
    Identity,
    Linear,
    MaxPool,
    Primitive,
)
from edge.layers.base import TORCH_MODULES
from edge.nets.block import Block
from edge.nets.spec import NetSpec

SKIPPED = (nn.Dropout, nn.Dropout2d, nn.Identity)


class Residual(nn.Module):
    """y = post(body(x) + shortcut(x)); shortcut None is the identity."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None,
                 post: nn.Module | None = None):
        super().__init__()
        self.body, self.shortcut, self.post = body, shortcut, post

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x) + (x if self.shortcut is None else self.shortcut(x))
        return y if self.post is None else self.post(y)


def _convert(m: nn.Module, shape: tuple[int, ...], where: str
             ) -> tuple[Primitive | None, dict[str, Tensor]]:
    """One leaf module -> (primitive or None if dropped, its parameters by short name)."""
    if isinstance(m, SKIPPED):
        return None, {}
    if isinstance(m, nn.Conv2d):
        pad = m.padding
        if isinstance(pad, str) or m.padding_mode != "zeros" or tuple(m.dilation) != (1, 1):
            raise EdgeError(f"{where}: Conv2d with padding={pad!r}, padding_mode="
                            f"{m.padding_mode!r}, dilation={m.dilation} is not supported "
                            "(numeric zero padding, dilation 1)")
        p = Conv(m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                 tuple(pad), m.groups)
        b = m.bias.detach().clone() if m.bias is not None else torch.zeros(m.out_channels)
        return p, {"w": m.weight.detach().clone(), "b": b}
    if isinstance(m, nn.Linear):
        b = m.bias.detach().clone() if m.bias is not None else torch.zeros(m.out_features)
        return Linear(m.in_features, m.out_features), {"w": m.weight.detach().clone(), "b": b}
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        if m.running_mean is None:
            raise EdgeError(f"{where}: BatchNorm without running statistics "
                            "(track_running_stats=False) cannot be frozen")
        c = m.num_features
        gamma = m.weight.detach().clone() if m.affine else torch.ones(c)
        beta = m.bias.detach().clone() if m.affine else torch.zeros(c)
        return BatchNorm(c, float(m.eps)), {"gamma": gamma, "beta": beta,
                                            "mean": m.running_mean.detach().clone(),
                                            "var": m.running_var.detach().clone()}
    if isinstance(m, nn.MaxPool2d):
        if m.dilation not in (1, (1, 1)) or m.ceil_mode or m.return_indices:
            raise EdgeError(f"{where}: MaxPool2d needs dilation 1, ceil_mode=False")
        return MaxPool(_pair(m.kernel_size), _pair(m.stride or m.kernel_size),
                       _pair(m.padding)), {}
    if isinstance(m, nn.AvgPool2d):
        if m.ceil_mode or not m.count_include_pad or m.divisor_override:
            raise EdgeError(f"{where}: AvgPool2d needs ceil_mode=False, count_include_pad="
                            "True, no divisor_override")
        return AvgPool(_pair(m.kernel_size), _pair(m.stride or m.kernel_size),
                       _pair(m.padding)), {}
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if _pair(m.output_size) != (1, 1):
            raise EdgeError(f"{where}: AdaptiveAvgPool2d supports output size 1 only")
        return GlobalAvgPool(), {}
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise EdgeError(f"{where}: Flatten supports start_dim=1, end_dim=-1 only")
        return (None if len(shape) == 1 else Flatten()), {}
    if type(m) in TORCH_MODULES:
        return TORCH_MODULES[type(m)].from_module(m), {}
    supported = ["Sequential", "Residual (edge.nets.torch_io)", "Conv2d", "Linear",
                 "BatchNorm1d/2d", *sorted(t.__name__ for t in TORCH_MODULES),
                 "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d(1)", "Flatten", "Dropout",
                 "Identity"]
    raise EdgeError(f"{where}: unsupported module {type(m).__name__}; supported: "
                    f"{', '.join(supported)}")


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _leaves(m: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(m, nn.Sequential):
        return [(f"{name}.{n}" if n else name, leaf) for name, child in m.named_children()
                for n, leaf in _leaves(child)]
    return [("", m)]


def _chain(modules: list[tuple[str, nn.Module]], shape, where: str):
    prims, params = [], []
    for name, m in modules:
        if isinstance(m, Residual):
            raise EdgeError(f"{where}.{name}: a Residual must be a top-level block")
        p, pp = _convert(m, shape, f"{where}.{name}".rstrip("."))
        if p is None:
            continue
        try:
            shape = p.out_shape(shape)
        except EdgeError as e:
            raise EdgeError(f"{where}.{name} ({type(m).__name__}): {e}") from None
        prims.append(p)
        params.append(pp)
    return prims, params, shape


def from_torch(module: nn.Module, in_shape: tuple[int, ...]) -> tuple[NetSpec, dict[str, Tensor]]:
    """A torch model (see the module docstring) as a NetSpec and its parameters."""
    if not isinstance(module, nn.Sequential):
        raise EdgeError(f"from_torch takes an nn.Sequential, got {type(module).__name__}")
    groups: list[Any] = []  # Residual modules, or lists of (name, leaf)
    loose: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential | Residual):
            if loose:
                groups.extend(_group(loose))
                loose = []
            groups.append((name, child))
        else:
            loose.append((name, child))
    if loose:
        groups.extend(_group(loose))
    shape, blocks, params = tuple(in_shape), [], {}
    for group in groups:
        i = len(blocks)
        if isinstance(group, tuple) and isinstance(group[1], Residual):
            name, r = group
            body, bp, h = _chain(_leaves(r.body), shape, f"{name}.body")
            sc, sp = ((), []) if r.shortcut is None else _chain(_leaves(r.shortcut), shape,
                                                                f"{name}.shortcut")[:2]
            post, pp, _ = ((), [], h) if r.post is None else _chain(_leaves(r.post), h,
                                                                    f"{name}.post")
            block = Block(tuple(body), tuple(sc), tuple(post))
            per = {"body": bp, "shortcut": sp, "post": pp}
        else:
            mods = _leaves(group[1]) if isinstance(group, tuple) else group
            where = group[0] if isinstance(group, tuple) else "model"
            body, bp, _ = _chain(mods, shape, where)
            if not body:
                continue
            block, per = Block(tuple(body)), {"body": bp}
        try:
            shape = block.out_shape(shape)
        except EdgeError as e:
            raise EdgeError(f"block {i}: {e}") from None
        for part, chain in block.chains(i).items():
            for (key, _), pp in zip(chain, per.get(part, []), strict=True):
                params.update({f"{key}.{s}": v.float() for s, v in pp.items()})
        blocks.append(block)
    if not blocks:
        raise EdgeError("the module holds no layers")
    return NetSpec("from_torch", tuple(in_shape), tuple(blocks)), params


def _group(loose: list[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """Loose top-level modules into blocks, each starting at a weight layer."""
    out: list[list] = []
    for name, m in loose:
        if isinstance(m, nn.Conv2d | nn.Linear) and out and any(
                isinstance(x, nn.Conv2d | nn.Linear) for _, x in out[-1]):
            out.append([])
        if not out:
            out.append([])
        out[-1].append((name, m))
    return out


def _module(p: Primitive, pp: dict[str, Tensor]) -> nn.Module:
    if isinstance(p, Conv):
        m = nn.Conv2d(p.cin, p.cout, p.k, p.stride, p.padding, groups=p.groups)
        m.weight.data.copy_(pp["w"])
        m.bias.data.copy_(pp["b"])
        return m
    if isinstance(p, Linear):
        m = nn.Linear(p.fin, p.fout)
        m.weight.data.copy_(pp["w"])
        m.bias.data.copy_(pp["b"])
        return m
    if isinstance(p, BatchNorm):
        m = nn.BatchNorm2d(p.channels, eps=p.eps)
        m.weight.data.copy_(pp["gamma"])
        m.bias.data.copy_(pp["beta"])
        m.running_mean.copy_(pp["mean"])
        m.running_var.copy_(pp["var"])
        return m.eval()
    if isinstance(p, MaxPool):
        return nn.MaxPool2d(p.k, p.stride, p.padding)
    if isinstance(p, AvgPool):
        return nn.AvgPool2d(p.k, p.stride, p.padding)
    if isinstance(p, GlobalAvgPool):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if isinstance(p, Flatten):
        return nn.Flatten()
    if isinstance(p, Identity):
        return nn.Identity()
    return p.torch_module()


def to_torch(net: NetSpec, params: dict[str, Tensor]) -> nn.Sequential:
    """The network as torch modules holding `params` (BatchNorm in eval mode)."""
    blocks = []
    for i, b in enumerate(net.blocks):
        parts = {}
        for part, chain in b.chains(i).items():
            parts[part] = nn.Sequential(*[
                _module(p, {s: params[f"{key}.{s}"] for s in p.param_shapes()})
                for key, p in chain])
        if b.residual:
            blocks.append(Residual(parts["body"], parts["shortcut"] if b.shortcut else None,
                                   parts["post"] if b.post else None))
        else:
            blocks.append(parts["body"])
    return nn.Sequential(*blocks)
