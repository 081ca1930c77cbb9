"""A network: `NetSpec(name, in_shape, blocks)`, validated at construction, loaded from a dict
or a TOML file with one-line errors that name the field.

Parameters live in a flat dict keyed by primitive (`enc.{block}.{j}.{w|b|...}`, see
`edge.nets.block`), so the same pure functions serve the torch loop, the exporter and the
integer mode; there is no nn.Module.

Spec files (`--net path/to/net.toml`):

    name = "tiny"
    in_shape = [1, 28, 28]            # optional; else the data set's (must agree if given)

    [[blocks]]                         # one local block: the rule's loss sits at its output
    layers = [
      { op = "conv", cout = 16, k = 3, padding = 1 },    # cin: from the incoming shape
      { op = "relu" },
      { op = "maxpool", k = 2 },
    ]

    [[blocks]]                         # a residual block
    layers = [ { op = "conv", cout = 16, k = 3, padding = 1 }, { op = "relu" },
               { op = "conv", cout = 16, k = 3, padding = 1 } ]
    shortcut = "identity"              # or a list of layers, e.g. a strided 1x1 conv
    post = [ { op = "relu" } ]

`cin` (conv), `fin` (linear) and `channels` (bn) may be left out: they are read off the shape
flowing in. Ops and their fields: `edge.layers` (`edge nets --ops` lists them).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.layers import PRIMITIVES, Primitive
from edge.layers import from_dict as prim_from_dict
from edge.nets.block import Block

Shape = tuple[int, ...]
_INFER = {"conv": "cin", "linear": "fin", "bn": "channels"}  # field read off the input shape


@dataclass(frozen=True)
class NetSpec:
    name: str
    in_shape: Shape  # (C, H, W) or (F,)
    blocks: tuple[Block, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_shape", tuple(int(d) for d in self.in_shape))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if not self.blocks:
            raise EdgeError("a network needs at least one block")
        if any(d < 1 for d in self.in_shape):
            raise EdgeError(f"input shape must be positive, got {self.in_shape}")
        self.shapes()

    def shapes(self) -> list[Shape]:
        """Output shape (without batch) of every block."""
        out, shape = [], self.in_shape
        for i, b in enumerate(self.blocks):
            try:
                shape = b.out_shape(shape)
            except EdgeError as e:
                raise EdgeError(f"network {self.name!r}, block {i}: {e}") from None
            out.append(shape)
        return out

    def block_inputs(self) -> list[Shape]:
        return [self.in_shape, *self.shapes()[:-1]]

    def param_shapes(self) -> dict[str, Shape]:
        return {k: s for i, b in enumerate(self.blocks) for k, s in b.param_shapes(i).items()}

    def trainable(self) -> list[str]:
        return [k for i, b in enumerate(self.blocks) for k in b.trainable(i)]

    def init_params(self, gen: torch.Generator) -> dict[str, Tensor]:
        """Every block's parameters in order, drawn from `gen` only (conv/linear He-normal)."""
        out: dict[str, Tensor] = {}
        for i, b in enumerate(self.blocks):
            out.update(b.init(i, gen))
        return out

    def macs(self) -> list[int]:
        """Multiply-adds of each block's forward, per sample."""
        return [b.macs(s) for b, s in zip(self.blocks, self.block_inputs(), strict=True)]

    def primitives(self) -> list[tuple[str, Primitive]]:
        return [kp for i, b in enumerate(self.blocks) for kp in b.primitives(i)]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "in_shape": list(self.in_shape),
                "blocks": [b.to_dict() for b in self.blocks]}

    @staticmethod
    def from_dict(d: dict[str, Any], in_shape: Shape | None = None,
                  where: str = "network") -> NetSpec:
        """From the dict form (a spec file's tables); `in_shape` given by the data set."""
        if not isinstance(d, dict):
            raise EdgeError(f"{where}: must be a table")
        unknown = sorted(set(d) - {"name", "in_shape", "blocks"})
        if unknown:
            raise EdgeError(f"{where}: unknown field {unknown[0]!r}; valid: name, in_shape, "
                            "blocks")
        declared = d.get("in_shape")
        if declared is not None:
            if not (isinstance(declared, list) and declared
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in declared)):
                raise EdgeError(f"{where}: in_shape must be a list of integers, got {declared!r}")
            if in_shape is not None and tuple(declared) != tuple(in_shape):
                raise EdgeError(f"{where}: in_shape {declared} does not match the data's "
                                f"{list(in_shape)}")
        shape = tuple(declared) if declared is not None else in_shape
        if shape is None:
            raise EdgeError(f"{where}: no in_shape given (add in_shape = [C, H, W] or pass --data)")
        blocks = d.get("blocks")
        if not isinstance(blocks, list) or not blocks:
            raise EdgeError(f"{where}: needs a non-empty 'blocks' list ([[blocks]] tables)")
        name = d.get("name", "custom")
        if not isinstance(name, str):
            raise EdgeError(f"{where}: name must be a string")
        built, s = [], tuple(shape)
        for i, bd in enumerate(blocks):
            b = Block.from_dict(_fill(bd, s, f"{where}, block {i}"), f"{where}, block {i}")
            try:
                s = b.out_shape(s)
            except EdgeError as e:
                raise EdgeError(f"{where}, block {i}: {e}") from None
            built.append(b)
        return NetSpec(name, shape, tuple(built))


def _fill(bd: Any, shape: Shape, where: str) -> Any:
    """Block dict with cin / fin / channels filled from the shapes flowing in."""
    if not isinstance(bd, dict) or not isinstance(bd.get("layers"), list):
        return bd
    out = dict(bd)

    def fill_chain(items: Any, s: Shape, what: str) -> tuple[Any, Shape]:
        if not isinstance(items, list):
            return items, s
        filled = []
        for j, x in enumerate(items):
            if isinstance(x, dict) and x.get("op") in _INFER and _INFER[x["op"]] not in x:
                x = {**x, _INFER[x["op"]]: s[0]}
            filled.append(x)
            prim = prim_from_dict(x, f"{where}, {what} {j}")
            try:
                s = prim.out_shape(s)
            except EdgeError as e:
                raise EdgeError(f"{where}, {what} {j} ({prim.op}): {e}") from None
        return filled, s

    out["layers"], h = fill_chain(bd["layers"], shape, "layers")
    if "shortcut" in bd:
        out["shortcut"], _ = fill_chain(bd["shortcut"], shape, "shortcut")
    if "post" in bd:
        out["post"], _ = fill_chain(bd["post"], h, "post")
    return out


def load_spec(path: str | Path, in_shape: Shape | None = None) -> NetSpec:
    """A network spec file (TOML); every problem is a one-line EdgeError naming the file."""
    path = Path(path)
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeError(f"network spec not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeError(f"cannot read network spec {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise EdgeError(f"{path}: not valid TOML ({e})") from None
    d.setdefault("name", path.stem)
    return NetSpec.from_dict(d, in_shape, where=str(path))


def ops_help() -> list[dict[str, Any]]:
    """Every op with its fields (for `edge nets --ops`)."""
    import dataclasses

    rows = []
    for op, cls in sorted(PRIMITIVES.items()):
        fields = [f.name + ("" if f.default is dataclasses.MISSING else f"={f.default!r}")
                  for f in dataclasses.fields(cls)]
        rows.append({"op": op, "fields": fields, "doc": (cls.__doc__ or "").strip().split("\n")[0]})
    return rows

