"""`edge demo`: what edge is for, on the embedded digits, in about a minute on 2 cores.

A device with a locally trained encoder and an on-device head meets a shifted stream:

1. pretrain: CLAPP++ (local, no labels; rank-16 predictor, small enough for the device) on
   clean digits; the on-device head (nearest class means, `edge.head`) learns in the same
   steps from 5 labelled images a class. Shown beside it: the head from the same 5 clean
   images a class on the trained and on the untrained encoder (what the encoder's own
   learning adds), and the linear probes with all labels (where random features suffice).
2. the shift: the stream turns to inverted digits (255 - x). Without adaptation the head's
   class means are wrong for every image. On the device: batch-1 CLAPP++ (negatives from a
   memory of the last 4 codes) while the head re-learns, in the step, from the stream's 5
   labelled images a class; beside it, the head re-learned from those images on the frozen
   encoder (the in-step head sees each labelled image once, as two augmented views).
3. memory: the simulated batch-1 integer step (int8-w16) beside backprop InfoNCE's at its
   smallest batch (2: it needs an in-batch negative), and whether each fits the nRF52840
   (256 KB of SRAM).
Every figure is measured in the run; `--json` prints them as one object.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from edge import checkpoint
from edge.app.config import TrainConfig
from edge.app.train import build, head_labels, train
from edge.data import load, to_float
from edge.head import PrototypeHead
from edge.layers import EAGER
from edge.nets import encode
from edge.probe import probe_accuracy

WIDTH, RANK, LABELS, TARGET, STREAM = 0.25, 16, 5, "nrf52840", 400


def _head(net: Any, params: dict, state: dict, ds: Any) -> float:
    """The head of `state` on the test split of `ds`, with the encoder `params`."""
    head = PrototypeHead(ds.num_classes, net.shapes()[-1])
    with torch.no_grad():
        f = head.features(EAGER, encode(net, params, to_float(ds.x_test, ds))[-1])
    return head.accuracy(state, f, ds.y_test)


def _fresh_head(net: Any, params: dict, ds: Any, k: int) -> dict:
    """The head's state learned from the first k labelled images a class (no training)."""
    head = PrototypeHead(ds.num_classes, net.shapes()[-1])
    lab = head_labels(ds, k)
    idx = (lab >= 0).nonzero().flatten()
    with torch.no_grad():
        y = encode(net, params, to_float(ds.x_train[idx], ds))[-1]
    return head.update(EAGER, torch.cat((y, y)), lab[idx], head.init_state())


def _heads(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("head.")}


def _memory(net_cfg: TrainConfig) -> dict[str, Any]:
    from edge.app.commands import sim_sources
    from edge.app.commands.simulate import run_simulation, total_bytes
    from edge.sim.simulate import SimOptions, load_target, simulate

    cfg = dataclasses.replace(net_cfg, quant="int8-w16", mode="integer", negatives="memory:4",
                              head_labels=0)
    model, man = sim_sources.from_rule(cfg, 1)
    local = run_simulation(model, TARGET, manifest=man)
    bp = simulate(sim_sources.backprop_schedule(cfg, 2), load_target(TARGET), SimOptions())
    return {"target": TARGET, "batch": 1, "local_integer_step_bytes": total_bytes(local),
            "local_fits": local.fits, "backprop_bytes_batch_2": total_bytes(bp),
            "backprop_fits": bp.fits,
            "local_vs_backprop": total_bytes(local) / total_bytes(bp)}


def run(out: Path, epochs: int = 15, progress: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    ds = load("digits")
    cfg = TrainConfig(rule="clapp++", data="digits", epochs=epochs, width=WIDTH, batch_size=32,
                      head_labels=LABELS, rule_hparams={"rank": RANK})
    train(cfg, out / "pretrain", overwrite=True, progress=progress, probe=False)
    params, state, _ = checkpoint.load(out / "pretrain")
    net, _, initial = build(cfg, ds.in_shape)
    pre = {
        "head_in_step": _head(net, params, _heads(state), ds),
        "head_trained_encoder": _head(net, params, _fresh_head(net, params, ds, LABELS), ds),
        "head_untrained_encoder": _head(net, initial, _fresh_head(net, initial, ds, LABELS), ds),
        "probe_trained_encoder": probe_accuracy(net, params, ds),
        "probe_untrained_encoder": probe_accuracy(net, initial, ds),
    }
    shifted = dataclasses.replace(ds, x_train=255 - ds.x_train, x_test=255 - ds.x_test,
                                  name="digits-inverted")
    stream = dataclasses.replace(shifted, x_train=shifted.x_train[:STREAM],
                                 y_train=shifted.y_train[:STREAM])
    adapt_cfg = dataclasses.replace(cfg, epochs=1, batch_size=1, negatives="memory:4")
    enc = {k: v for k, v in params.items() if k.startswith("enc.")}
    t1 = time.perf_counter()
    train(adapt_cfg, out / "adapt", overwrite=True, progress=progress, probe=False,
          init=(net, enc), dataset=stream)
    adapt_s = time.perf_counter() - t1
    adapted, astate, _ = checkpoint.load(out / "adapt")
    shift = {
        "no_adaptation": _head(net, params, _heads(state), shifted),
        "adapted_on_device": _head(net, adapted, _heads(astate), shifted),
        "head_relearned_frozen_encoder": _head(net, params,
                                               _fresh_head(net, params, stream, LABELS), shifted),
        "stream_images": int(stream.x_train.shape[0]),
        "labelled_stream_images": int((head_labels(stream, LABELS) >= 0).sum()),
        "adaptation_seconds": round(adapt_s, 1),
        "samples_per_second": round(stream.x_train.shape[0] / adapt_s, 1),
    }
    return {"data": "digits", "net": f"digits x{WIDTH}", "rule": f"clapp++ (rank {RANK})",
            "epochs": epochs,
            "labels_per_class": LABELS, "pretrain": pre, "shift": shift,
            "memory": _memory(cfg), "seconds": round(time.perf_counter() - t0, 1),
            "runs": str(out)}
