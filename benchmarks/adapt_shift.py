"""Adaptation on the device: a pretrained encoder meets a shifted stream (issue 15).

    python -m benchmarks.adapt_shift --data-dir ../shared/data [--shift contrast|invert]
        -> benchmarks/results/adapt_shift/results-SHIFT.{json,md}

1. pretrain: CLAPP++ (rank-16 predictor) on the first `--pretrain` clean MNIST training
   images, one epoch at batch 32, the on-device head (nearest class means) learning in the
   same steps from `--labels` images a class.
2. the shift, applied to a stream of the next `--stream` training images and to the test
   set: `contrast` x -> 128 + x / 2 (a washed-out sensor), or `invert` x -> 255 - x.
3. on the shifted test set:
     no adaptation       the pretrained encoder and its head
     head only           the head re-learned from the stream's `--labels` labelled images a
                         class on the frozen encoder
     local, batch 1      CLAPP++ at batch 1 on the stream (negatives from a memory of the
                         last 4 codes), the head learning in the step from the same labels;
                         beside it the head re-learned from those labels on the adapted encoder
     BP fine-tuning      BP-InfoNCE at batch 2 (its smallest: in-batch negatives) on the same
                         stream, then the head re-learned from the same labels
   each with the step's peak memory from the simulator (the exported step for the local rule,
   fp32 and int8-w16 integer at batch 1; BP-InfoNCE's autograd schedule at batch 2; all on
   the same network), as bytes held (arena + parameters + optimizer state).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import provenance

RESULTS = Path(__file__).parent / "results" / "adapt_shift"
SHIFTS = {"contrast": lambda x: 128 + x // 2, "invert": lambda x: 255 - x}


def _memory(cfg: Any) -> dict[str, int]:
    from edge.app.commands import sim_sources
    from edge.app.commands.simulate import run_simulation, total_bytes
    from edge.sim.simulate import SimOptions, load_target, simulate

    out = {}
    for name, quant in (("local_fp32_batch_1", "fp32"), ("local_int8w16_batch_1", "int8-w16")):
        c = dataclasses.replace(cfg, quant=quant, mode="integer", negatives="memory:4",
                                head_labels=0)
        model, man = sim_sources.from_rule(c, 1)
        out[name] = total_bytes(run_simulation(model, "stm32f746", manifest=man))
    bp = simulate(sim_sources.backprop_schedule(cfg, 2), load_target("stm32f746"), SimOptions())
    out["bp_infonce_batch_2"] = total_bytes(bp)
    return out


def run(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    from edge import checkpoint
    from edge.app.config import TrainConfig
    from edge.app.demo import _fresh_head, _head, _heads
    from edge.app.train import build, head_labels, train
    from edge.data import load

    t0 = time.perf_counter()
    ds = load("mnist", a.data_dir)
    test = slice(0, a.test)
    ds = dataclasses.replace(ds, x_test=ds.x_test[test], y_test=ds.y_test[test])
    pre = dataclasses.replace(ds, x_train=ds.x_train[:a.pretrain], y_train=ds.y_train[:a.pretrain])
    cfg = TrainConfig(rule="clapp++", data="mnist", epochs=1, batch_size=32, head_labels=a.labels,
                      rule_hparams={"rank": 16})
    train(cfg, work / "pretrain", overwrite=True, progress=False, probe=False, dataset=pre)
    params, state, _ = checkpoint.load(work / "pretrain")
    net, _, _ = build(cfg, ds.in_shape)
    enc = {k: v for k, v in params.items() if k.startswith("enc.")}
    f = SHIFTS[a.shift]
    shifted = dataclasses.replace(ds, x_train=f(ds.x_train), x_test=f(ds.x_test))
    s0, s1 = a.pretrain, a.pretrain + a.stream
    stream = dataclasses.replace(shifted, x_train=shifted.x_train[s0:s1],
                                 y_train=shifted.y_train[s0:s1])
    res: dict[str, Any] = {
        "clean_head": _head(net, params, _heads(state), ds),
        "no_adaptation": _head(net, params, _heads(state), shifted),
        "head_only": _head(net, params, _fresh_head(net, params, stream, a.labels), shifted),
    }
    local_cfg = dataclasses.replace(cfg, batch_size=1, negatives="memory:4")
    t = time.perf_counter()
    train(local_cfg, work / "local", overwrite=True, progress=False, probe=False,
          init=(net, enc), dataset=stream)
    local_s = time.perf_counter() - t
    lp, ls, _ = checkpoint.load(work / "local")
    res["local_batch_1_in_step_head"] = _head(net, lp, _heads(ls), shifted)
    res["local_batch_1_head_relearned"] = _head(net, lp, _fresh_head(net, lp, stream, a.labels),
                                                shifted)
    bp_cfg = dataclasses.replace(cfg, rule="bp-infonce", batch_size=2, head_labels=0,
                                 rule_hparams={})
    t = time.perf_counter()
    train(bp_cfg, work / "bp", overwrite=True, progress=False, probe=False, init=(net, enc),
          dataset=stream)
    bp_s = time.perf_counter() - t
    bpp, _, _ = checkpoint.load(work / "bp")
    res["bp_finetune_batch_2_head_relearned"] = _head(
        net, bpp, _fresh_head(net, bpp, stream, a.labels), shifted)
    labelled = int((head_labels(stream, a.labels) >= 0).sum())
    return {"data": "mnist", "net": net.name, "shift": a.shift, "pretrain_images": a.pretrain,
            "stream_images": a.stream, "labelled_stream_images": labelled,
            "test_images": int(ds.x_test.shape[0]), "accuracy": res,
            "seconds": {"local_batch_1": round(local_s, 1), "bp_batch_2": round(bp_s, 1)},
            "memory_bytes_stm32f746": _memory(cfg), "provenance": provenance(t0)}


def markdown(r: dict[str, Any]) -> str:
    acc, mem, sec = r["accuracy"], r["memory_bytes_stm32f746"], r["seconds"]
    return "\n".join([
        f"# Adaptation after a shift ({r['shift']}), MNIST, {r['net']} net", "",
        "Written by `python -m benchmarks.adapt_shift` (method: its docstring). "
        f"Run {r['provenance']['run']}, {r['provenance']['measured']}. Pretrained on "
        f"{r['pretrain_images']:,} clean images; stream of {r['stream_images']:,} shifted "
        f"images, {r['labelled_stream_images']} labelled; {r['test_images']:,} shifted test "
        f"images (clean, the pretrained head: {acc['clean_head']:.4f}).", "",
        "| on the shifted test set | accuracy | step memory (stm32f746 sim) | seconds |",
        "|---|---|---|---|",
        f"| no adaptation | {acc['no_adaptation']:.4f} | - | - |",
        f"| head only, frozen encoder | {acc['head_only']:.4f} | - | - |",
        f"| local CLAPP++ batch 1, in-step head | {acc['local_batch_1_in_step_head']:.4f} | "
        f"{mem['local_fp32_batch_1']:,} B fp32, {mem['local_int8w16_batch_1']:,} B int8-w16 | "
        f"{sec['local_batch_1']} |",
        f"| local CLAPP++ batch 1, head re-learned | "
        f"{acc['local_batch_1_head_relearned']:.4f} | (same) | - |",
        f"| BP-InfoNCE fine-tuning batch 2, head re-learned | "
        f"{acc['bp_finetune_batch_2_head_relearned']:.4f} | {mem['bp_infonce_batch_2']:,} B "
        f"fp32 | {sec['bp_batch_2']} |", ""])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="data root (else $EDGE_DATA)")
    ap.add_argument("--shift", default="contrast", choices=sorted(SHIFTS))
    ap.add_argument("--pretrain", type=int, default=5000)
    ap.add_argument("--stream", type=int, default=1000)
    ap.add_argument("--labels", type=int, default=10)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edge-adapt-") as work:
        r = run(a, Path(work))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"results-{a.shift}.json").write_text(json.dumps(r, indent=1))
    (a.out / f"results-{a.shift}.md").write_text(markdown(r))
    sys.stdout.write(markdown(r))
    return r


if __name__ == "__main__":
    main()
