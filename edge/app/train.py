"""The training loop: data -> views -> step -> atomic checkpoint every epoch -> probe.

Determinism: parameters are drawn from `seed`; epoch e draws its shuffle and its views from a
generator seeded by (seed, e) alone. A run resumed from the checkpoint of epoch e therefore
replays epochs e+1.. exactly as the uninterrupted run would, with no RNG state to save.

A non-finite loss stops training at once; the last checkpoint on disk (the last good epoch)
is kept and the error says where it is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from edge import checkpoint, rules
from edge.alignment import alignment
from edge.data import DATASETS, default_views, load, two_views
from edge.errors import EdgeError
from edge.nets import NetSpec, default_preset, encode, init_params, preset
from edge.optim import OptimConfig
from edge.probe import probe_accuracy
from edge.step import train_step

QUANTS = ("fp32", "int8", "int8-w16")
MODES = ("qat", "integer")


@dataclass(frozen=True)
class TrainConfig:
    rule: str = "clapp++"
    data: str = "digits"
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None  # None: the rule's default
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    seed: int = 0
    subset: int | None = None
    net: str | None = None  # preset name; None: the data set's default
    width: float = 1.0
    rule_hparams: dict[str, Any] = field(default_factory=dict)
    probe_layers: str = "all"
    quant: str = "fp32"  # fp32 | int8 | int8-w16
    mode: str = "integer"  # qat | integer (ignored for fp32)
    device: str = "cpu"  # where the step runs; not part of the run's identity
    runtime: str = "torch"  # what executes the step (torch | onnxruntime | openvino); recorded
    alignment: bool = False  # measure per-layer cosine(rule update, BP-InfoNCE gradient)
    alignment_every: int = 1  # ... on every k-th batch (it costs a backprop pass per batch)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "alignment_every"):
            if getattr(self, name) <= 0:
                raise EdgeError(
                    f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
        if self.subset is not None and self.subset <= 0:
            raise EdgeError(f"--subset must be positive, got {self.subset}")
        if self.data not in DATASETS:
            raise EdgeError(f"unknown data set {self.data!r}; valid: {', '.join(DATASETS)}")
        if self.rule not in rules.names():
            raise EdgeError(f"unknown rule {self.rule!r}; valid: {', '.join(rules.names())}")
        if self.quant not in QUANTS:
            raise EdgeError(f"unknown --quant {self.quant!r}; valid: {', '.join(QUANTS)}")
        if self.mode not in MODES:
            raise EdgeError(f"unknown --mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.quant != "fp32" and self.alignment:
            raise EdgeError("--alignment needs float weights; drop it or use --quant fp32")
        if self.alignment and not rules.get(self.rule, **self.rule_hparams).is_local:
            raise EdgeError(
                f"--alignment compares a local rule with backprop; {self.rule} is global"
            )
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EdgeError(f"--device {self.device}: no CUDA device here; use --device cpu")

    def optim(self) -> OptimConfig:
        lr = self.lr if self.lr is not None else rules.default_lr(self.rule)
        return OptimConfig(self.optimizer, lr=lr, weight_decay=self.weight_decay)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def same_run(self, other: TrainConfig) -> bool:
        """Everything but the epoch count must match for a resume to continue the same run."""
        mine, theirs = self.to_dict(), other.to_dict()
        for key in ("epochs", "device", "runtime", "alignment", "alignment_every"):
            mine.pop(key), theirs.pop(key)
        return mine == theirs


def build(cfg: TrainConfig, in_shape: tuple[int, ...]):
    net = preset(cfg.net or default_preset(cfg.data), in_shape, cfg.width)
    rule = rules.get(cfg.rule, **cfg.rule_hparams)
    rule.check(net)
    return net, rule


def initial_params(cfg: TrainConfig, net: NetSpec, rule) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed)
    params = init_params(net, gen)
    params.update(rule.init(net, gen))
    return params


def _torch_step(net: NetSpec, rule, opt: OptimConfig) -> Callable:
    return functools.partial(train_step, net, rule, opt)


class FloatEngine:
    """fp32 training: parameters and optimizer state as float tensors, one step function.

    An engine has five verbs (`quant.engine.QuantEngine` has the same): `start` from the
    initial parameters, `step` on two views, `tensors` for the checkpoint, `resume` from one,
    and `encoder` for the probe.
    """

    def __init__(self, make_step: Callable[..., Callable] | None = None, device: str = "cpu"):
        self.make_step, self.device = make_step or _torch_step, torch.device(device)

    def bind(self, net: NetSpec, rule, opt: OptimConfig) -> None:
        self.net, self.opt = net, opt
        self.step_fn = self.make_step(net, rule, opt)

    def start(self, params: dict[str, torch.Tensor], calib: list) -> None:
        self.resume(params, self.opt.init_state(params), {})

    def step(self, v1: torch.Tensor, v2: torch.Tensor, gen: torch.Generator) -> dict:
        self.params, self.state, metrics = self.step_fn(
            self.params, self.state, v1, v2, donate=True
        )
        return metrics

    def tensors(self) -> tuple[dict, dict, dict]:
        return self.params, self.state, {}

    def resume(self, params: dict, state: dict, meta: dict) -> None:
        self.params = {k: v.to(self.device) for k, v in params.items()}
        self.state = {k: v.to(self.device) for k, v in state.items()}

    def encoder(self) -> Callable[[torch.Tensor], list[torch.Tensor]]:
        net, params = self.net, self.params
        return lambda x: encode(net, params, x)

    def describe(self) -> dict:
        return {}


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def train(
    cfg: TrainConfig,
    out: Path,
    data_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    make_step: Callable[..., Callable] | None = None,
    engine=None,
    probe: bool = True,
) -> dict[str, Any]:
    """Train, checkpoint every epoch, probe. `make_step(net, rule, opt)` may supply another
    executor of the same step (e.g. the exported graph in onnxruntime, from `export.runner`);
    it must accept `(params, state, x1, x2, donate=...)` like `edge.step.train_step`.
    `engine` replaces the float engine (e.g. `quant.engine.QuantEngine` for integer mode).
    `probe=False` skips the two linear probes (callers that probe the checkpoint themselves);
    the result then has `probe_accuracy` and `random_probe_accuracy` None."""
    t0 = time.perf_counter()
    ds = load(cfg.data, data_dir, cfg.subset)
    net, rule = build(cfg, ds.in_shape)
    opt = cfg.optim()
    engine = engine or FloatEngine(make_step, cfg.device)
    engine.bind(net, rule, opt)
    device = torch.device(cfg.device)
    ckpt_path = out / checkpoint.FILENAME
    n = ds.x_train.shape[0]
    if n < cfg.batch_size:
        raise EdgeError(f"--batch-size {cfg.batch_size} is larger than the {n} training images")
    steps = n // cfg.batch_size  # drop the last partial batch: static shapes for export
    views = default_views(cfg.data)
    start, history = 0, []
    if resume and ckpt_path.exists():
        params, state, meta = checkpoint.load(ckpt_path)
        old = TrainConfig(**{**TrainConfig().to_dict(), **meta["config"]})
        if not cfg.same_run(old):
            raise EdgeError(f"{ckpt_path} belongs to another run ({old}); use another --out")
        start, history = meta["epoch"], meta["history"]
        engine.resume(params, state, meta.get("quant", {}))
    else:
        engine.start(initial_params(cfg, net, rule), calibration(cfg, ds, views))
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (progress and console.is_terminal),
        transient=True,
    )
    with bar:
        task = bar.add_task(
            f"{cfg.rule} on {cfg.data}", total=(cfg.epochs - start) * steps, info=""
        )
        for epoch in range(start, cfg.epochs):
            gen = epoch_generator(cfg.seed, epoch)
            perm = torch.randperm(n, generator=gen)
            total, align = 0.0, []
            for s in range(steps):
                x = ds.x_train[perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]]
                v1, v2 = (v.to(device) for v in two_views(x, gen, views, ds.mean, ds.std))
                if cfg.alignment and s % cfg.alignment_every == 0:  # the update it will make
                    align.append(alignment(net, rule, engine.params, v1, v2, seed=cfg.seed))
                metrics = engine.step(v1, v2, gen)
                loss = float(metrics["loss"])
                if not torch.isfinite(metrics["loss"]):
                    kept = (
                        f"kept {ckpt_path}" if ckpt_path.exists() else "no checkpoint written yet"
                    )
                    raise EdgeError(
                        f"loss became {loss} at epoch {epoch + 1} step {s + 1}; stopped ({kept}); "
                        "try a smaller --lr"
                    )
                total += loss
                bar.update(task, advance=1, info=f"epoch {epoch + 1}/{cfg.epochs} loss {loss:.4f}")
            history.append({"epoch": epoch + 1, "loss": total / steps})
            if align:  # mean over the epoch's batches, per layer
                history[-1]["alignment"] = [sum(col) / len(col) for col in zip(*align, strict=True)]
            meta = {
                "config": cfg.to_dict(),
                "net": net.to_dict(),
                "epoch": epoch + 1,
                "history": history,
                "data_shape": list(ds.in_shape),
            }
            params, state, meta["quant"] = engine.tensors()
            checkpoint.save(ckpt_path, params, state, meta)
    params, _, _ = engine.tensors()
    acc = random_acc = None
    if probe:
        acc = probe_accuracy(net, params, ds, cfg.probe_layers, encode_fn=engine.encoder())
        random = {k: v.to(device) for k, v in initial_params(cfg, net, rule).items()}
        random_acc = probe_accuracy(net, random, ds, cfg.probe_layers)
    result = {
        "rule": cfg.rule,
        "data": cfg.data,
        "net": net.name,
        "epochs": cfg.epochs,
        "subset": cfg.subset,
        "train_images": n,
        "probe_layers": cfg.probe_layers,
        "probe_accuracy": acc,
        "random_probe_accuracy": random_acc,
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
        "alignment": _mean_alignment(history),
        "parameters": param_counts(params),
        "seconds": round(time.perf_counter() - t0, 2),
        "checkpoint": str(ckpt_path),
        "weights_digest": checkpoint.weights_digest(params),
        "quantization": engine.describe() or None,
        "config": cfg.to_dict(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def calibration(cfg: TrainConfig, ds, views, batches: int = 4) -> list:
    """A few view pairs for calibrating quantization scales, from their own generator."""
    gen = epoch_generator(cfg.seed, -1)
    n = ds.x_train.shape[0]
    idx = torch.randperm(n, generator=gen)[: batches * cfg.batch_size]
    return [
        two_views(
            ds.x_train[idx[b * cfg.batch_size : (b + 1) * cfg.batch_size]],
            gen,
            views,
            ds.mean,
            ds.std,
        )
        for b in range(min(batches, n // cfg.batch_size))
    ]


def _mean_alignment(history: list[dict]) -> list[float] | None:
    rows = [h["alignment"] for h in history if "alignment" in h]
    return [sum(col) / len(col) for col in zip(*rows, strict=True)] if rows else None


def param_counts(params: dict[str, torch.Tensor]) -> dict[str, int]:
    """Encoder vs rule (predictor B) vs head sizes: B's size is reported with every run."""
    counts = {"encoder": 0, "rule": 0, "head": 0}
    for k, v in params.items():
        counts[{"enc": "encoder", "rule": "rule", "head": "head"}[k.split(".")[0]]] += v.numel()
    return counts
