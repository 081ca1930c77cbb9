"""The training loop: data -> views -> step -> checked update -> atomic checkpoint -> probe.

`train(cfg, out)` builds everything from the `TrainConfig`: the network (preset or spec
file, BatchNorm folded), the rule, and the engine that runs the step (`make_engine`): fp32 in
torch or as an exported graph on a runtime, QAT, or integer mode in torch or as the exported
integer graph on a runtime.

Determinism: parameters are drawn from `seed`; epoch e draws its shuffle, its views and the
integer step's random bits from a generator seeded by (seed, e) alone. A run resumed from
the checkpoint of epoch e therefore replays epochs e+1.. exactly as the uninterrupted run
would, with no RNG state to save.

Safety: a step whose loss or new parameters are not finite stops training at once, before
anything is written; the last checkpoint on disk (the last good epoch of this run) is kept
and the error says where it is. A run directory that holds another run is refused unless
`resume` (continue it) or `overwrite` (replace it) is given. Ctrl-C stops with a one-line
message saying what was saved and how to resume.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from edge import checkpoint, rules
from edge.alignment import alignment
from edge.app.config import TrainConfig
from edge.data import load, two_views, view_config
from edge.errors import EdgeError, Interrupted
from edge.nets import NetSpec, default_preset, encode, fold_batchnorm, resolve
from edge.optim import OptimConfig
from edge.probe import probe_accuracies
from edge.step import init_state, train_step

RESULT = "result.json"


def optim(cfg: TrainConfig) -> OptimConfig:
    lr = cfg.lr
    if lr is None:
        if cfg.quant != "fp32" and cfg.mode == "integer":
            from quant.engine import integer_default_lr

            lr = integer_default_lr(cfg.rule)
        else:
            lr = rules.default_lr(cfg.rule)
    return OptimConfig(cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay)


def make_rule(cfg: TrainConfig) -> Any:
    """The rule with its hyper-parameters, `--negatives memory:K` included."""
    hp = dict(cfg.rule_hparams)
    k = cfg.memory_size()
    if k:
        if "negatives" not in rules.hparam_keys(cfg.rule):
            raise EdgeError(f"--negatives memory:K: rule {cfg.rule!r} takes its negatives from "
                            "the batch only; the CLAPP family (clapp, clapp++, clapp++dfb, "
                            "clapp++both) takes a memory")
        hp["negatives"] = k
    return rules.get(cfg.rule, **hp)


def build(cfg: TrainConfig, in_shape: tuple[int, ...]) -> tuple[NetSpec, Any, dict]:
    """(network with BatchNorm folded, rule, initial parameters drawn from cfg.seed)."""
    net = resolve(cfg.net or default_preset(cfg.data), in_shape, cfg.width)
    rule = make_rule(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = net.init_params(gen)
    net, params = fold_batchnorm(net, params)
    rule.check(net)
    params.update(rule.init(net, gen))
    return net, rule, params


class FloatEngine:
    """fp32 training: parameters and optimizer state as float tensors, one step function.

    An engine's verbs (`quant.engine.QuantEngine` has the same): `bind`, `start` from the
    initial parameters, `step` on two views, `tensors` for the checkpoint, `resume` from one,
    `encoder` for the probe, `describe`.
    """

    def __init__(self, step_fn: Callable | None = None, device: str = "cpu", head: Any = None):
        self.make_step, self.device, self.head = step_fn, torch.device(device), head

    def bind(self, net: NetSpec, rule, opt: OptimConfig) -> None:
        self.net, self.rule, self.opt = net, rule, opt
        self.step_fn = self.make_step or functools.partial(train_step, net, rule, opt)

    def start(self, params: dict, calib: list) -> None:
        state = init_state(self.net, self.rule, self.opt, params)
        if self.head is not None:
            state.update(self.head.init_state())
        self.resume(params, state, {})

    def step(self, v1: torch.Tensor, v2: torch.Tensor, gen: torch.Generator,
             labels: torch.Tensor | None = None) -> dict:
        extra = {} if self.head is None else {"head": self.head, "labels": labels}
        new_params, new_state, metrics = self.step_fn(self.params, self.state, v1, v2,
                                                      donate=False, **extra)
        if not torch.stack([torch.isfinite(v).all() for v in new_params.values()]).all():
            metrics = {**metrics, "finite_params": torch.tensor(False)}
            return metrics
        self.params, self.state = new_params, new_state
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

    def head_features(self, x: torch.Tensor) -> torch.Tensor:
        from edge.layers import EAGER

        return self.head.features(EAGER, self.encoder()(x)[-1]).double()


def head_labels(ds: Any, k: int) -> torch.Tensor:
    """Per training image its label if it is among the first k of its class, else -1."""
    out = torch.full((ds.x_train.shape[0],), -1, dtype=torch.int64)
    for c in range(ds.num_classes):
        idx = (ds.y_train == c).nonzero().flatten()[:k]
        out[idx] = c
    return out


def head_accuracy(engine: Any, ds: Any) -> float:
    """The on-device head's test accuracy (nearest class mean of the trained features)."""
    from edge.data import to_float

    with torch.no_grad():
        f = torch.cat([engine.head_features(to_float(ds.x_test[s : s + 500], ds))
                       for s in range(0, ds.x_test.shape[0], 500)])
    state = {k: v for k, v in engine.tensors()[1].items() if k.startswith("head.")}
    return engine.head.accuracy(state, f, ds.y_test)


