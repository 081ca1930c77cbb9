"""Device targets: frozen dataclasses loaded and validated from TOML.

`load(name_or_path)` returns a `Target`: a catalog name (case-insensitive, see `names()`) or a
path to a user `.toml` file. The catalog lives in `targets/devices/*.toml`; `catalog()` loads
all of it. The field names of `Target` and `MemoryTier` are the contract `edge.sim` uses.

File schema (every figure carries the document it was read from)::

    name = "stm32f746"             # required: lowercase letters, digits, '.', '_', '-'
    description = "..."            # required
    source = "..."                 # required: where the description and dtypes come from
    dtypes = ["fp32", "int8"]      # required, non-empty, from DTYPES
    runtime = "..."                # optional: inference/training runtimes that exist for it
    cpu = "cortex-m7"              # optional: -mcpu style name, for cross compilation
    triple = "thumbv7em-none-eabihf"  # optional: target triple
    notes = "..."                  # optional

    [compute]                      # optional table
    ops_per_s = 4.32e8             # required in the table: a number > 0 (peak, not measured)
    dtype = "fp32"                 # optional: the dtype the figure is for
    source = "..."                 # required in the table

    [[tiers]]                      # one or more; at least one of kind "sram"
    name = "sram"                  # required, unique within the file
    kind = "sram"                  # required, one of TIER_KINDS
    size = "320 KiB"               # required: int of bytes, or a string with a unit
    bandwidth = "4 GB/s"           # optional: number of B/s, or a string with a unit
    source = "..."                 # required: covers every figure of this tier
    notes = "..."                  # optional
    reserved = "1536 B"            # optional, default 0: bytes the runtime keeps for itself
    reserved_source = "..."        # required when reserved > 0

    [neuromorphic]                 # optional: a spiking-network accelerator (see Neuromorphic)
    cores = 128                    # required: cores of the device
    neurons_per_core = 8192        # optional: int, or one int per core
    synapse_memory = "128 KiB"     # weight memory per core: a size, or one size per core
    core_memory = "128 KiB"        # or/and: one memory per core for neuron state and weights
    weight_bits = 8                # optional: bits of one stored weight
    neuron_state_bits = 16         # optional: bits of state per neuron
    shared_kernels = true          # optional, default false: a conv kernel is stored once
    pow2_addressing = true         # optional, default false: Speck-style power-of-2 entries
    pool_in_core = true            # optional, default false: sum pooling costs no core
    max_cores_per_layer = 1        # optional: how many cores one layer may span
    source = "..."                 # required: covers every figure of the table
    notes = "..."                  # optional

Size units (case-sensitive, in the tables above and in every size string):

* ``B`` - bytes; a plain TOML integer is bytes too.
* ``kB`` and ``KB`` = 1000 B, ``MB`` = 1000**2, ``GB`` = 1000**3, ``TB`` = 1000**4 (SI).
* ``KiB`` = 1024 B, ``MiB`` = 1024**2, ``GiB`` = 1024**3, ``TiB`` = 1024**4 (IEC).

Microcontroller datasheets write "KB" for 1024 bytes (ST's "320 Kbytes" of SRAM are 327,680
bytes), so catalog files write what the vendor means, in KiB/MiB, and say so in the source.
Anything else is refused with a one-line error naming file and field: a unit that differs from
one of these only in case (``KIB``, ``mib``), ends in a lower-case ``b`` (``kb``, ``Mb``: bits or
bytes?) or is a bare prefix (``K``, ``M``, ``Ki``) is *ambiguous*; any other word is *unknown*.
Bandwidths: a size unit followed by "/s".

Reserved memory (`MemoryTier.reserved_bytes`): what the runtime itself takes from a tier before
any tensor - the stack(s), the C heap, the RTOS and its buffers, the bootloader's region - with
the document it comes from. The simulator's fit verdict counts against `usable_bytes` =
capacity - reserved and reports both. The figure is 0 unless a source gives one; catalog files
cite toolchain defaults (a vendor linker script's minimum stack and heap, an SDK's stack banks),
which are a floor: the application's own static data and stacks come on top.

Several tiers of one kind are separate memories (e.g. DTCM and AXI SRAM): one buffer must fit
in one of them (`largest`), while the total (`total_bytes`) bounds everything together.

Any problem with a file raises `edge.errors.EdgeError` with one line: the file, the field
(e.g. ``tiers[1].size``) and the reason. Constructing the dataclasses directly validates the
same invariants (the file name is then absent).
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from edge.errors import EdgeError

TIER_KINDS = ("sram", "flash", "dram")
DTYPES = ("fp64", "fp32", "fp16", "bf16", "int32", "int16", "int8", "uint8", "int4", "int2", "int1")
DEVICES_DIR = Path(__file__).resolve().parent / "devices"
SIZE_UNITS: dict[str, int] = {
    "B": 1, "kB": 1000, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2,
    "GB": 1000**3, "GiB": 1024**3, "TB": 1000**4, "TiB": 1024**4,
}  # fmt: skip
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_QUANTITY_RE = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*([A-Za-z/]*)\s*$")


class _Invalid(EdgeError):
    """A validation failure of one field; the loader adds the file name."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field, self.reason = field_name, reason


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive(value: object) -> bool:
    return _is_number(value) and math.isfinite(value) and value > 0  # type: ignore[operator]


