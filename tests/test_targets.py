"""The device catalog (targets/), its validation and the `edge targets` sub-app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import targets
from edge.app.commands.targets import app
from edge.errors import EdgeError
from targets import MemoryTier, Target

EXPECTED = {
    "stm32f746", "stm32h743", "stm32n657", "nrf52840", "esp32s3", "rp2040", "ethos-u55",
    "ethos-u65", "coral-edgetpu", "hailo8", "loihi2-core", "akd1000", "host", "ch32v307",
    "loihi2", "speck", "spinnaker2",
}  # fmt: skip

GOOD = """\
name = "myboard"
description = "A test board"
source = "my measurements"
dtypes = ["fp32", "int8"]
runtime = "TFLite Micro"

[compute]
ops_per_s = 1e8
source = "clock x 1"

[[tiers]]
name = "sram"
kind = "sram"
size = "256 KiB"
bandwidth = "0.5 GB/s"
source = "datasheet §3"

[[tiers]]
name = "flash"
kind = "flash"
size = 1048576
source = "datasheet §3"
"""


def write(tmp_path: Path, text: str, name: str = "board.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------- catalog


def test_catalog_has_the_devices() -> None:
    assert EXPECTED <= set(targets.names())
    assert len(targets.names()) >= 17


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_catalog_file_loads_with_sources(name: str) -> None:
    target = targets.load(name)
    assert target.name == name
    assert target.description and target.source.strip() and target.dtypes
    assert Path(target.origin).name == f"{name}.toml"
    assert target.tier("sram"), "every target needs an sram tier"
    for tier in target.tiers:
        assert tier.bytes > 0
        assert tier.source.strip(), f"{name}: tier {tier.name} has no source"
        assert 0 <= tier.reserved_bytes < tier.bytes
        assert tier.reserved_source.strip() or not tier.reserved_bytes
    if target.neuromorphic is not None:
        assert target.neuromorphic.source.strip(), f"{name}: neuromorphic figures unsourced"
    if target.compute_ops_per_s is not None:
        assert target.compute_ops_per_s > 0
        assert target.compute_source.strip(), f"{name}: compute figure has no source"
    json.dumps(target.to_dict())  # JSON-able


def test_catalog_returns_all_sorted() -> None:
    all_targets = targets.catalog()
    assert [t.name for t in all_targets] == targets.names()


def test_known_figures() -> None:
    f7 = targets.load("stm32f746")
    assert f7.total_bytes("sram") == 320 * 1024
    assert f7.total_bytes("flash") == 1024 * 1024
    assert f7.cpu == "cortex-m7" and f7.triple == "thumbv7em-none-eabihf"
    h7 = targets.load("stm32h743")
    assert h7.total_bytes("sram") == (128 + 512 + 288 + 64) * 1024
    assert h7.largest("sram").name == "axi_sram"
    assert targets.load("rp2040").total_bytes("sram") == 264 * 1024
    assert targets.load("host").total_bytes("dram") == 16 * 2**30
    u55 = targets.load("ethos-u55")
    assert u55.largest("flash").bandwidth_bytes_per_s == pytest.approx(0.5e9)
    assert targets.load("ethos-u65").total_bytes("dram") == 32 * 2**20
    assert targets.load("coral-edgetpu").compute_ops_per_s == pytest.approx(4e12)


def test_load_is_case_insensitive() -> None:
    assert targets.load("STM32F746") == targets.load("stm32f746")
    assert targets.load(" Host ").name == "host"


def test_unknown_name_lists_the_catalog() -> None:
    with pytest.raises(EdgeError) as info:
        targets.load("stm32f999")
    message = str(info.value)
    assert "stm32f999" in message and "stm32f746" in message and "host" in message
    assert "\n" not in message


# ------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1024, 1024),
        ("1 B", 1),
        ("1 KB", 1000),
        ("1 kB", 1000),
        ("1 KiB", 1024),
        ("320 KiB", 327680),
        ("1 MB", 10**6),
        ("1 MiB", 2**20),
        ("4.2 MB", 4_200_000),
        ("1.5 KiB", 1536),
        ("2 GB", 2 * 10**9),
        ("16 GiB", 16 * 2**30),
        ("1 TiB", 2**40),
        (" 8MiB ", 8 * 2**20),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    assert targets.parse_size(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (0, "> 0"),
        (-5, "> 0"),
        ("-1 KiB", "> 0"),
        ("0 MB", "> 0"),
        ("1024", "no unit"),
        ("1 kb", "ambiguous unit 'kb'.*bits or bytes"),
        ("1 Mb", "ambiguous unit 'Mb'.*bits or bytes"),
        ("1 b", "ambiguous unit 'b'"),
        ("1 KIB", "ambiguous unit 'KIB'.*'KiB'"),
        ("1 mib", "ambiguous unit 'mib'.*'MiB'"),
        ("1 K", "ambiguous unit 'K'.*1000 or 1024"),
        ("2 Ki", "ambiguous unit 'Ki'"),
        ("1 XB", "unknown unit 'XB'"),
        ("3 bytes", "unknown unit 'bytes'"),
        ("lots", "cannot read"),
        ("1.5 B", "whole number"),
        (1.5, "got float"),
        (True, "got bool"),
        ([1], "got list"),
    ],
)
def test_parse_size_rejects(value: object, reason: str) -> None:
    with pytest.raises(EdgeError, match=reason):
        targets.parse_size(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1 B/s", 1.0), ("0.5 GB/s", 5e8), ("4 GB/s", 4e9), ("3 MB/s", 3e6), ("2 KB/s", 2e3),
     ("1 GiB/s", 2.0**30), (1e9, 1e9), (12, 12.0)],
)  # fmt: skip
def test_parse_bandwidth(value: object, expected: float) -> None:
    assert targets.parse_bandwidth(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["4 GB", "4 Gb/s", "fast", "0 GB/s", -1, True, [4]])
def test_parse_bandwidth_rejects(value: object) -> None:
    with pytest.raises(EdgeError):
        targets.parse_bandwidth(value)


def test_bandwidth_in_bits_is_ambiguous() -> None:
    with pytest.raises(EdgeError, match="ambiguous unit 'Gb'"):
        targets.parse_bandwidth("4 Gb/s")


def test_parse_size_zero_only_when_allowed() -> None:
    assert targets.parse_size(0, allow_zero=True) == 0
    assert targets.parse_size("0 KiB", allow_zero=True) == 0
    with pytest.raises(EdgeError, match=">= 0"):
        targets.parse_size("-1 B", allow_zero=True)


@pytest.mark.parametrize(
    ("n_bytes", "text"),
    [(327680, "320 KiB"), (2**20, "1 MiB"), (8_000_000, "8 MB"), (16 * 2**30, "16 GiB"),
     (300, "300 B"), (1000, "1 KB")],
)  # fmt: skip
def test_format_size(n_bytes: int, text: str) -> None:
    assert targets.format_size(n_bytes) == text
    assert targets.parse_size(text) == n_bytes


# ------------------------------------------------------------------------- user files


def test_user_file_loads_by_path(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    for ref in (path, str(path)):
        target = targets.load(ref)
        assert target.name == "myboard"
        assert target.origin == str(path)
        assert target.tier("sram")[0].bytes == 256 * 1024
        assert target.tier("sram")[0].bandwidth_bytes_per_s == pytest.approx(5e8)
        assert target.tier("flash")[0].bytes == 2**20
        assert target.compute_ops_per_s == pytest.approx(1e8)
        assert target.dtypes == ("fp32", "int8")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EdgeError, match="no such target file"):
        targets.load(tmp_path / "nope.toml")


def edit(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


SRAM_SOURCE = 'source = "datasheet §3"\n\n'
SECOND_TIER = 'name = "flash"\nkind = "flash"\nsize = 1048576\n'
BAD_FILES = {
    "zero size": (edit('size = "256 KiB"', "size = 0"), "tiers[0].size", "> 0"),
    "negative size": (edit("size = 1048576", "size = -4"), "tiers[1].size", "> 0"),
    "negative size string": (edit('size = "256 KiB"', 'size = "-256 KiB"'), "tiers[0].size", "> 0"),
    "missing size": (edit('size = "256 KiB"\n', ""), "tiers[0].size", "missing"),
    "bad unit": (edit('size = "256 KiB"', 'size = "256 kilobytes"'), "tiers[0].size", "unit"),
    "ambiguous unit": (edit('size = "256 KiB"', 'size = "256 kb"'), "tiers[0].size", "ambiguous"),
    "no unit": (edit('size = "256 KiB"', 'size = "256"'), "tiers[0].size", "no unit"),
    "bad bandwidth": (edit('"0.5 GB/s"', '"0.5 GB"'), "tiers[0].bandwidth", "cannot read"),
    "unknown kind": (edit('kind = "flash"', 'kind = "eeprom"'), "tiers[1].kind", "eeprom"),
    "missing tier source": (edit(SRAM_SOURCE, "\n"), "tiers[0].source", "missing"),
    "empty tier source": (edit(SRAM_SOURCE, 'source = " "\n\n'), "tiers[0].source", "empty"),
    "missing compute source": (edit('source = "clock x 1"\n', ""), "compute.source", "missing"),
    "missing compute figure": (edit("ops_per_s = 1e8\n", ""), "compute.ops_per_s", "missing"),
    "zero compute": (edit("ops_per_s = 1e8", "ops_per_s = 0"), "compute.ops_per_s", "> 0"),
    "missing top source": (edit('source = "my measurements"\n', ""), "source", "missing"),
    "duplicate tier": (edit('name = "flash"', 'name = "sram"'), "tiers[1].name", "duplicate"),
    "no sram tier": (edit('kind = "sram"', 'kind = "dram"'), "tiers", "sram"),
    "no tiers": (GOOD.split("[[tiers]]")[0], "tiers", "missing"),
    "size wrong type": (edit("size = 1048576", "size = 1.5"), "tiers[1].size", "float"),
    "bool size": (edit("size = 1048576", "size = true"), "tiers[1].size", "bool"),
    "name wrong type": (edit('name = "myboard"', "name = 3"), "name", "string"),
    "dtypes not a list": (edit('dtypes = ["fp32", "int8"]', 'dtypes = "fp32"'), "dtypes", "array"),
    "unknown dtype": (edit('"int8"]', '"int9"]'), "dtypes[1]", "int9"),
    "empty dtypes": (edit('dtypes = ["fp32", "int8"]', "dtypes = []"), "dtypes", "at least"),
    "bad name": (edit('name = "myboard"', 'name = "My Board"'), "name", "lowercase"),
    "unknown key": (edit('runtime = "TFLite Micro"', 'runtme = "x"'), "runtme", "unknown key"),
    "unknown tier key": (
        edit(SECOND_TIER, SECOND_TIER + "sise = 3\n"),
        "tiers[1].sise",
        "unknown key",
    ),
    "tiers not tables": ("tiers = [1, 2]\n" + GOOD.split("[[tiers]]")[0], "tiers[0]", "table"),
    "syntax error": (
        edit('runtime = "TFLite Micro"', "runtime = TFLite Micro"),
        "TOML syntax error",
        "line",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_names_file_and_field(tmp_path: Path, case: str) -> None:
    text, field, reason = BAD_FILES[case]
    path = write(tmp_path, text)
    with pytest.raises(EdgeError) as info:
        targets.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}"), message
    assert reason in message, message
    assert "\n" not in message


# ------------------------------------------------------------------------- dataclasses


def sram(name: str = "sram", size: int = 1024) -> MemoryTier:
    return MemoryTier(name, "sram", size, source="x")


def test_dataclasses_validate_directly() -> None:
    target = Target("t", "d", [sram()], ["int8"])  # lists become tuples
    assert target.tiers == (sram(),) and target.dtypes == ("int8",)
    hash(target)
    with pytest.raises(EdgeError, match="bytes"):
        MemoryTier("s", "sram", 0)
    with pytest.raises(EdgeError, match="kind"):
        MemoryTier("s", "cache", 10)
    with pytest.raises(EdgeError, match="bandwidth"):
        MemoryTier("s", "sram", 10, bandwidth_bytes_per_s=-1.0)
    with pytest.raises(EdgeError, match=r"tiers\[1\]\.name"):
        Target("t", "d", (sram(), sram()), ("int8",))
    with pytest.raises(EdgeError, match="sram"):
        Target("t", "d", (MemoryTier("d", "dram", 10),), ("int8",))
    with pytest.raises(EdgeError, match="compute_ops_per_s"):
        Target("t", "d", (sram(),), ("int8",), compute_ops_per_s=0)
    with pytest.raises(EdgeError, match="dtypes"):
        Target("t", "d", (sram(),), ())


def test_tier_helpers() -> None:
    tiers = (sram("a", 10), sram("b", 30), MemoryTier("f", "flash", 5))
    target = Target("t", "d", tiers, ("int8",))
    assert [t.name for t in target.tier("sram")] == ["a", "b"]
    assert target.total_bytes("sram") == 40 and target.total_bytes("dram") == 0
    assert target.largest("sram").name == "b" and target.largest("dram") is None


# ------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_list_table() -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    for name in ("stm32f746", "ethos-u55", "loihi2-core", "host"):
        assert name in result.output
    assert "320 KiB" in result.output


def test_cli_list_json() -> None:
    result = runner.invoke(app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"targets"}
    assert [t["name"] for t in data["targets"]] == targets.names()
    f7 = next(t for t in data["targets"] if t["name"] == "stm32f746")
    assert f7["tiers"][0]["bytes"] == 327680 and f7["tiers"][0]["source"]
    assert f7["compute"]["ops_per_s"] > 0 and f7["compute"]["source"]


def test_cli_show_table() -> None:
    result = runner.invoke(app, ["show", "STM32H743"])
    assert result.exit_code == 0, result.output
    assert "stm32h743" in result.output and "axi_sram" in result.output
    assert "DS12110" in result.output  # sources are shown


def test_cli_show_json_and_user_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["show", "ethos-u65", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["name"] == "ethos-u65" and data["tiers"][1]["kind"] == "dram"
    path = write(tmp_path, GOOD)
    result = runner.invoke(app, ["show", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == "myboard"


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_cli_errors_exit_2_without_traceback(tmp_path: Path, json_flag: list[str]) -> None:
    result = runner.invoke(app, ["show", "nosuchboard", *json_flag])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unknown target 'nosuchboard'")
    assert "Traceback" not in result.output and result.stdout == ""
    bad = write(tmp_path, edit('size = "256 KiB"', "size = 0"))
    result = runner.invoke(app, ["show", str(bad), *json_flag])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {bad}: tiers[0].size: must be > 0, got 0"