def make_engine(cfg: TrainConfig, head: Any = None) -> Any:
    """The engine `cfg` asks for (module docstring); `head`: an on-device head it trains."""
    if cfg.quant == "fp32":
        if cfg.runtime == "torch":
            return FloatEngine(None, cfg.device, head)
        from export.runner import make_stepper

        class Exported(FloatEngine):
            def bind(self, net, rule, opt):
                self.make_step = make_stepper(cfg.runtime, net, rule, opt, profile=cfg.profile,
                                              per_layer=cfg.per_layer, head=head)
                super().bind(net, rule, opt)

        return Exported(None, "cpu", head)
    from quant.engine import QuantEngine

    factory = None
    if cfg.runtime != "torch":
        from export.runner import integer_stepper

        def factory(net, rule, plan, qparams):
            return integer_stepper(cfg.runtime, net, rule, plan, qparams, profile=cfg.profile,
                                   per_layer=cfg.per_layer, head=head)
    return QuantEngine(cfg.quant, cfg.mode, step_factory=factory, head=head)


def _runtime(engine: Any, cfg: TrainConfig) -> dict[str, Any]:
    """What ran the steps (`OnnxStepper.describe` for an exported step)."""
    step = getattr(engine, "step_fn", None)
    step = getattr(step, "stepper", step)  # integer mode wraps the stepper
    if hasattr(step, "describe"):
        return step.describe()
    return {"name": cfg.runtime, "device": cfg.device}


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _check_out(out: Path, resume: bool, overwrite: bool) -> Path:
    ckpt = out / checkpoint.FILENAME
    if out.exists() and not out.is_dir():
        raise EdgeError(f"--out {out} exists and is not a directory")
    if resume:
        if not ckpt.exists():
            raise EdgeError(f"--resume: {out} holds no checkpoint ({checkpoint.FILENAME}); "
                            "drop --resume to start a new run")
        return ckpt
    if ckpt.exists() or (out / RESULT).exists():
        if not overwrite:
            raise EdgeError(f"{out} already holds a run; pass --resume to continue it or "
                            "--overwrite to replace it")
        for f in (ckpt, out / RESULT):
            f.unlink(missing_ok=True)
    return ckpt


