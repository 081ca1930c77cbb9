"""Catalog figures as their sources mean them, reserved memory, and [neuromorphic] tables."""

from __future__ import annotations

from pathlib import Path

import pytest

import targets
from edge.errors import EdgeError
from targets import MemoryTier, Neuromorphic, Target

KI, MI, GI = 1024, 1024**2, 1024**3

# target -> {tier: (bytes, reserved bytes)}, each worked out from the file's cited source:
# vendor "KB"/"Kbyte" of on-chip memory = 1024 B; "8MB"/"20 MB" where the source does not say
# which MB = 10**6 (the smaller reading).
FIGURES = {
    "akd1000": {"sram": (8_000_000, 0)},
    "ch32v307": {"sram": (64 * KI, 2048), "flash": (256 * KI, 0)},  # WCH Link.ld stack 2048
    "coral-edgetpu": {"param_cache": (8_000_000, 0)},
    "esp32s3": {"sram": (512 * KI, 0), "flash": (8 * MI, 0), "psram": (8 * MI, 0)},
    "ethos-u55": {"sram": (2 * MI, 0), "flash": (32 * MI, 0)},
    "ethos-u65": {"npu_sram": (393_216, 0), "dram": (32 * MI, 0)},  # vela arena_cache_size
    "hailo8": {"sram": (20_000_000, 0)},
    "host": {"llc": (16 * MI, 0), "dram": (16 * GI, 0)},
    "loihi2-core": {"core_sram": (128 * KI, 0)},
    "loihi2": {"core_sram": (128 * 128 * KI, 0)},
    "nrf52840": {"ram": (256 * KI, 1024 + 2048), "flash": (MI, 0)},  # Zephyr main + ISR stacks
    "rp2040": {"sram": ((4 * 64 + 2 * 4) * KI, 2 * 4 * KI), "qspi_flash": (2 * MI, 0)},
    "speck": {"kernel_memory": ((5 * 16 + 2 * 32 + 2 * 64) * KI, 0),
              "neuron_memory": (2 * (3 * 64 + 2 * 32 + 4 * 16) * KI, 0)},
    "spinnaker2": {"pe_sram": (152 * 128 * KI, 0), "dram": (2 * GI, 0)},
    "stm32f746": {"sram": ((64 + 240 + 16) * KI, 0x200 + 0x400), "flash": (MI, 0)},
    "stm32h743": {"dtcm": (128 * KI, 0), "axi_sram": (512 * KI, 0x400 + 0x800),
                  "sram1_3": ((128 + 128 + 32) * KI, 0), "sram4": (64 * KI, 0),
                  "flash": (2 * MI, 0)},
    "stm32n657": {"sram": (0x420000, 0), "xspi_flash": (128 * MI, 0), "psram": (32 * MI, 0)},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_catalog_figures_mean_what_the_sources_say(name: str) -> None:
    target = targets.load(name)
    got = {t.name: (t.bytes, t.reserved_bytes) for t in target.tiers}
    assert got == FIGURES[name]
    text = Path(target.origin).read_text()
    assert text.startswith("# Sizes:"), "each file says which units it uses"


def test_the_vendor_kb_example() -> None:
    """ST's '320 Kbytes' of STM32F746 SRAM are 327,680 bytes; the file spells it 320 KiB."""
    f7 = targets.load("stm32f746")
    assert f7.tier("sram")[0].bytes == 327_680 and 'size = "320 KiB"' in Path(f7.origin).read_text()
    assert f7.usable_bytes("sram") == 327_680 - 1536


def test_neuromorphic_catalog_figures_agree_with_their_totals() -> None:
    speck = targets.load("speck").neuromorphic
    assert speck is not None and speck.cores == 9 and not speck.homogeneous
    assert sum(speck.neurons_per_core) == 327_680  # Sinabs: "up to 0.32M" neurons
    assert speck.synapse_bytes_per_core == tuple(
        k * KI for k in (16, 16, 16, 32, 32, 64, 64, 16, 16)
    )
    assert (speck.weight_bits, speck.neuron_state_bits) == (8, 16)
    assert speck.shared_kernels and speck.pow2_addressing and speck.pool_in_core
    loihi = targets.load("loihi2").neuromorphic
    assert loihi is not None and loihi.homogeneous and not loihi.shared_kernels
    assert loihi.cores * loihi.neurons_per_core[0] == 1_048_576  # "up to 1 million neurons"
    assert loihi.synapse_bytes_per_core[0] == 128 * KI and loihi.weight_bits == 8
    s2 = targets.load("spinnaker2").neuromorphic
    assert s2 is not None and s2.cores == 152 and s2.core_bytes_per_core[0] == 128 * KI
    assert s2.neurons_per_core is None and s2.weight_bits is None  # set by software
    for name in ("loihi2", "speck", "spinnaker2", "loihi2-core"):
        d = targets.load(name).to_dict()["neuromorphic"]
        assert d["source"] and d["cores"] >= 1


def test_non_neuromorphic_targets_have_none() -> None:
    assert targets.load("stm32f746").neuromorphic is None
    assert targets.load("stm32f746").to_dict()["neuromorphic"] is None


# ------------------------------------------------------------------------- reserved

BASE = """\
name = "board"
description = "a test board"
source = "tests"
dtypes = ["int8"]

[[tiers]]
name = "sram"
kind = "sram"
size = "64 KiB"
source = "datasheet"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "board.toml"
    path.write_text(text)
    return path


def test_reserved_loads_validates_and_shows(tmp_path: Path) -> None:
    t = targets.load(write(tmp_path, BASE + 'reserved = "1.5 KiB"\nreserved_source = "ld"\n'))
    sram = t.tier("sram")[0]
    assert (sram.bytes, sram.reserved_bytes, sram.usable_bytes) == (65536, 1536, 64000)
    d = sram.to_dict()
    assert d["reserved_bytes"] == 1536 and d["usable_bytes"] == 64000 and d["reserved"]
    assert d["reserved_source"] == "ld" and d["size"] == "64 KiB"
    zero = targets.load(write(tmp_path, BASE + "reserved = 0\n")).tier("sram")[0]
    assert zero.reserved_bytes == 0 and zero.to_dict()["reserved"] == "0 B"


@pytest.mark.parametrize(
    ("extra", "field", "reason"),
    [
        ('reserved = "2 KiB"\n', "tiers[0].reserved_source", "missing"),
        ('reserved = "64 KiB"\nreserved_source = "x"\n', "tiers[0].reserved", "leaves nothing"),
        ('reserved = "2 kb"\nreserved_source = "x"\n', "tiers[0].reserved", "ambiguous unit"),
        ('reserved = "-2 KiB"\nreserved_source = "x"\n', "tiers[0].reserved", ">= 0"),
        ("reserved = 1.5\n", "tiers[0].reserved", "got float"),
        ('reserved = "1 KiB"\nreserved_source = " "\n', "tiers[0].reserved_source", "empty"),
    ],
)
def test_bad_reserved_is_one_line_naming_file_and_field(
    tmp_path: Path, extra: str, field: str, reason: str
) -> None:
    path = write(tmp_path, BASE + extra)
    with pytest.raises(EdgeError) as info:
        targets.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}") and reason in message and "\n" not in message


def test_reserved_validated_on_the_dataclass() -> None:
    with pytest.raises(EdgeError, match="reserved_source"):
        MemoryTier("s", "sram", 100, reserved_bytes=10)
    with pytest.raises(EdgeError, match="reserved_bytes"):
        MemoryTier("s", "sram", 100, reserved_bytes=-1, reserved_source="x")
    t = Target(
        "t",
        "d",
        (
            MemoryTier("a", "sram", 100, reserved_bytes=30, reserved_source="x"),
            MemoryTier("b", "sram", 50),
        ),
        ("int8",),
    )
    assert t.total_bytes("sram") == 150 and t.usable_bytes("sram") == 120


# ------------------------------------------------------------------------- neuromorphic

NEURO = (
    BASE
    + """
[neuromorphic]
cores = 4
neurons_per_core = [100, 100, 50, 50]
synapse_memory = ["1 KiB", "1 KiB", "2 KiB", 4096]
weight_bits = 4
neuron_state_bits = 16
shared_kernels = true
max_cores_per_layer = 1
source = "datasheet §9"
"""
)


def test_neuromorphic_table_loads(tmp_path: Path) -> None:
    nm = targets.load(write(tmp_path, NEURO)).neuromorphic
    assert nm == Neuromorphic(
        4,
        (100, 100, 50, 50),
        (1024, 1024, 2048, 4096),
        None,
        4,
        16,
        shared_kernels=True,
        max_cores_per_layer=1,
        source="datasheet §9",
    )
    assert not nm.homogeneous
    assert nm.to_dict()["synapse_bytes_per_core"] == [1024, 1024, 2048, 4096]
    same = Neuromorphic(3, 8, core_bytes_per_core=512, source="s")
    assert same.homogeneous and same.neurons_per_core == (8, 8, 8)
    assert same.to_dict()["core_bytes_per_core"] == 512


def _edit(old: str, new: str) -> str:
    assert old in NEURO, old
    return NEURO.replace(old, new, 1)


BAD_NEURO = {
    "no cores": (_edit("cores = 4\n", ""), "neuromorphic.cores", "missing"),
    "zero cores": (_edit("cores = 4\n", "cores = 0\n"), "neuromorphic.cores", ">= 1"),
    "short list": (
        _edit("[100, 100, 50, 50]", "[100, 100]"),
        "neuromorphic.neurons_per_core",
        "2 values for 4 cores",
    ),
    "bad size": (
        _edit('"2 KiB", 4096', '"2 kb", 4096'),
        "neuromorphic.synapse_memory[2]",
        "ambiguous unit",
    ),
    "no memory": (
        _edit('synapse_memory = ["1 KiB", "1 KiB", "2 KiB", 4096]\n', ""),
        "neuromorphic.synapse_memory",
        "core_memory",
    ),
    "mixed sizes, no limit": (
        _edit("max_cores_per_layer = 1\n", ""),
        "neuromorphic.max_cores_per_layer",
        "different sizes",
    ),
    "flag not bool": (
        _edit("shared_kernels = true", 'shared_kernels = "yes"'),
        "neuromorphic.shared_kernels",
        "true or false",
    ),
    "bits": (_edit("weight_bits = 4", "weight_bits = 0"), "neuromorphic.weight_bits", "1..64"),
    "pow2 without sharing": (
        _edit("shared_kernels = true", "pow2_addressing = true"),
        "neuromorphic.pow2_addressing",
        "shared_kernels",
    ),
    "unknown key": (
        _edit("cores = 4\n", "cores = 4\nsynapses = 3\n"),
        "neuromorphic.synapses",
        "unknown key",
    ),
    "no source": (_edit('source = "datasheet §9"\n', ""), "neuromorphic.source", "missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_NEURO))
def test_bad_neuromorphic_table(tmp_path: Path, case: str) -> None:
    text, field, reason = BAD_NEURO[case]
    path = write(tmp_path, text)
    with pytest.raises(EdgeError) as info:
        targets.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}"), message
    assert reason in message and "\n" not in message


def test_target_checks_its_neuromorphic_field() -> None:
    with pytest.raises(EdgeError, match="neuromorphic"):
        Target("t", "d", (MemoryTier("s", "sram", 10),), ("int8",), neuromorphic=4)  # type: ignore[arg-type]
    with pytest.raises(EdgeError, match="source"):
        Neuromorphic(2, 8, 64)
