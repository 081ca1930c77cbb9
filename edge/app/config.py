"""What a training run is: `TrainConfig`, validated before anything heavy is imported.

Every scalar option is checked here with no torch import, so a bad flag answers at once;
names that need a registry (rules, networks, data sets) are checked when the run is built.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from edge.errors import EdgeError

QUANTS = ("fp32", "int8", "int8-w16")
MODES = ("qat", "integer")
RUNTIMES = ("torch", "onnxruntime", "openvino", "qnn-htp", "iree")
OPTIMIZERS = ("sgd", "adamw")
PROBE_LAYERS = ("all", "last")
DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def check_device(device: str) -> None:
    if not DEVICE_RE.match(device):
        raise EdgeError(f"unknown --device {device!r}; valid: cpu, cuda, cuda:N, mps")


@dataclass(frozen=True)
class TrainConfig:
    rule: str = "clapp++"
    data: str = "digits"  # a data set name, or a path to the user's own data
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None  # None: the rule's default (integer mode: its own default)
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    seed: int = 0
    subset: int | None = None
    net: str | None = None  # preset name or .toml spec; None: the data set's default
    width: float = 1.0
    rule_hparams: dict[str, Any] = field(default_factory=dict)
    probe_layers: str = "all"
    quant: str = "fp32"  # fp32 | int8 | int8-w16
    mode: str = "integer"  # qat | integer (ignored for fp32)
    views: str | None = None  # augmentation preset; None: the data set's default
    negatives: str = "batch"  # "batch" (image i+1 of the batch) | "memory:K" (K past codes)
    head_labels: int = 0  # an on-device head learns from the first K labelled images a class
    device: str = "cpu"  # where the step runs; not part of the run's identity
    runtime: str = "torch"  # what executes the step; recorded, not part of the identity
    profile: str | None = None  # operator profile of an exported step (runtime != torch)
    per_layer: bool = False  # run the exported per-block graphs in a chain (runtime != torch)
    alignment: bool = False  # measure per-block cosine(rule update, BP-InfoNCE gradient)
    alignment_every: int = 1  # ... on every k-th batch (it costs a backprop pass per batch)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "alignment_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise EdgeError(f"--{name.replace('_', '-')} must be positive, got {v}")
        if isinstance(self.head_labels, bool) or not isinstance(self.head_labels, int) or \
                self.head_labels < 0:
            raise EdgeError(f"--head-labels must be >= 0, got {self.head_labels}")
        if self.subset is not None and self.subset <= 0:
            raise EdgeError(f"--subset must be positive, got {self.subset}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise EdgeError(f"--lr must be a positive finite number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise EdgeError(f"--weight-decay must be >= 0 and finite, got {self.weight_decay}")
        if not (self.width > 0 and math.isfinite(self.width)):
            raise EdgeError(f"--width must be positive, got {self.width}")
        for name, valid in (("optimizer", OPTIMIZERS), ("quant", QUANTS), ("mode", MODES),
                            ("runtime", RUNTIMES), ("probe_layers", PROBE_LAYERS)):
            if getattr(self, name) not in valid:
                raise EdgeError(f"unknown --{name.replace('_', '-')} {getattr(self, name)!r}; "
                                f"valid: {', '.join(valid)}")
        check_device(self.device)
        self.memory_size()  # validates the form
        if self.quant != "fp32" and self.alignment:
            raise EdgeError("--alignment needs float weights; drop it or use --quant fp32")
        if self.runtime != "torch" and self.device != "cpu":
            raise EdgeError(f"--runtime {self.runtime} runs on the CPU; drop --device "
                            f"{self.device}")
        if self.quant != "fp32" and self.device != "cpu":
            raise EdgeError(f"--quant {self.quant} steps run on the CPU; drop --device "
                            f"{self.device}")
        if self.runtime != "torch" and self.quant != "fp32" and self.mode == "qat":
            raise EdgeError("--mode qat trains fp32 latent weights in torch; use --mode "
                            "integer for a quantized step on a runtime")
        if self.runtime == "torch" and (self.profile is not None or self.per_layer):
            raise EdgeError("--profile and --per-layer apply to an exported step; add --runtime")
        if self.runtime != "torch" and self.alignment:
            raise EdgeError("--alignment measures the torch step; drop it or use --runtime "
                            "torch")

    def memory_size(self) -> int:
        """K of `--negatives memory:K` (0 for in-batch negatives)."""
        if self.negatives == "batch":
            return 0
        kind, _, k = self.negatives.partition(":")
        if kind != "memory" or not k.isdigit() or int(k) < 1:
            raise EdgeError(f"--negatives must be 'batch' or 'memory:K' with K >= 1, got "
                            f"{self.negatives!r}")
        return int(k)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def same_run(self, other: TrainConfig) -> bool:
        """Everything but the epoch count and how the step runs must match for a resume to
        continue the same run."""
        mine, theirs = self.to_dict(), other.to_dict()
        for key in ("epochs", "device", "runtime", "profile", "per_layer", "alignment",
                    "alignment_every"):
            mine.pop(key), theirs.pop(key)
        return mine == theirs

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in d.items() if k in known})