def train(
    cfg: TrainConfig,
    out: Path,
    data_dir: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    engine: Any = None,
    probe: bool = True,
    init: tuple[NetSpec, dict] | None = None,
    dataset: Any = None,
    dist: Any = None,
) -> dict[str, Any]:
    """Train, checkpoint every epoch, probe. `engine` replaces the one `cfg` asks for;
    `init` = (net, params) starts from a given network (e.g. `edge.nets.from_torch`) instead
    of `cfg.net`; `dataset` (an `edge.data.Dataset`) replaces loading `cfg.data`;
    `probe=False` skips the linear probes (then `probe_accuracy` and `random_probe_accuracy`
    are None). `dist` (`edge.app.distributed.Comm`; by default the
    group torchrun describes in the environment, if any) trains on several processes: rank 0
    alone writes the checkpoint and the result and probes."""
    t0 = time.perf_counter()
    out = Path(out)
    if dist is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # distributed hook
        from edge.app.distributed import from_env

        dist = from_env(cfg)
    probe = probe and (dist is None or dist.writer)  # distributed hook
    ds = dataset if dataset is not None else load(cfg.data, data_dir, cfg.subset)
    if init is not None:
        net, params0 = fold_batchnorm(*init)
        rule = make_rule(cfg)
        rule.check(net)
        params0 = {**params0, **rule.init(net, torch.Generator().manual_seed(cfg.seed))}
    else:
        net, rule, params0 = build(cfg, ds.in_shape)
    if cfg.alignment and not rule.is_local:
        raise EdgeError(f"--alignment compares a local rule with backprop; {cfg.rule} is "
                        "global")
    opt = optim(cfg)
    head = None
    if cfg.head_labels:
        from edge.head import PrototypeHead

        if ds.x_unlabeled is not None:
            raise EdgeError("--head-labels reads the labels of the training images; this data "
                            "set trains on its unlabeled split")
        if not rule.is_local:
            raise EdgeError(f"--head-labels: the head trains in a local step; {cfg.rule} is "
                            "global")
        head = PrototypeHead(ds.num_classes, net.shapes()[-1])
        labelled = head_labels(ds, cfg.head_labels)
    ckpt_path = _check_out(out, resume, overwrite)  # after every check: nothing is touched
    engine = engine or (dist.engine(cfg, head) if dist else make_engine(cfg, head))
    engine.bind(net, rule, opt)
    device = torch.device(cfg.device)
    x_all = ds.x_ssl  # STL-10's unlabeled split where there is one; the probe uses the labels
    n = x_all.shape[0]
    if n < cfg.batch_size:
        raise EdgeError(f"--batch-size {cfg.batch_size} is larger than the {n} training images")
    if cfg.batch_size < getattr(rule, "min_batch", 2):
        raise EdgeError(f"--batch-size {cfg.batch_size} has no in-batch negative for "
                        f"{cfg.rule}; use --batch-size 2 or more, or --negatives memory:K")
    steps = n // cfg.batch_size  # drop the last partial batch: static shapes for export
    views = view_config(cfg.views or "edge", ds)
    start, history = 0, []
    if resume:
        params, state, meta = checkpoint.load(ckpt_path)
        old = TrainConfig.from_dict({**TrainConfig().to_dict(), **meta["config"]})
        if not cfg.same_run(old):
            raise EdgeError(f"{ckpt_path} belongs to another run ({old}); use another --out")
        start, history = meta["epoch"], meta["history"]
        engine.resume(params, state, meta.get("quant", {}))
    else:
        engine.start(params0, calibration(cfg, ds, views))
    console = Console(stderr=True)
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=console, disable=not (progress and console.is_terminal),
                   transient=True)

    try:
        with bar:
            task = bar.add_task(f"{cfg.rule} on {ds.name}", total=(cfg.epochs - start) * steps,
                                info="")
            for epoch in range(start, cfg.epochs):
                gen = epoch_generator(cfg.seed, epoch)
                perm = torch.randperm(n, generator=gen)
                total, align = 0.0, []
                for s in range(steps):
                    idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                    v1, v2 = (v.to(device) for v in two_views(x_all[idx], gen, views, ds.mean,
                                                              ds.std))
                    if cfg.alignment and s % cfg.alignment_every == 0:
                        align.append(alignment(net, rule, engine.params, v1, v2, seed=cfg.seed))
                    if head is None:
                        metrics = engine.step(v1, v2, gen)
                    else:
                        metrics = engine.step(v1, v2, gen, labelled[idx])
                    loss = float(metrics["loss"])
                    finite = bool(metrics.get("finite_params", torch.tensor(True)))
                    if not (torch.isfinite(metrics["loss"]) and finite):
                        what = f"loss became {loss}" if finite else "the update made parameters " \
                            "non-finite"
                        last = f"kept {ckpt_path}" if ckpt_path.exists() else \
                            "no checkpoint written yet"
                        raise EdgeError(f"{what} at epoch {epoch + 1} step {s + 1}; stopped "
                                        f"({last}); try a smaller --lr")
                    total += loss
                    bar.update(task, advance=1,
                               info=f"epoch {epoch + 1}/{cfg.epochs} loss {loss:.4f}")
                if dist is not None:  # distributed hook: the pipeline's stages add up
                    total = dist.epoch_loss(total)
                history.append({"epoch": epoch + 1, "loss": total / steps})
                if align:  # mean over the epoch's batches, per block
                    history[-1]["alignment"] = [sum(c) / len(c) for c in zip(*align, strict=True)]
                meta = {"config": cfg.to_dict(), "net": net.to_dict(), "epoch": epoch + 1,
                        "history": history, "data_shape": list(ds.in_shape)}
                params, state, meta["quant"] = engine.tensors()
                if dist is None or dist.writer:  # distributed hook
                    checkpoint.save(ckpt_path, params, state, meta)
    except KeyboardInterrupt:
        done = history[-1]["epoch"] if history else 0
        saved = (f"the checkpoint of epoch {done} is in {ckpt_path}" if ckpt_path.exists()
                 else "nothing was saved (no epoch finished)")
        hint = "; resume with the same command and --resume" if ckpt_path.exists() else ""
        raise Interrupted(f"interrupted: {saved}{hint}") from None
    params, _, _ = engine.tensors()
    probes = random_probes = {}
    if probe:  # both protocols (edge.probe); the `lbfgs` one is the headline
        probes = probe_accuracies(net, params, ds, cfg.probe_layers, encode_fn=engine.encoder())
        random = {k: v.to(device) for k, v in params0.items()}
        random_probes = probe_accuracies(net, random, ds, cfg.probe_layers)
    acc, random_acc = probes.get("lbfgs"), random_probes.get("lbfgs")
    result = {
        "rule": cfg.rule, "data": ds.name, "net": net.name, "epochs": cfg.epochs,
        "subset": cfg.subset, "train_images": n, "probe_layers": cfg.probe_layers,
        "probe_accuracy": acc, "random_probe_accuracy": random_acc,
        "probe_adam_accuracy": probes.get("adam"),
        "random_probe_adam_accuracy": random_probes.get("adam"),
        "final_loss": history[-1]["loss"] if history else None, "history": history,
        "alignment": _mean_alignment(history), "parameters": param_counts(params),
        "seconds": round(time.perf_counter() - t0, 2), "checkpoint": str(ckpt_path),
        "weights_digest": checkpoint.weights_digest(params),
        "optimizer": {"name": opt.name, "lr": opt.lr, "weight_decay": opt.weight_decay},
        "head": None if head is None else {
            "labels_per_class": cfg.head_labels, "labelled_images": int((labelled >= 0).sum()),
            "accuracy": head_accuracy(engine, ds) if probe else None},
        "quantization": engine.describe() or None, "runtime": _runtime(engine, cfg),
        "config": cfg.to_dict(),
    }
    if dist is None or dist.writer:  # distributed hook
        (out / RESULT).write_text(json.dumps(result, indent=2))
    return result


