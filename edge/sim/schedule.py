"""A small memory IR: tensors with sizes and categories, ops in execution order, bindings.

Every front end (ONNX graphs, FX joint graphs, hand-written tests) lowers to a `Schedule`, so the
planner and the simulator see one shape of data. The IR is deliberately tiny:

* `TensorInfo` - a name, a byte size and a category (what the tensor *is* for memory purposes).
* `Op` - one step of execution: the tensors it reads and the tensors it writes.
* `Schedule` - ops in the order they run, the tensors they touch, and `bindings`
  (new-parameter output -> parameter input) that say which outputs replace which inputs
  after the step (a training update).

Lifetimes (`Schedule.lifetimes`): a tensor is live from the step of the op that writes it
(graph inputs and initializers: from step 0) to the step of its last reader, inclusive.
Graph outputs stay live to the last step. Persistent categories (parameters and optimizer
state) survive across steps, so for residency they are live at every step; their *last
reader* is still recorded, because an in-place update may reuse their storage after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

CATEGORIES = ("parameter", "optimizer_state", "input", "activation", "update_buffer", "output")
PERSISTENT = frozenset({"parameter", "optimizer_state"})
TRANSIENT = frozenset(CATEGORIES) - PERSISTENT


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: `nbytes` is what it occupies in memory (already rounded for sub-byte dtypes)."""

    name: str
    nbytes: int
    category: str
    shape: tuple[int, ...] = ()
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("TensorInfo needs a non-empty name")
        if self.category not in CATEGORIES:
            raise ValueError(
                f"tensor {self.name!r}: category {self.category!r} is not one of {CATEGORIES}"
            )
        if not isinstance(self.nbytes, int) or self.nbytes < 0:
            raise ValueError(f"tensor {self.name!r}: nbytes must be a non-negative int")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def persistent(self) -> bool:
        return self.category in PERSISTENT


@dataclass(frozen=True)
class Op:
    """One execution step. `op_type` is free text (an ONNX op type or an aten overload name)."""

    name: str
    op_type: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if len(set(self.outputs)) != len(self.outputs):
            raise ValueError(f"op {self.name!r} writes the same tensor twice")


@dataclass(frozen=True)
class Lifetime:
    """Inclusive step interval [first, last] during which a tensor must keep its bytes."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if self.first < 0 or self.last < self.first:
            raise ValueError(f"bad lifetime [{self.first}, {self.last}]")

    def overlaps(self, other: Lifetime) -> bool:
        return self.first <= other.last and other.first <= self.last


@dataclass(frozen=True)
class Schedule:
    """Ops in execution order plus every tensor they touch; validated on construction.

    `outputs` lists graph outputs (they stay live to the end); when omitted it defaults to
    every tensor of category `output` or `update_buffer`.
    """

    ops: tuple[Op, ...]
    tensors: Mapping[str, TensorInfo]
    bindings: Mapping[str, str] = field(default_factory=dict)
    outputs: tuple[str, ...] | None = None
    name: str = "graph"
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        tensors = self.tensors
        if not isinstance(tensors, Mapping):
            tensors = {t.name: t for t in tensors}
        for key, info in tensors.items():
            if key != info.name:
                raise ValueError(f"tensor key {key!r} != TensorInfo.name {info.name!r}")
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "notes", tuple(self.notes))
        object.__setattr__(self, "tensors", MappingProxyType(dict(tensors)))
        object.__setattr__(self, "bindings", MappingProxyType(dict(self.bindings)))
        if self.outputs is None:
            outs = tuple(n for n, t in tensors.items() if t.category in ("output", "update_buffer"))
            object.__setattr__(self, "outputs", outs)
        else:
            object.__setattr__(self, "outputs", tuple(self.outputs))
        self._validate()

    def _validate(self) -> None:
        produced: dict[str, int] = {}
        for step, op in enumerate(self.ops):
            for name in op.inputs:
                if name not in self.tensors:
                    raise ValueError(f"op {op.name!r} reads unknown tensor {name!r}")
                if self.tensors[name].persistent or name in produced:
                    continue
                if self.tensors[name].category != "input":
                    raise ValueError(
                        f"op {op.name!r} (step {step}) reads {name!r} before any op writes it"
                    )
            for name in op.outputs:
                if name not in self.tensors:
                    raise ValueError(f"op {op.name!r} writes unknown tensor {name!r}")
                if name in produced:
                    raise ValueError(f"tensor {name!r} is written by two ops")
                if self.tensors[name].category in PERSISTENT or self.tensors[name].category == (
                    "input"
                ):
                    raise ValueError(f"op {op.name!r} writes graph input {name!r}")
                produced[name] = step
        for out in self.outputs:
            if out not in self.tensors:
                raise ValueError(f"graph output {out!r} is not a known tensor")
        for new, old in self.bindings.items():
            if new not in self.tensors or old not in self.tensors:
                raise ValueError(f"binding {new!r} -> {old!r} names an unknown tensor")
            if not self.tensors[old].persistent:
                raise ValueError(f"binding target {old!r} is not a parameter or optimizer state")
            if new not in produced:
                raise ValueError(f"bound output {new!r} is not written by any op")

    @cached_property
    def producer(self) -> Mapping[str, int]:
        """Tensor -> step of the op that writes it (graph inputs are absent)."""
        return MappingProxyType({t: i for i, op in enumerate(self.ops) for t in op.outputs})

    @cached_property
    def last_reader(self) -> Mapping[str, int]:
        """Tensor -> step of its last reader (tensors nobody reads are absent)."""
        last: dict[str, int] = {}
        for i, op in enumerate(self.ops):
            for t in op.inputs:
                last[t] = i
        return MappingProxyType(last)

    @cached_property
    def lifetimes(self) -> Mapping[str, Lifetime]:
        """Tensor -> the steps it must stay resident (see the module docstring)."""
        end = max(len(self.ops) - 1, 0)
        outs = set(self.outputs)
        result: dict[str, Lifetime] = {}
        for name, info in self.tensors.items():
            if info.persistent:
                result[name] = Lifetime(0, end)
                continue
            first = self.producer.get(name, 0)
            last = self.last_reader.get(name, first)
            if name in outs:
                last = end
            result[name] = Lifetime(first, max(first, last))
        return MappingProxyType(result)

    def by_category(self, category: str) -> tuple[TensorInfo, ...]:
        return tuple(t for t in self.tensors.values() if t.category == category)

    def total_bytes(self, categories: frozenset[str] | set[str] | None = None) -> int:
        return sum(
            t.nbytes
            for t in self.tensors.values()
            if categories is None or t.category in categories
        )