def _known(value: str, known: tuple[str, ...], what: str) -> str:
    return f"unknown {what} {value!r} (known: {', '.join(known)})"


def _unit_problem(unit: str, value: str) -> str:
    """Why `unit` is not a size unit: ambiguous (case, bits, bare prefix) or unknown."""
    fix = "write B, kB/KB (1000), KiB (1024), MB/MiB, GB/GiB or TB/TiB"
    folded = {u.lower(): u for u in SIZE_UNITS}
    if unit.endswith("b") and (unit[:-1] + "B" in SIZE_UNITS or unit == "b"):
        return f"ambiguous unit {unit!r} in {value!r} (bits or bytes?): {fix}"
    if unit.lower() in folded:
        return f"ambiguous unit {unit!r} in {value!r} (did you mean {folded[unit.lower()]!r}?)"
    if unit in ("k", "K", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"):
        return f"ambiguous unit {unit!r} in {value!r} (no B: 1000 or 1024?): {fix}"
    return f"unknown unit {unit!r} in {value!r}: {fix}"


def parse_size(value: object, field_name: str = "size", *, allow_zero: bool = False) -> int:
    """Bytes from an int of bytes or a string such as "320 KiB" or "4.2 MB" (units above).

    Must be > 0 (>= 0 with `allow_zero`) and a whole number of bytes.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        got = type(value).__name__
        raise _Invalid(field_name, f"must be an int of bytes or a string like '320 KiB', got {got}")
    if isinstance(value, int):
        number, unit = Fraction(value), "B"
    else:
        match = _QUANTITY_RE.match(value)
        if not match:
            raise _Invalid(field_name, f"cannot read {value!r}: expected e.g. '320 KiB'")
        number, unit = Fraction(match.group(1)), match.group(2)
        if not unit:
            raise _Invalid(field_name, f"{value!r} has no unit (B, KB, KiB, MB, MiB, GB, GiB, ...)")
        if unit not in SIZE_UNITS:
            raise _Invalid(field_name, _unit_problem(unit, value))
    n_bytes = number * SIZE_UNITS[unit]
    if n_bytes < 0 or (n_bytes == 0 and not allow_zero):
        raise _Invalid(field_name, f"must be {'>=' if allow_zero else '>'} 0, got {value!r}")
    if n_bytes.denominator != 1:
        raise _Invalid(field_name, f"{value!r} is not a whole number of bytes")
    return int(n_bytes)


def parse_bandwidth(value: object, field_name: str = "bandwidth") -> float:
    """Bytes per second from a number of B/s or a string such as "4 GB/s"."""
    rate: object = value
    if isinstance(value, str):
        match = _QUANTITY_RE.match(value)
        unit = match.group(2) if match else ""
        if not match or not unit.endswith("/s"):
            raise _Invalid(
                field_name,
                f"cannot read {value!r}: expected e.g. '0.5 GB/s' "
                "(B/s, KB/s, MB/s, GB/s, KiB/s, ...)",
            )
        if unit[:-2] not in SIZE_UNITS:
            raise _Invalid(field_name, _unit_problem(unit[:-2], value))
        rate = float(match.group(1)) * SIZE_UNITS[unit[:-2]]
    elif not _is_number(value):
        got = type(value).__name__
        raise _Invalid(field_name, f"must be a number of B/s or a string like '4 GB/s', got {got}")
    if not _positive(rate):
        raise _Invalid(field_name, f"must be > 0, got {value!r}")
    return float(rate)  # type: ignore[arg-type]


def format_size(n_bytes: int) -> str:
    """The shortest exact spelling: 327680 -> '320 KiB', 8000000 -> '8 MB'."""
    for unit in ("TiB", "GiB", "MiB", "KiB", "TB", "GB", "MB", "KB"):
        if n_bytes % SIZE_UNITS[unit] == 0:
            return f"{n_bytes // SIZE_UNITS[unit]} {unit}"
    return f"{n_bytes} B" if n_bytes < 2**20 else f"{n_bytes / 2**20:.2f} MiB"


def format_rate(value: float, unit: str) -> str:
    """4.32e8 -> '432 M<unit>' (decimal prefixes)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _check_str(obj: object, *attrs: str, optional: bool = False) -> None:
    for attr in attrs:
        value = getattr(obj, attr)
        if not (isinstance(value, str) or (optional and value is None)):
            raise _Invalid(attr, f"must be a string, got {type(value).__name__}")


def _check_int(value: object, name: str, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):  # type: ignore[operator]
        bound = f"an int >= {low}" if high is None else f"an int in {low}..{high}"
        raise _Invalid(name, f"must be {bound}, got {value!r}")


@dataclass(frozen=True)
class MemoryTier:
    """One memory of a device. `reserved_bytes` is what the runtime keeps (stack, heap, RTOS),
    per `reserved_source`; tensors get `usable_bytes` = bytes - reserved_bytes."""

    name: str
    kind: str  # one of TIER_KINDS
    bytes: int
    bandwidth_bytes_per_s: float | None = None
    source: str = ""
    notes: str = ""
    reserved_bytes: int = 0
    reserved_source: str = ""

    def __post_init__(self) -> None:
        _check_str(self, "name", "kind", "source", "notes", "reserved_source")
        if not self.name.strip():
            raise _Invalid("name", "must not be empty")
        if self.kind not in TIER_KINDS:
            raise _Invalid("kind", _known(self.kind, TIER_KINDS, "tier kind"))
        if isinstance(self.bytes, bool) or not isinstance(self.bytes, int) or self.bytes <= 0:
            raise _Invalid("bytes", f"must be an int > 0, got {self.bytes!r}")
        bandwidth = self.bandwidth_bytes_per_s
        if bandwidth is not None and not _positive(bandwidth):
            raise _Invalid("bandwidth_bytes_per_s", f"must be a number > 0, got {bandwidth!r}")
        _check_int(self.reserved_bytes, "reserved_bytes", 0)
        if self.reserved_bytes >= self.bytes:
            raise _Invalid(
                "reserved_bytes",
                f"{self.reserved_bytes} leaves nothing of the "
                f"{self.bytes} bytes of tier {self.name!r}",
            )
        if self.reserved_bytes and not self.reserved_source.strip():
            raise _Invalid("reserved_source", "must say where the reserved figure comes from")

    @property
    def usable_bytes(self) -> int:
        """Capacity left for tensors: bytes - reserved_bytes."""
        return self.bytes - self.reserved_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "size": format_size(self.bytes),
            "reserved": format_size(self.reserved_bytes) if self.reserved_bytes else "0 B",
            "usable_bytes": self.usable_bytes,
        }