def calibration(cfg: TrainConfig, ds, views=None, x_all=None, batches: int = 4) -> list:
    """A few view pairs for calibrating quantization scales, from their own generator and
    from the same images the run trains on (train and export calibrate alike)."""
    views = view_config(cfg.views or "edge", ds) if views is None else views
    x_all = ds.x_ssl if x_all is None else x_all
    gen = epoch_generator(cfg.seed, -1)
    n = x_all.shape[0]
    idx = torch.randperm(n, generator=gen)[: batches * cfg.batch_size]
    return [two_views(x_all[idx[b * cfg.batch_size : (b + 1) * cfg.batch_size]], gen, views,
                      ds.mean, ds.std)
            for b in range(min(batches, n // cfg.batch_size))]


def _mean_alignment(history: list[dict]) -> list[float] | None:
    rows = [h["alignment"] for h in history if "alignment" in h]
    return [sum(col) / len(col) for col in zip(*rows, strict=True)] if rows else None


def param_counts(params: dict[str, torch.Tensor]) -> dict[str, int]:
    """Encoder vs rule (predictor B) vs head sizes: B's size is reported with every run."""
    counts = {"encoder": 0, "rule": 0, "head": 0}
    for k, v in params.items():
        counts[{"enc": "encoder", "rule": "rule", "head": "head"}.get(k.split(".")[0],
                                                                     "head")] += v.numel()
    return counts
