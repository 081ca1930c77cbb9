"""Does a spiking network fit a neuromorphic chip? Neuron and synapse memory per core, cores.

`neuromorphic_report(layers, target)` takes the layers of a spiking network (`SpikingLayer`, in
order) and a `Target` with a `Neuromorphic` description (`targets`), and returns a
`NeuromorphicReport`: plain data, `to_dict()` is JSON-able. A pure function of its inputs.

What a layer stores
-------------------
Every layer is described by its spiking output `(channels, height, width)`, its input channels
and kernel; a linear layer is a 1x1 output with a 1x1 kernel over `in_features` channels.

* neurons = channels * height * width; fan-in = in_channels * kh * kw (sum pooling: kh * kw).
* stored weights (`synapses`):

  - linear: fan_in * outputs (every connection has its own weight, on every target);
  - conv: with the target's `shared_kernels` (Speck) each kernel is stored once,
    c_out * c_in * kh * kw; otherwise every connection stores its own weight, neurons * fan_in
    (as compilers that expand a convolution into synapses do on Loihi; border neurons of a
    padded convolution have fewer inputs, so this is an upper bound);
  - sumpool: no weights with shared kernels (a fixed pattern), else neurons * kh * kw
    unit-weight connections; with the target's `pool_in_core` (Speck: each core is conv ->
    spike -> pool) pooling happens on the previous core's output and the layer takes nothing.

* `pow2_addressing` (Speck, Sinabs `DynapcnnLayer.memory_summary`): entries are rounded up by
  the address encoding - kernel c_in * 2^(ceil log2(kh kw) + ceil log2 f), neurons
  f * 2^(ceil log2 h + ceil log2 w), with f output channels.
* bytes: synapse_bytes = ceil(weights * weight_bits / 8), neuron_state_bytes = ceil(neuron
  entries * neuron_state_bits / 8); the bits are the layer's, else the target's.

Packing rule
------------
One layer never shares a core with another (Sinabs maps one layer per DYNAP-CNN core; Loihi's
compilers typically give each layer its own cores). A layer may span several cores where the
target allows (`max_cores_per_layer`): cut into k equal parts along its *unit* - an output
channel with its kernel when kernels are shared, else an output neuron with its fan-in - each
core holds ceil(units / k) units, their neurons and the weights they read. k is the smallest
count for which a part fits one core: neuron entries <= the neuron limit, weights <= the
synapse memory, neuron state + weights <= the shared core memory. A layer is unplaceable when
one unit alone does not fit, or k exceeds `max_cores_per_layer`. Cores of different sizes
(Speck) take one layer each, assigned by bipartite matching (augmenting paths; Sinabs solves
the same assignment with max-flow).

Totals
------
cores needed = the sum of the layers' cores; fits = every layer placed on the chip's cores.
`utilization` is demand over the whole chip's capacity per resource ("neurons",
"synapse_memory", "core_memory") and "cores" = needed / available. The limiting resource is,
in this order: the resource of the first unplaceable layer; "cores" when cores of different
sizes cannot all be matched; else the resource that forced the most cores (each layer's
`limited_by`: the resource whose limit alone needs the most cores, or, on one core, the one
closest to its limit).

Not modelled: routing and axon tables, index / delay fields stored beside each weight,
microcode, biases (Speck: 1 Ki bias entries per core), fan-out limits (Speck: 2 destinations).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from edge.errors import EdgeError
from targets import Neuromorphic, Target

KINDS = ("conv", "linear", "sumpool")
RESOURCES = ("neurons", "synapse_memory", "core_memory")
PACKING = (
    "a layer never shares a core with another; it spans the fewest cores whose equal "
    "parts (cut along output channels with shared kernels, else output neurons) each fit "
    "one core; cores of different sizes take one layer each, by bipartite matching"
)


def _ints(value: Sequence[int], n: int, what: str) -> tuple[int, ...]:
    items = tuple(value)
    if len(items) != n or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items
    ):
        raise EdgeError(f"{what} must be {n} ints >= 1, got {value!r}")
    return items


def _clog2(n: int) -> int:
    return (n - 1).bit_length()  # ceil(log2 n) for n >= 1


@dataclass(frozen=True)
class SpikingLayer:
    """One layer of a spiking network. Build it with `conv`, `linear` or `sumpool`.

    `out_shape` is (channels, height, width) of its spiking output (linear: (features, 1, 1));
    `in_channels` its input channels (linear: in_features; sumpool: its own channels).
    """

    kind: str
    out_shape: tuple[int, int, int]
    in_channels: int
    kernel: tuple[int, int] = (1, 1)
    weight_bits: int | None = None
    neuron_state_bits: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        label = self.name or self.kind
        if self.kind not in KINDS:
            raise EdgeError(f"layer {label!r}: kind {self.kind!r} is not one of {KINDS}")
        object.__setattr__(self, "out_shape", _ints(self.out_shape, 3, f"layer {label!r} shape"))
        object.__setattr__(self, "kernel", _ints(self.kernel, 2, f"layer {label!r} kernel"))
        _ints((self.in_channels,), 1, f"layer {label!r} in_channels")
        if self.kind == "linear" and (self.out_shape[1:] != (1, 1) or self.kernel != (1, 1)):
            raise EdgeError(
                f"layer {label!r}: a linear layer has shape (features, 1, 1) and a "
                "1x1 kernel; use conv for anything else"
            )
        if self.kind == "sumpool" and self.in_channels != self.out_shape[0]:
            raise EdgeError(
                f"layer {label!r}: sum pooling keeps its channels "
                f"({self.in_channels} in, {self.out_shape[0]} out)"
            )
        for attr in ("weight_bits", "neuron_state_bits"):
            bits = getattr(self, attr)
            if bits is not None and (
                isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 64
            ):
                raise EdgeError(f"layer {label!r}: {attr} must be an int in 1..64, got {bits!r}")

    @classmethod
    def conv(
        cls,
        in_channels: int,
        out_channels: int,
        kernel: int | tuple[int, int],
        out_hw: tuple[int, int],
        *,
        weight_bits: int | None = None,
        neuron_state_bits: int | None = None,
        name: str = "",
    ) -> SpikingLayer:
        """A convolution with `out_channels` x out_hw spiking outputs."""
        k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        return cls(
            "conv",
            (out_channels, *out_hw),
            in_channels,
            k,
            weight_bits,  # type: ignore[arg-type]
            neuron_state_bits,
            name,
        )

    @classmethod
    def linear(
        cls,
        in_features: int,
        out_features: int,
        *,
        weight_bits: int | None = None,
        neuron_state_bits: int | None = None,
        name: str = "",
    ) -> SpikingLayer:
        """A fully connected layer: `out_features` neurons with `in_features` inputs each."""
        return cls(
            "linear",
            (out_features, 1, 1),
            in_features,
            (1, 1),
            weight_bits,
            neuron_state_bits,
            name,
        )

    @classmethod
    def sumpool(
        cls,
        channels: int,
        kernel: int | tuple[int, int],
        out_hw: tuple[int, int],
        *,
        weight_bits: int | None = None,
        neuron_state_bits: int | None = None,
        name: str = "",
    ) -> SpikingLayer:
        """Sum pooling of each channel to an out_hw map (no learned weights; `weight_bits` is
        the width of its unit weights on a target that stores every connection)."""
        k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        return cls(
            "sumpool",
            (channels, *out_hw),
            channels,
            k,
            weight_bits,  # type: ignore[arg-type]
            neuron_state_bits,
            name,
        )

    @property
    def neurons(self) -> int:
        c, h, w = self.out_shape
        return c * h * w

    @property
    def fan_in(self) -> int:
        area = self.kernel[0] * self.kernel[1]
        return area if self.kind == "sumpool" else self.in_channels * area

    @property
    def synapses(self) -> int:
        """Distinct weights: kernel parameters (conv), fan_in * outputs (linear), 0 (sumpool)."""
        return 0 if self.kind == "sumpool" else self.out_shape[0] * self.fan_in

    @property
    def connections(self) -> int:
        """Input-output pairs: neurons * fan_in (what a per-connection target stores)."""
        return self.neurons * self.fan_in


@dataclass(frozen=True)
class LayerUsage:
    """One layer on the chip: what it stores and the cores the packing rule gives it.

    `cores` is what it needs: 0 when it is folded into the previous core (`limited_by` "none")
    or when no number of cores holds it; `placeable` is False then, and also when it needs more
    than `max_cores_per_layer`. `core_ids` are the cores it got (empty: not placed on the chip).
    """

    name: str
    kind: str
    neurons: int
    neuron_entries: int  # neurons after address rounding
    synapses: int  # weights stored on the chip
    synapse_bytes: int
    neuron_state_bytes: int
    weight_bits: int
    neuron_state_bits: int
    cores: int
    core_ids: tuple[int, ...]
    limited_by: str  # a RESOURCES entry, or "none"
    placeable: bool


@dataclass(frozen=True)
class NeuromorphicReport:
    """The answer of `neuromorphic_report`; plain data."""

    target: str
    fits: bool
    cores_needed: int
    cores_available: int
    limiting_resource: str
    utilization: dict[str, float]
    layers: tuple[LayerUsage, ...]
    neurons: int
    synapses: int
    synapse_bytes: int
    neuron_state_bytes: int
    packing: str = PACKING
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [{**asdict(u), "core_ids": list(u.core_ids)} for u in self.layers]
        d["notes"] = list(self.notes)
        return d


@dataclass(frozen=True)
class _Plan:
    """How a layer is cut: `units`, and per part of u units its weights and neuron entries."""

    layer: SpikingLayer
    units: int
    weights: Callable[[int], int]
    entries: Callable[[int], int]
    wbits: int
    sbits: int

    def demand(self, u: int) -> dict[str, int]:
        syn = -(-self.weights(u) * self.wbits // 8)
        state = -(-self.entries(u) * self.sbits // 8)
        return {"neurons": self.entries(u), "synapse_memory": syn, "core_memory": syn + state}


def _limits(nm: Neuromorphic, core: int) -> dict[str, int]:
    out = {}
    for res, per_core in zip(
        RESOURCES,
        (nm.neurons_per_core, nm.synapse_bytes_per_core, nm.core_bytes_per_core),
        strict=True,
    ):
        if per_core is not None:
            out[res] = per_core[core]
    return out


def _plan(layer: SpikingLayer, nm: Neuromorphic, target: str) -> _Plan:
    label = layer.name or layer.kind
    wbits = layer.weight_bits or nm.weight_bits
    sbits = layer.neuron_state_bits or nm.neuron_state_bits
    if sbits is None:
        raise EdgeError(
            f"layer {label!r}: target {target!r} does not fix the neuron state size; "
            "give the layer neuron_state_bits"
        )
    if wbits is None:
        if not (layer.kind == "sumpool" and nm.shared_kernels):  # else it stores weights
            raise EdgeError(
                f"layer {label!r}: target {target!r} does not fix the weight size; "
                "give the layer weight_bits"
            )
        wbits = 0
    c, h, w = layer.out_shape
    area, fan_in = layer.kernel[0] * layer.kernel[1], layer.fan_in
    if nm.shared_kernels:  # unit: an output channel (its h*w neurons and its kernel)
        hw = (1 << (_clog2(h) + _clog2(w))) if nm.pow2_addressing else h * w

        def weights(u: int) -> int:
            if layer.kind == "sumpool":
                return 0
            if nm.pow2_addressing:
                return layer.in_channels * (1 << (_clog2(area) + _clog2(u)))
            return u * fan_in

        return _Plan(layer, c, weights, lambda u: u * hw, wbits, sbits)
    return _Plan(layer, layer.neurons, lambda u: u * fan_in, lambda u: u, wbits, sbits)


def _fits(demand: dict[str, int], limits: dict[str, int], only: str | None = None) -> bool:
    return all(demand[r] <= cap for r, cap in limits.items() if only in (None, r))


def _fraction(demand: dict[str, int], limits: dict[str, int]) -> tuple[str, float]:
    """The resource closest to (or furthest over) its limit on one core."""
    return max(((r, demand[r] / cap) for r, cap in limits.items()), key=lambda x: x[1])


def _min_cores(plan: _Plan, limits: dict[str, int], only: str | None = None) -> int | None:
    """Smallest k with a part of ceil(units / k) units fitting one core; None if none does."""
    if not _fits(plan.demand(1), limits, only):
        return None
    lo, hi = 1, plan.units  # hi fits (parts of one unit)
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(plan.demand(-(-plan.units // mid)), limits, only):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _usage(
    plan: _Plan, cores: int, ids: tuple[int, ...], limited_by: str, placeable: bool
) -> LayerUsage:
    layer, whole = plan.layer, plan.demand(plan.units)
    return LayerUsage(
        name=layer.name,
        kind=layer.kind,
        neurons=layer.neurons,
        neuron_entries=whole["neurons"],
        synapses=plan.weights(plan.units),
        synapse_bytes=whole["synapse_memory"],
        neuron_state_bytes=whole["core_memory"] - whole["synapse_memory"],
        weight_bits=plan.wbits,
        neuron_state_bits=plan.sbits,
        cores=cores,
        core_ids=ids,
        limited_by=limited_by,
        placeable=placeable,
    )


def _folded(layer: SpikingLayer) -> LayerUsage:
    return LayerUsage(layer.name, layer.kind, layer.neurons, 0, 0, 0, 0, 0, 0, 0, (), "none", True)


def _homogeneous(plans: list[_Plan], nm: Neuromorphic) -> list[LayerUsage]:
    limits = _limits(nm, 0)
    out, next_core = [], 0
    for plan in plans:
        k = _min_cores(plan, limits)
        if k is None:  # one unit alone is too big
            out.append(_usage(plan, 0, (), _fraction(plan.demand(1), limits)[0], False))
            continue
        by = {r: _min_cores(plan, limits, r) or 0 for r in limits}
        limited_by = max(by, key=lambda r: (by[r], -RESOURCES.index(r)))
        if k == 1:
            limited_by = _fraction(plan.demand(plan.units), limits)[0]
        ok = nm.max_cores_per_layer is None or k <= nm.max_cores_per_layer
        ids = tuple(range(next_core, next_core + k)) if ok and next_core + k <= nm.cores else ()
        next_core += k if ids else 0
        out.append(_usage(plan, k, ids, limited_by, ok))
    return out


def _matching(candidates: list[list[int]], cores: int) -> list[int | None]:
    """Layer -> core, one layer per core: a maximum matching by augmenting paths (Kuhn).

    Layers in order take the first free core they fit; a layer finding none moves earlier
    layers along augmenting paths, so the result is deterministic and complete if possible.
    """
    owner: list[int | None] = [None] * cores

    def augment(i: int, seen: set[int]) -> bool:
        for j in candidates[i]:
            if owner[j] is None:
                owner[j] = i
                return True
        for j in candidates[i]:
            if j not in seen:
                seen.add(j)
                if augment(owner[j], seen):  # type: ignore[arg-type]
                    owner[j] = i
                    return True
        return False

    for i in range(len(candidates)):
        augment(i, set())
    got: list[int | None] = [None] * len(candidates)
    for j, i in enumerate(owner):
        if i is not None:
            got[i] = j
    return got


def _heterogeneous(plans: list[_Plan], nm: Neuromorphic) -> list[LayerUsage]:
    limits = [_limits(nm, j) for j in range(nm.cores)]
    demands = [p.demand(p.units) for p in plans]
    candidates = [[j for j in range(nm.cores) if _fits(d, limits[j])] for d in demands]
    assigned = _matching(candidates, nm.cores)
    out = []
    for plan, demand, cands, core in zip(plans, demands, candidates, assigned, strict=True):
        if core is not None:
            out.append(_usage(plan, 1, (core,), _fraction(demand, limits[core])[0], True))
        else:  # the resource that rules out the core it comes closest to fitting
            best = min(range(nm.cores), key=lambda j: _fraction(demand, limits[j])[1])
            out.append(
                _usage(plan, 1 if cands else 0, (), _fraction(demand, limits[best])[0], bool(cands))
            )
    return out


def neuromorphic_report(layers: Sequence[SpikingLayer], target: Target) -> NeuromorphicReport:
    """Neurons, synapse and neuron-state bytes per layer, cores needed vs available, fits, and
    the limiting resource of `layers` on `target` (rules in the module docstring)."""
    nm = target.neuromorphic
    if nm is None:
        raise EdgeError(
            f"target {target.name!r} has no neuromorphic description "
            "(a [neuromorphic] table in its file)"
        )
    if not layers:
        raise EdgeError("neuromorphic_report needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, SpikingLayer):
            raise EdgeError(f"layers[{i}] is a {type(layer).__name__}, not a SpikingLayer")
    folded = [nm.pool_in_core and layer.kind == "sumpool" for layer in layers]
    plans = [
        _plan(layer, nm, target.name) for layer, f in zip(layers, folded, strict=True) if not f
    ]
    placed = iter(_homogeneous(plans, nm) if nm.homogeneous else _heterogeneous(plans, nm))
    usage = tuple(
        _folded(layer) if f else next(placed) for layer, f in zip(layers, folded, strict=True)
    )
    active = [u for u, f in zip(usage, folded, strict=True) if not f]

    needed = sum(u.cores for u in active)
    fits = all(u.placeable and u.core_ids for u in active)
    totals = {
        "neurons": sum(u.neuron_entries for u in active),
        "synapse_memory": sum(u.synapse_bytes for u in active),
        "core_memory": sum(u.synapse_bytes + u.neuron_state_bytes for u in active),
    }
    capacity = {r: sum(_limits(nm, j)[r] for j in range(nm.cores)) for r in _limits(nm, 0)}
    utilization = {r: totals[r] / capacity[r] for r in capacity}
    utilization["cores"] = needed / nm.cores
    unplaceable = [u for u in active if not u.placeable]
    if unplaceable:
        limiting = unplaceable[0].limited_by
    elif not nm.homogeneous and not fits:
        limiting = "cores"
    else:
        forced = {r: sum(u.cores for u in active if u.limited_by == r) for r in capacity}
        limiting = max(forced, key=lambda r: (forced[r], utilization[r]))
    notes = []
    if any(folded):
        notes.append(
            f"{sum(folded)} sum-pooling layers run on the previous layer's core "
            f"({target.name}: pool_in_core)"
        )
    if needed > nm.cores:
        notes.append(f"the packing rule needs {needed} cores, the chip has {nm.cores}")
    elif not nm.homogeneous and not fits and not unplaceable:
        notes.append(
            "too few cores of the sizes these layers need: no one-layer-per-core "
            "assignment places them all"
        )
    for u in unplaceable:
        why = (
            f"needs {u.cores} cores, at most {nm.max_cores_per_layer} per layer"
            if u.cores
            else f"does not fit any core ({u.limited_by})"
        )
        notes.append(f"layer {u.name or u.kind!r} {why}")
    return NeuromorphicReport(
        target=target.name,
        fits=fits,
        cores_needed=needed,
        cores_available=nm.cores,
        limiting_resource=limiting,
        utilization=utilization,
        layers=usage,
        neurons=sum(u.neurons for u in active),
        synapses=sum(u.synapses for u in active),
        synapse_bytes=totals["synapse_memory"],
        neuron_state_bytes=totals["core_memory"] - totals["synapse_memory"],
        notes=tuple(notes),
    )