def _per_core(value: object, cores: int, name: str) -> tuple[int, ...] | None:
    """None, an int for every core, or one int > 0 per core -> a tuple of `cores` ints."""
    if value is None:
        return None
    items = list(value) if isinstance(value, list | tuple) else [value] * cores
    if len(items) != cores:
        raise _Invalid(name, f"lists {len(items)} values for {cores} cores")
    for v in items:
        _check_int(v, name, 1)
    return tuple(items)


def _compact(values: tuple[int, ...] | None) -> int | list[int] | None:
    if values is None:
        return None
    return values[0] if len(set(values)) == 1 else list(values)


@dataclass(frozen=True)
class Neuromorphic:
    """A spiking-network accelerator: cores with neuron and synapse (weight) memories.

    Per-core figures are stored one per core (an int given for all cores is repeated):

    * `neurons_per_core` - the most neurons (neuron-memory entries) one core holds; None when
      only memory bounds it (a software platform such as SpiNNaker2).
    * `synapse_bytes_per_core` - weight memory of one core; `core_bytes_per_core` - one memory
      holding neuron state *and* weights. At least one of the two.
    * `weight_bits`, `neuron_state_bits` - storage per weight / per neuron, None when the
      platform leaves it to software (then every layer must give its own).

    Properties of how networks map, each a documented trait of the device:

    * `shared_kernels` - a conv layer stores each kernel weight once (Speck); otherwise every
      connection stores its own weight (`neurons * fan_in`, as compilers that expand a
      convolution into per-connection synapses do on Loihi).
    * `pow2_addressing` - entries are rounded up to powers of two by the address encoding
      (Speck: kernel c * 2^(ceil log2(kx ky) + ceil log2 f), neurons f * 2^(ceil log2 fy +
      ceil log2 fx)).
    * `pool_in_core` - sum pooling is done on a core's output (Speck's conv -> spike -> pool
      layer), costing no neurons, weights or core of its own.
    * `max_cores_per_layer` - how many cores one layer may span (None: any number). Cores of
      different sizes (a per-core list that is not constant) require 1: each layer then takes
      exactly one core, assigned by bipartite matching as Sinabs does.
    """

    cores: int
    neurons_per_core: tuple[int, ...] | None = None
    synapse_bytes_per_core: tuple[int, ...] | None = None
    core_bytes_per_core: tuple[int, ...] | None = None
    weight_bits: int | None = None
    neuron_state_bits: int | None = None
    shared_kernels: bool = False
    pow2_addressing: bool = False
    pool_in_core: bool = False
    max_cores_per_layer: int | None = None
    source: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        _check_str(self, "source", "notes")
        _check_int(self.cores, "cores", 1)
        for attr in ("neurons_per_core", "synapse_bytes_per_core", "core_bytes_per_core"):
            object.__setattr__(self, attr, _per_core(getattr(self, attr), self.cores, attr))
        if self.synapse_bytes_per_core is None and self.core_bytes_per_core is None:
            raise _Invalid(
                "synapse_bytes_per_core",
                "give the weight memory per core "
                "(synapse_memory) or the shared memory per core (core_memory)",
            )
        for attr in ("weight_bits", "neuron_state_bits"):
            if getattr(self, attr) is not None:
                _check_int(getattr(self, attr), attr, 1, 64)
        for attr in ("shared_kernels", "pow2_addressing", "pool_in_core"):
            if not isinstance(getattr(self, attr), bool):
                raise _Invalid(attr, f"must be true or false, got {getattr(self, attr)!r}")
        if self.pow2_addressing and not self.shared_kernels:
            raise _Invalid("pow2_addressing", "rounds kernel entries, so it needs shared_kernels")
        if self.max_cores_per_layer is not None:
            _check_int(self.max_cores_per_layer, "max_cores_per_layer", 1, self.cores)
        if not self.homogeneous and self.max_cores_per_layer != 1:
            raise _Invalid(
                "max_cores_per_layer",
                "cores of different sizes need max_cores_per_layer = 1 (one layer per core)",
            )
        if not self.source.strip():
            raise _Invalid("source", "must say where the figures come from")

    @property
    def homogeneous(self) -> bool:
        """Every core has the same figures."""
        return all(
            v is None or len(set(v)) == 1
            for v in (self.neurons_per_core, self.synapse_bytes_per_core, self.core_bytes_per_core)
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for attr in ("neurons_per_core", "synapse_bytes_per_core", "core_bytes_per_core"):
            d[attr] = _compact(getattr(self, attr))
        return d


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    tiers: tuple[MemoryTier, ...]
    dtypes: tuple[str, ...]
    compute_ops_per_s: float | None = None
    runtime: str | None = None
    notes: str = ""
    source: str = ""
    compute_dtype: str | None = None
    compute_source: str = ""
    cpu: str | None = None  # -mcpu style name, for cross compilation
    triple: str | None = None  # target triple, e.g. "thumbv7em-none-eabihf"
    origin: str = field(default="", compare=False)  # the file it was loaded from
    neuromorphic: Neuromorphic | None = None

    def __post_init__(self) -> None:
        _check_str(self, "name", "description", "notes", "source", "compute_source", "origin")
        _check_str(self, "runtime", "cpu", "triple", "compute_dtype", optional=True)
        if not _NAME_RE.match(self.name):
            raise _Invalid("name", f"{self.name!r}: use lowercase letters, digits, '.', '_', '-'")
        for attr in ("tiers", "dtypes"):  # accept lists; store tuples (hashable, immutable)
            if not isinstance(getattr(self, attr), list | tuple):
                raise _Invalid(attr, f"must be a list, got {type(getattr(self, attr)).__name__}")
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        if not self.dtypes:
            raise _Invalid("dtypes", "must list at least one dtype")
        for i, dtype in enumerate(self.dtypes):
            if dtype not in DTYPES:
                raise _Invalid(f"dtypes[{i}]", _known(dtype, DTYPES, "dtype"))
            if dtype in self.dtypes[:i]:
                raise _Invalid(f"dtypes[{i}]", f"duplicate dtype {dtype!r}")
        if not self.tiers:
            raise _Invalid("tiers", "must list at least one memory tier")
        for i, tier in enumerate(self.tiers):
            if not isinstance(tier, MemoryTier):
                raise _Invalid(f"tiers[{i}]", f"must be a MemoryTier, got {type(tier).__name__}")
            if tier.name in (t.name for t in self.tiers[:i]):
                raise _Invalid(f"tiers[{i}].name", f"duplicate tier name {tier.name!r}")
        if not self.tier("sram"):
            raise _Invalid("tiers", "no tier of kind 'sram' (the on-chip working memory)")
        ops = self.compute_ops_per_s
        if ops is not None and not _positive(ops):
            raise _Invalid("compute_ops_per_s", f"must be a number > 0, got {ops!r}")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPES:
            raise _Invalid("compute_dtype", _known(self.compute_dtype, DTYPES, "dtype"))
        nm = self.neuromorphic
        if nm is not None and not isinstance(nm, Neuromorphic):
            raise _Invalid("neuromorphic", f"must be a Neuromorphic, got {type(nm).__name__}")

    def tier(self, kind: str) -> tuple[MemoryTier, ...]:
        return tuple(t for t in self.tiers if t.kind == kind)

    def total_bytes(self, kind: str) -> int:
        """Sum over the tiers of one kind (0 if none)."""
        return sum(t.bytes for t in self.tier(kind))

    def usable_bytes(self, kind: str) -> int:
        """Sum over the tiers of one kind of what is left after the reserved bytes."""
        return sum(t.usable_bytes for t in self.tier(kind))

    def largest(self, kind: str) -> MemoryTier | None:
        """The biggest single tier of one kind: the bound for one contiguous buffer."""
        return max(self.tier(kind), key=lambda t: t.bytes, default=None)

    def to_dict(self) -> dict[str, Any]:
        compute = None
        if self.compute_ops_per_s is not None:
            compute = {
                "ops_per_s": self.compute_ops_per_s,
                "dtype": self.compute_dtype,
                "source": self.compute_source,
            }
        scalars = ("name", "description", "runtime", "cpu", "triple", "notes", "source", "origin")
        return {
            **{key: getattr(self, key) for key in scalars},
            "dtypes": list(self.dtypes),
            "compute": compute,
            "tiers": [t.to_dict() for t in self.tiers],
            "neuromorphic": None if self.neuromorphic is None else self.neuromorphic.to_dict(),
        }


# ---------------------------------------------------------------------------- loader

_TOP_KEYS = tuple(
    "name description source dtypes runtime cpu triple notes compute tiers neuromorphic".split()
)
_COMPUTE_KEYS = ("ops_per_s", "dtype", "source")
_TIER_KEYS = ("name", "kind", "size", "bandwidth", "source", "notes", "reserved", "reserved_source")
_NEURO_KEYS = tuple(
    "cores neurons_per_core synapse_memory core_memory weight_bits "
    "neuron_state_bits shared_kernels pow2_addressing pool_in_core "
    "max_cores_per_layer source notes".split()
)
# dataclass attribute -> the key a file spells it with
_FILE_FIELD = {"bytes": "size", "bandwidth_bytes_per_s": "bandwidth", "reserved_bytes": "reserved"}
_FILE_FIELD |= {"compute_ops_per_s": "compute.ops_per_s", "compute_dtype": "compute.dtype"}
_FILE_FIELD |= {"synapse_bytes_per_core": "synapse_memory", "core_bytes_per_core": "core_memory"}
_TYPE_NAMES = {
    str: "a string",
    list: "an array",
    dict: "a table",
    int: "an int",
    float: "a float",
    bool: "true or false",
}


def _take(
    table: dict[str, Any],
    key: str,
    where: str,
    kind: type | tuple[type, ...],
    required: bool = False,
) -> Any:
    """table[key] checked against `kind`; required values must also be non-empty strings."""
    if key not in table:
        if required:
            raise _Invalid(where + key, "missing")
        return None
    value = table[key]
    kinds_ = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds_) or not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        names = " or ".join(_TYPE_NAMES[k] for k in kinds)
        raise _Invalid(where + key, f"must be {names}, got {type(value).__name__}")
    if required and isinstance(value, str) and not value.strip():
        raise _Invalid(where + key, "must not be empty")
    return value


