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

Size units (case-sensitive): B; kB and KB = 1000 B, KiB = 1024 B; MB = 1000**2, MiB = 1024**2;
GB = 1000**3, GiB = 1024**3; TB, TiB likewise. Microcontroller datasheets write "KB" for 1024
bytes; catalog files therefore say KiB/MiB. Bandwidth units: any size unit followed by "/s".

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


def parse_size(value: object, field_name: str = "size") -> int:
    """Bytes from an int of bytes or a string such as "320 KiB" or "4.2 MB"."""
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
            known = ", ".join(SIZE_UNITS)
            raise _Invalid(field_name, f"unknown unit {unit!r} in {value!r} (known: {known})")
    n_bytes = number * SIZE_UNITS[unit]
    if n_bytes <= 0:
        raise _Invalid(field_name, f"must be > 0, got {value!r}")
    if n_bytes.denominator != 1:
        raise _Invalid(field_name, f"{value!r} is not a whole number of bytes")
    return int(n_bytes)


def parse_bandwidth(value: object, field_name: str = "bandwidth") -> float:
    """Bytes per second from a number of B/s or a string such as "4 GB/s"."""
    rate: object = value
    if isinstance(value, str):
        match = _QUANTITY_RE.match(value)
        unit = match.group(2) if match else ""
        if not match or not unit.endswith("/s") or unit[:-2] not in SIZE_UNITS:
            raise _Invalid(
                field_name,
                f"cannot read {value!r}: expected e.g. '0.5 GB/s' "
                "(B/s, KB/s, MB/s, GB/s, KiB/s, ...)",
            )
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


@dataclass(frozen=True)
class MemoryTier:
    name: str
    kind: str  # one of TIER_KINDS
    bytes: int
    bandwidth_bytes_per_s: float | None = None
    source: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        _check_str(self, "name", "kind", "source", "notes")
        if not self.name.strip():
            raise _Invalid("name", "must not be empty")
        if self.kind not in TIER_KINDS:
            raise _Invalid("kind", _known(self.kind, TIER_KINDS, "tier kind"))
        if isinstance(self.bytes, bool) or not isinstance(self.bytes, int) or self.bytes <= 0:
            raise _Invalid("bytes", f"must be an int > 0, got {self.bytes!r}")
        bandwidth = self.bandwidth_bytes_per_s
        if bandwidth is not None and not _positive(bandwidth):
            raise _Invalid("bandwidth_bytes_per_s", f"must be a number > 0, got {bandwidth!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size": format_size(self.bytes)}


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

    def tier(self, kind: str) -> tuple[MemoryTier, ...]:
        return tuple(t for t in self.tiers if t.kind == kind)

    def total_bytes(self, kind: str) -> int:
        """Sum over the tiers of one kind (0 if none)."""
        return sum(t.bytes for t in self.tier(kind))

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
        }


# ---------------------------------------------------------------------------- loader

_TOP_KEYS = tuple("name description source dtypes runtime cpu triple notes compute tiers".split())
_COMPUTE_KEYS = ("ops_per_s", "dtype", "source")
_TIER_KEYS = ("name", "kind", "size", "bandwidth", "source", "notes")
# dataclass attribute -> the key a file spells it with
_FILE_FIELD = {"bytes": "size", "bandwidth_bytes_per_s": "bandwidth"}
_FILE_FIELD |= {"compute_ops_per_s": "compute.ops_per_s", "compute_dtype": "compute.dtype"}
_TYPE_NAMES = {str: "a string", list: "an array", dict: "a table", int: "an int", float: "a float"}


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
    if isinstance(value, bool) or not isinstance(value, kind):
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
    try:
        return MemoryTier(name, kind, size, bandwidth, source, notes)
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
