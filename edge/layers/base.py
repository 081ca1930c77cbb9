"""What every layer primitive is: a frozen spec with all of its forms side by side.

A primitive (conv, linear, an activation, a pool, BatchNorm, flatten) is a small frozen
dataclass: its fields are the spec (validated in `__post_init__`), its methods the forms

    out_shape(shape)                        output shape (no batch axis) for an input shape
    param_shapes() -> {short: shape}        its parameters, e.g. {"w": (O, C, kh, kw), "b": (O,)}
    init(gen) -> {short: Tensor}            initial values, drawn from `gen` only
    forward(ex, p, x) -> (y, saved)         float forward; `saved` is what the adjoint needs
    adjoint(ex, p, saved, g, need_gx)       closed-form local adjoint: ({short: dL/dparam},
                                            dL/dx or None); no autograd anywhere
    int_forward(ex, key, p, x) -> (y, s)    integer form over `QT` tensors (below); `key` names
                                            the primitive in the plan (its exponents, noise)
    int_adjoint(ex, key, p, s, g, need_gx)  integer adjoint: ({short: QT}, QT or None)
    macs(shape)                             multiply-adds of the forward, per sample

`ex` is the executor (`edge.layers.executor`): an explicit argument that says which kernels
to use (eager torch, traced for ONNX, integer) and carries the hooks of quantized modes; it
never changes the sums. `p` holds this primitive's parameters under their short names; the
block that owns the primitive maps them to the network's flat names.

Integer tensors travel as `QT(t, f, c)`: integer values t whose real value is t * 2^-f * c.
Forward tensors have c = 1 (power-of-two scales only); error tensors may carry a static
factor c (e.g. the 1/k^2 of an average pool's adjoint), so nothing non-binary is ever
rounded into the integers.

Every subclass that sets `op` is registered by that name (`PRIMITIVES`), which is how specs
load from dicts and TOML files: one registry, filled by the classes themselves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from edge.errors import EdgeError

Shape = tuple[int, ...]
PRIMITIVES: dict[str, type[Primitive]] = {}
TORCH_MODULES: dict[type, type[Primitive]] = {}  # torch module type -> parameter-free primitive


class QT(NamedTuple):
    """An integer tensor with its scale: real value = t * 2^-f * c."""

    t: Tensor
    f: int
    c: float = 1.0


@dataclasses.dataclass(frozen=True)
class Primitive:
    """Base class; subclasses are frozen dataclasses with `op` set."""

    op: ClassVar[str] = ""
    has_weights: ClassVar[bool] = False  # conv / linear: ends an integer requantization group
    is_activation: ClassVar[bool] = False
    trainable: ClassVar[tuple[str, ...]] = ()  # parameters the rules update
    torch_type: ClassVar[type | None] = None  # the torch module it converts from / to

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.__dict__.get("op"):
            PRIMITIVES[cls.op] = cls
        if cls.__dict__.get("torch_type") is not None:
            TORCH_MODULES[cls.torch_type] = cls

    @classmethod
    def from_module(cls, m: Any) -> Primitive:
        """The primitive of a parameter-free torch module of `torch_type`."""
        return cls()

    def torch_module(self) -> Any:
        if self.torch_type is None:
            raise EdgeError(f"{self.op} has no torch module")
        return self.torch_type()

    # ------------------------------------------------------------------ spec
    def out_shape(self, shape: Shape) -> Shape:
        return shape

    def param_shapes(self) -> dict[str, Shape]:
        return {}

    def init(self, gen: torch.Generator) -> dict[str, Tensor]:
        return {}

    def macs(self, shape: Shape) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        d = {"op": self.op}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.to_dict().items() if k != "op")
        return f"{self.op}({args})"

    # ------------------------------------------------------------------ forms
    def forward(self, ex: Any, p: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def adjoint(
        self, ex: Any, p: dict[str, Tensor], saved: Any, g: Tensor, need_gx: bool
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        raise NotImplementedError

    def int_forward(self, ex: Any, key: str, p: dict[str, QT], x: QT) -> tuple[QT, Any]:
        raise EdgeError(f"{self.op} has no integer form")

    def int_adjoint(
        self, ex: Any, key: str, p: dict[str, QT], saved: Any, g: QT, need_gx: bool
    ) -> tuple[dict[str, QT], QT | None]:
        raise EdgeError(f"{self.op} has no integer form")


def from_dict(d: dict[str, Any], where: str = "layer") -> Primitive:
    """A primitive from its dict form {"op": name, field: value, ...}; one-line errors that
    name the field."""
    if not isinstance(d, dict) or "op" not in d:
        raise EdgeError(f"{where}: needs an 'op' field; valid ops: {', '.join(sorted(PRIMITIVES))}")
    op = d["op"]
    cls = PRIMITIVES.get(op)
    if cls is None:
        raise EdgeError(f"{where}: unknown op {op!r}; valid: {', '.join(sorted(PRIMITIVES))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key == "op":
            continue
        if key not in fields:
            raise EdgeError(f"{where} ({op}): unknown field {key!r}; valid: "
                            f"{', '.join(fields) or 'none'}")
        want = fields[key].type
        if isinstance(value, list):
            value = tuple(value)
        if "int" in str(want) and "float" not in str(want):
            bad = (isinstance(value, bool) or not isinstance(value, (int, tuple))
                   or isinstance(value, tuple) and not all(isinstance(v, int) for v in value))
            if bad:
                raise EdgeError(f"{where} ({op}): field {key!r} must be an integer"
                                f"{' or a pair' if 'tuple' in str(want) else ''}, got {value!r}")
        kwargs[key] = value
    missing = [n for n, f in fields.items()
               if f.default is dataclasses.MISSING and n not in kwargs]
    if missing:
        raise EdgeError(f"{where} ({op}): missing field {missing[0]!r}")
    try:
        return cls(**kwargs)
    except EdgeError as e:
        raise EdgeError(f"{where} ({op}): {e}") from None


def pair(v: int | tuple[int, ...], name: str) -> tuple[int, int]:
    """An int or a pair as a validated (h, w) pair."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if not (isinstance(v, tuple) and len(v) == 2 and all(isinstance(u, int) for u in v)):
        raise EdgeError(f"{name} must be an integer or a pair of integers, got {v!r}")
    return (int(v[0]), int(v[1]))


def window_out(size: int, k: int, s: int, p: int, what: str) -> int:
    """Output length of a k-wide window with stride s and padding p on both sides (floor)."""
    n = (size + 2 * p - k) // s + 1
    if size + 2 * p < k or n < 1:
        raise EdgeError(f"{what}: a window of {k} (padding {p}) does not fit a size of {size}")
    return n


def he_normal(shape: Shape, fan_in: int, gen: torch.Generator) -> Tensor:
    """He-normal (ReLU gain, fan-in): std sqrt(2 / fan_in)."""
    return torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)
