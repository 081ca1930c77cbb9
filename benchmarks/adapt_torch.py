"""`from_torch` adapts a pretrained torch model (issue 13 acceptance), end to end on MNIST.

1. A small `nn.Sequential` (conv, BatchNorm, ReLU6, depthwise conv, ReLU6, avg-pool,
   flatten, linear) trained briefly by supervised backprop: `--bp-steps` steps of
   `torch.optim.Adam` (cross-entropy on the labels, batch 64, train mode BatchNorm), images
   normalised as edge normalises them (`edge.data.to_float`); its test accuracy is recorded.
2. `edge.nets.from_torch(model.eval(), (1, 28, 28))`: the network spec and its weights
   (BatchNorm read in inference mode; `train` folds it into the conv before it).
3. `edge.app.train.train(cfg, out, init=(net, params))` continues with CLAPP++ (rule default
   rate, `--subset` images, `--epochs`): its `random_probe_accuracy` is the probe of the
   converted pretrained encoder (before), `probe_accuracy` after the local training; the same
   architecture at torch's default initialisation, converted and probed the same way, is the
   floor for both.
4. Export: from the adapted checkpoint, `export.step.step_graph` of the fp32 CLAPP++ step run
   in onnxruntime (`export.runner.OnnxStepper`) against the torch step from the same state
   on real views (relative L2 of the update), and the int8-w16 integer step: bit-exact or
   not (`benchmarks.presets.step_parity`).

    python -m benchmarks.adapt_torch --data-dir ../shared/data [--bp-steps 300 --subset 10000]

Writes benchmarks/results/from_torch/{results.json, results.md}; runs under runs/ (ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks import machine, provenance, run_id

RESULTS = Path(__file__).parent / "results" / "from_torch"
IN_SHAPE = (1, 28, 28)


def small_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


def pretrain(model: nn.Sequential, ds, steps: int, seed: int) -> dict:
    from edge.data import to_float

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses, t0 = [], time.perf_counter()
    n = ds.x_train.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(to_float(ds.x_train[idx], ds)), ds.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(to_float(ds.x_test[s:s + 1000], ds)).argmax(1)
                           == ds.y_test[s:s + 1000]).sum())
                      for s in range(0, ds.x_test.shape[0], 1000))
    return {"steps": steps, "optimizer": "torch.optim.Adam lr 1e-3", "batch": 64,
            "first_loss": losses[0], "last_loss": sum(losses[-20:]) / len(losses[-20:]),
            "test_accuracy": correct / ds.x_test.shape[0],
            "seconds": round(time.perf_counter() - t0, 1)}


def markdown(r: dict) -> str:
    p, c, t, par = r["pretrain"], r["conversion"], r["clapp++"], r["parity"]
    f, i = par["fp32"], par["integer"]
    prov = r["provenance"]
    return "\n".join([
        "# from_torch: adapting a pretrained torch model with CLAPP++", "",
        f"Run {prov['run']}: {prov['measured']}, commit {(prov['commit'] or '?')[:10]}"
        f"{' (tree modified)' if prov['tree_modified'] else ''}, load "
        f"{prov['machine']['loadavg_1min']} on {prov['machine']['cpus']} CPUs, "
        f"{prov['seconds'] / 60:.1f} min. Command: `{r['command']}`.", "",
        f"Model: `{r['module']}`.", "",
        f"1. Supervised backprop pre-training on MNIST: {p['steps']} steps of {p['optimizer']}, "
        f"batch {p['batch']}, loss {p['first_loss']:.3f} -> {p['last_loss']:.3f} (mean of the "
        f"last 20), test accuracy of the torch classifier {100 * p['test_accuracy']:.2f} % "
        f"({p['seconds']} s).",
        f"2. `from_torch`: blocks {c['blocks']}; converted encoder output vs torch "
        f"(eval mode, 64 test images): max |diff| {c['max_abs_diff']:.1e}.",
        f"3. CLAPP++ from the converted weights ({t['train_images']} MNIST images, "
        f"{t['epochs']} epoch(s), batch {t['batch_size']}, lr {t['lr']}; {t['seconds']:.0f} s):",
        "",
        "| encoder | linear probe, all blocks (%) |", "|---|---|",
        f"| same architecture, torch default init (converted) | "
        f"{100 * r['random_init_probe']:.2f} |",
        f"| pretrained by backprop, converted (before CLAPP++) | {100 * t['probe_before']:.2f} |",
        f"| after CLAPP++ on device | {100 * t['probe_after']:.2f} |", "",
        f"4. Export from the adapted checkpoint (batch {f['batch']}, real views): fp32 step in "
        f"onnxruntime vs torch, relative L2 of the update {f['update_rel_l2_params']:.1e} "
        f"(parameters), {f['update_rel_l2_state']:.1e} (optimizer state), loss "
        f"{f['loss_onnx']:.6g} vs {f['loss_torch']:.6g} ({f['nodes']} nodes); int8-w16 "
        f"integer step in onnxruntime bit-exact vs the torch integer step: "
        f"**{'yes' if i['bit_exact'] else 'no'}** ({i['steps']} free-running steps, stores "
        f"moved: {i['stores_moved']}).", ""])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="data root (else $EDGE_DATA)")
    ap.add_argument("--bp-steps", type=int, default=300)
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    from benchmarks.presets import real_views, step_parity
    from edge import checkpoint
    from edge.app.config import TrainConfig
    from edge.app.train import make_rule, optim, train
    from edge.data import load, to_float
    from edge.nets import NetSpec, encode, from_torch
    from edge.probe import probe_accuracy

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    ds = load("mnist", a.data_dir, a.subset)
    model = small_model(a.seed)
    pre = pretrain(model, ds, a.bp_steps, a.seed)
    net, params = from_torch(model, IN_SHAPE)
    x = to_float(ds.x_test[:64], ds)
    with torch.no_grad():
        diff = float((encode(net, params, x)[-1] - model(x)).abs().max())
    conversion = {"blocks": [[p.op for p in b.body] for b in net.blocks], "max_abs_diff": diff}
    fresh_net, fresh = from_torch(small_model(a.seed + 1000).eval(), IN_SHAPE)
    random_init = probe_accuracy(fresh_net, fresh, ds, "all")
    cfg = TrainConfig(rule="clapp++", data="mnist", subset=a.subset, epochs=a.epochs,
                      batch_size=64, seed=a.seed)
    run_dir = a.out / "runs" / "clapp++"
    r = train(cfg, run_dir, data_dir=a.data_dir, overwrite=True, progress=False, probe=True,
              init=(net, params))
    adapted = {"probe_before": r["random_probe_accuracy"], "probe_after": r["probe_accuracy"],
               "train_images": r["train_images"], "epochs": cfg.epochs,
               "batch_size": cfg.batch_size, "lr": r["optimizer"]["lr"],
               "final_loss": r["final_loss"], "seconds": r["seconds"]}
    p, s, meta = checkpoint.load(run_dir)
    anet, rule, opt = NetSpec.from_dict(meta["net"]), make_rule(cfg), optim(cfg)
    views = real_views(cfg, ds, 4, 16)
    parity = step_parity(anet, rule, opt, p, s, views, f"the adapted checkpoint (epoch "
                         f"{meta['epoch']})")
    res = {"run": run_id(), "command": "python -m benchmarks.adapt_torch " + " ".join(
        sys.argv[1:] if argv is None else argv), "machine": machine(),
        "module": " -> ".join(type(m).__name__ + ("(groups=16)" if getattr(m, "groups", 1) > 1
                                                   else "") for m in model),
        "pretrain": pre, "conversion": conversion, "random_init_probe": random_init,
        "clapp++": adapted, "parity": parity, "provenance": provenance(t0)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=1))
    (a.out / "results.md").write_text(markdown(res))
    sys.stdout.write(markdown(res))
    return res


if __name__ == "__main__":
    main()