def _no_unknown_keys(table: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            raise _Invalid(where + key, f"unknown key (known: {', '.join(known)})")


def _parse_tier(raw: object, i: int) -> MemoryTier:
    where = f"tiers[{i}]."
    if not isinstance(raw, dict):
        raise _Invalid(f"tiers[{i}]", "must be a table ([[tiers]])")
    _no_unknown_keys(raw, _TIER_KEYS, where)
    name = _take(raw, "name", where, str, required=True)
    kind = _take(raw, "kind", where, str, required=True)
    if "size" not in raw:
        raise _Invalid(where + "size", "missing")
    size = parse_size(raw["size"], where + "size")
    bandwidth = raw.get("bandwidth")
    bandwidth = None if bandwidth is None else parse_bandwidth(bandwidth, where + "bandwidth")
    source = _take(raw, "source", where, str, required=True)
    notes = _take(raw, "notes", where, str) or ""
    reserved = parse_size(raw.get("reserved", 0), where + "reserved", allow_zero=True)
    reserved_source = _take(raw, "reserved_source", where, str, required=reserved > 0) or ""
    try:
        return MemoryTier(name, kind, size, bandwidth, source, notes, reserved, reserved_source)
    except _Invalid as e:
        raise _Invalid(where + _FILE_FIELD.get(e.field, e.field), e.reason) from None


def _sizes(raw: object, where: str) -> int | list[int] | None:
    """A size or an array of sizes (one per core)."""
    if raw is None:
        return None
    if isinstance(raw, list):
        return [parse_size(v, f"{where}[{i}]") for i, v in enumerate(raw)]
    return parse_size(raw, where)


def _parse_neuromorphic(raw: dict[str, Any]) -> Neuromorphic:
    where = "neuromorphic."
    _no_unknown_keys(raw, _NEURO_KEYS, where)
    counts = {
        "cores": _take(raw, "cores", where, int, required=True),
        "neurons_per_core": _take(raw, "neurons_per_core", where, (int, list)),
    }
    for key in ("weight_bits", "neuron_state_bits", "max_cores_per_layer"):
        counts[key] = _take(raw, key, where, int)
    flags = {
        key: _take(raw, key, where, bool) or False
        for key in ("shared_kernels", "pow2_addressing", "pool_in_core")
    }
    memories = {
        "synapse_bytes_per_core": _sizes(raw.get("synapse_memory"), where + "synapse_memory"),
        "core_bytes_per_core": _sizes(raw.get("core_memory"), where + "core_memory"),
    }
    source = _take(raw, "source", where, str, required=True)
    notes = _take(raw, "notes", where, str) or ""
    try:
        return Neuromorphic(source=source, notes=notes, **counts, **flags, **memories)  # type: ignore[arg-type]
    except _Invalid as e:
        raise _Invalid(where + _FILE_FIELD.get(e.field, e.field), e.reason) from None


def _parse(data: dict[str, Any], origin: str) -> Target:
    _no_unknown_keys(data, _TOP_KEYS, "")
    compute: dict[str, Any] = _take(data, "compute", "", dict) or {}
    _no_unknown_keys(compute, _COMPUTE_KEYS, "compute.")
    in_compute = "compute" in data  # a [compute] table needs both the figure and its source
    ops = _take(compute, "ops_per_s", "compute.", (int, float), required=in_compute)
    compute_source = _take(compute, "source", "compute.", str, required=in_compute) or ""
    name = _take(data, "name", "", str, required=True)
    description = _take(data, "description", "", str, required=True)
    source = _take(data, "source", "", str, required=True)
    dtypes = _take(data, "dtypes", "", list, required=True)
    for i, dtype in enumerate(dtypes):
        if not isinstance(dtype, str):
            raise _Invalid(f"dtypes[{i}]", f"must be a string, got {type(dtype).__name__}")
    tiers = tuple(_parse_tier(raw, i) for i, raw in enumerate(_take(data, "tiers", "", list, True)))
    neuro = _take(data, "neuromorphic", "", dict)
    neuromorphic = None if neuro is None else _parse_neuromorphic(neuro)
    try:
        return Target(
            name,
            description,
            tiers,
            tuple(dtypes),
            compute_ops_per_s=None if ops is None else float(ops),
            runtime=_take(data, "runtime", "", str),
            notes=_take(data, "notes", "", str) or "",
            source=source,
            compute_dtype=_take(compute, "dtype", "compute.", str),
            compute_source=compute_source,
            cpu=_take(data, "cpu", "", str),
            triple=_take(data, "triple", "", str),
            origin=origin,
            neuromorphic=neuromorphic,
        )
    except _Invalid as e:
        raise _Invalid(_FILE_FIELD.get(e.field, e.field), e.reason) from None


def load_file(path: str | Path) -> Target:
    """Load and validate one target file; any problem is an EdgeError naming file and field."""
    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeError(f"{path}: no such target file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeError(f"{path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise EdgeError(f"{path}: TOML syntax error: {' '.join(str(e).split())}") from None
    try:
        return _parse(data, str(path))
    except _Invalid as e:
        raise EdgeError(f"{path}: {e.field}: {e.reason}") from None


def names() -> list[str]:
    """The catalog's target names, sorted."""
    return sorted(p.stem for p in DEVICES_DIR.glob("*.toml"))


def load(name_or_path: str | Path) -> Target:
    """A catalog target by name (case-insensitive) or a user target file by path."""
    text = str(name_or_path)
    key = text.strip().lower()
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text:
        return load_file(name_or_path)
    if key not in names():
        if Path(text).is_file():
            return load_file(text)
        raise EdgeError(
            f"unknown target {text!r}: known targets are {', '.join(names())}; "
            "or pass a path to a .toml file"
        )
    path = DEVICES_DIR / f"{key}.toml"
    target = load_file(path)
    if target.name != key:
        raise EdgeError(f"{path}: name: {target.name!r} must match the file name {key!r}")
    return target


def catalog() -> list[Target]:
    """Every catalog target, sorted by name."""
    return [load(name) for name in names()]
