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
from edge.nets import NetSpec, default_preset, init_params, preset
from edge.optim import OptimConfig
from edge.probe import probe_accuracy
from edge.step import train_step

DEFAULT_LR = {"bp-infonce": 1e-3, "bp-clapp++": 1e-4}


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
    device: str = "cpu"  # where the step runs; not part of the run's identity
    runtime: str = "torch"  # what executes the step (torch | onnxruntime | openvino); recorded
    alignment: bool = False  # measure per-layer cosine(rule update, BP-InfoNCE gradient)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
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
        if self.alignment and not rules.get(self.rule, **self.rule_hparams).is_local:
            raise EdgeError(
                f"--alignment compares a local rule with backprop; {self.rule} is global"
            )
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EdgeError(f"--device {self.device}: no CUDA device here; use --device cpu")

    def optim(self) -> OptimConfig:
        lr = self.lr if self.lr is not None else DEFAULT_LR.get(self.rule, 1e-3)
        return OptimConfig(self.optimizer, lr=lr, weight_decay=self.weight_decay)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def same_run(self, other: TrainConfig) -> bool:
        """Everything but the epoch count must match for a resume to continue the same run."""
        mine, theirs = self.to_dict(), other.to_dict()
        for key in ("epochs", "device", "runtime", "alignment"):
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


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def train(
    cfg: TrainConfig,
    out: Path,
    data_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    make_step: Callable[..., Callable] | None = None,
) -> dict[str, Any]:
    """Train, checkpoint every epoch, probe. `make_step(net, rule, opt)` may supply another
    executor of the same step (e.g. the exported graph in onnxruntime, from `export.runner`);
    it must accept `(params, state, x1, x2, donate=...)` like `edge.step.train_step`."""
    t0 = time.perf_counter()
    ds = load(cfg.data, data_dir, cfg.subset)
    net, rule = build(cfg, ds.in_shape)
    opt = cfg.optim()
    step_fn = (make_step or _torch_step)(net, rule, opt)
    ckpt_path = out / checkpoint.FILENAME
    params = initial_params(cfg, net, rule)
    state = opt.init_state(params)
    start, history = 0, []
    if resume and ckpt_path.exists():
        params, state, meta = checkpoint.load(ckpt_path)
        old = TrainConfig(**{**TrainConfig().to_dict(), **meta["config"]})
        if not cfg.same_run(old):
            raise EdgeError(f"{ckpt_path} belongs to another run ({old}); use another --out")
        start, history = meta["epoch"], meta["history"]
    device = torch.device(cfg.device)
    params = {k: v.to(device) for k, v in params.items()}
    state = {k: v.to(device) for k, v in state.items()}
    n = ds.x_train.shape[0]
    if n < cfg.batch_size:
        raise EdgeError(f"--batch-size {cfg.batch_size} is larger than the {n} training images")
    steps = n // cfg.batch_size  # drop the last partial batch: static shapes for export
    views = default_views(cfg.data)
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
                if cfg.alignment:  # before the step: the update it is about to make
                    align.append(alignment(net, rule, params, v1, v2, seed=cfg.seed))
                params, state, metrics = step_fn(params, state, v1, v2, donate=True)
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
            checkpoint.save(ckpt_path, params, state, meta)
    probe = probe_accuracy(net, params, ds, cfg.probe_layers)
    random = {k: v.to(device) for k, v in initial_params(cfg, net, rule).items()}
    random_probe = probe_accuracy(net, random, ds, cfg.probe_layers)
    result = {
        "rule": cfg.rule,
        "data": cfg.data,
        "net": net.name,
        "epochs": cfg.epochs,
        "subset": cfg.subset,
        "train_images": n,
        "probe_layers": cfg.probe_layers,
        "probe_accuracy": probe,
        "random_probe_accuracy": random_probe,
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
        "alignment": _mean_alignment(history),
        "parameters": param_counts(params),
        "seconds": round(time.perf_counter() - t0, 2),
        "checkpoint": str(ckpt_path),
        "weights_digest": checkpoint.weights_digest(params),
        "config": cfg.to_dict(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _mean_alignment(history: list[dict]) -> list[float] | None:
    rows = [h["alignment"] for h in history if "alignment" in h]
    return [sum(col) / len(col) for col in zip(*rows, strict=True)] if rows else None


def param_counts(params: dict[str, torch.Tensor]) -> dict[str, int]:
    """Encoder vs rule (predictor B) vs head sizes: B's size is reported with every run."""
    counts = {"encoder": 0, "rule": 0, "head": 0}
    for k, v in params.items():
        counts[{"enc": "encoder", "rule": "rule", "head": "head"}[k.split(".")[0]]] += v.numel()
    return counts
