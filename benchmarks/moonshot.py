"""Moonshot: a network of the kind MCUs run, every layer trained on the device at batch 1.

    python -m benchmarks.moonshot [--data-dir DIR] [--subset N]
        -> benchmarks/results/moonshot/{results.json, results.md}

Setting: ResNet-8 (MLPerf Tiny's image-classification model) at width 1/4 on MNIST, CLAPP++
with a rank-16 predictor, coarse ~2x2 codes (`pool=14,14,7,3`; the default grid, chosen for
learning, does not fit this device) and its negatives from a memory of the last 4 codes
(batch 1 has no in-batch negative), int8-w16 integer mode (int8 weights from int16 stores, int32
accumulators, stochastic rounding from explicit random bits), every layer updated every step.
Each figure comes from the command a user would run, recorded beside it:

  memory   `edge simulate --rule ...`: the exported integer step's peak on the nRF52840
           (256 KB SRAM, 1 MB flash) and backprop's (`--rule` reports it at the same batch:
           the autograd schedule of the same network, fp32)
  code     `edge export ... --compile iree --target nrf52840`: the step as a Cortex-M4 static
           library (IREE), its code / rodata / data and VM module bytes against flash, with
           the host-compiled step checked bit for bit against onnxruntime
  accuracy `edge train ... --batch-size 1 --negatives memory:4`: MNIST, the first N training
           images, one epoch, linear probe on all layers beside the untrained encoder;
           samples/s = N / the run's seconds (probes included)

Backprop cannot learn at batch 1 here (BP-InfoNCE and BP-CLAPP++ pair in-batch negatives),
so its row has bytes only. Reference point: Lin et al., On-Device Training Under 256KB Memory
(NeurIPS 2022), which fine-tunes a sparse subset of an int8 MCUNet's layers in 256 KB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import provenance

RESULTS = Path(__file__).parent / "results" / "moonshot"
# The coarse ~2x2 codes (kernels 14-14-7-3 on these 28-28-14-7 maps, edge's first default
# grid): the default grid, chosen for learning on CIFAR-10, makes the step 384 kB here
NET = ["--rule", "clapp++", "--data", "mnist", "--net", "resnet8", "--width", "0.25",
       "--quant", "int8-w16", "--mode", "integer", "--hp", "rank=16", "--hp", "pool=14,14,7,3"]
TARGET = "nrf52840"


def edge(args: list[str]) -> tuple[dict[str, Any], str, float]:
    """`python -m edge *args --json` -> (its JSON object, the command, seconds)."""
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "edge", *args, "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if done.returncode:
        raise RuntimeError(f"edge {args[0]} failed: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout), "edge " + " ".join(args), time.perf_counter() - t


def run(data_dir: str | None, subset: int, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    dd = ["--data-dir", data_dir] if data_dir else []
    sim, sim_cmd, _ = edge(["simulate", *NET, "--hp", "negatives=4", "--batch", "1",
                            "--target", TARGET])
    exp, exp_cmd, exp_s = edge(["export", *NET, "--hp", "negatives=4", "--batch-size", "1",
                                "--compile", "iree", "--target", TARGET, "--subset", "256",
                                "--out", str(work / "bundle"), *dd])
    tr, tr_cmd, tr_s = edge(["train", *NET, "--batch-size", "1", "--negatives", "memory:4",
                             "--subset", str(subset), "--epochs", "1", "--out",
                             str(work / "run"), *dd])
    cross = exp["iree"]["cross"]
    return {
        "memory": {"command": sim_cmd, "target": TARGET, "local_peak_bytes": sim["peak_bytes"],
                   "local_fits": sim["fits"], "backprop_peak_bytes": sim["backprop_peak_bytes"],
                   "backprop_fits": sim["backprop_fits"],
                   "local_vs_backprop": sim["local_vs_backprop_peak"]},
        "code": {"command": exp_cmd, "cpu": cross["cpu"], "code_bytes": cross["code_bytes"],
                 "rodata_bytes": cross["rodata_bytes"], "data_bytes": cross["data_bytes"],
                 "module_bytes": cross["module_bytes"], "flash_bytes": cross["flash_bytes"],
                 "flash_capacity": cross["flash"]["capacity"], "flash_fits": cross["flash"]["fits"],
                 "runtime_helpers": cross["imports"], "host_parity": exp["iree"]["parity"],
                 "seconds": round(exp_s, 1)},
        "accuracy": {"command": tr_cmd, "images": tr["train_images"],
                     "probe_accuracy": tr["probe_accuracy"],
                     "random_probe_accuracy": tr["random_probe_accuracy"],
                     "parameters": tr["parameters"], "seconds": round(tr_s, 1),
                     "samples_per_second": round(tr["train_images"] / tr_s, 2)},
        "provenance": provenance(t0),
    }


def markdown(r: dict[str, Any]) -> str:
    m, c, a = r["memory"], r["code"], r["accuracy"]
    yes = {True: "yes", False: "no"}
    return "\n".join([
        "# Moonshot: ResNet-8 x1/4, every layer trained at batch 1 in int8-w16 integer mode", "",
        "Written by `python -m benchmarks.moonshot` (method: its docstring). "
        f"Run {r['provenance']['run']}, {r['provenance']['measured']}.", "",
        f"| step | peak SRAM ({m['target']}, 256 KB) | fits | accuracy (probe) | samples/s |",
        "|---|---|---|---|---|",
        f"| CLAPP++ local, integer, batch 1 | {m['local_peak_bytes']:,} B | "
        f"{yes[m['local_fits']]} | {a['probe_accuracy']:.4f} (untrained "
        f"{a['random_probe_accuracy']:.4f}) | {a['samples_per_second']} |",
        f"| backprop, fp32, batch 1 | {m['backprop_peak_bytes']:,} B | "
        f"{yes[m['backprop_fits']]} | cannot learn at batch 1 (in-batch negatives) | - |", "",
        f"Code (IREE, {c['cpu']} static library): {c['code_bytes']:,} B code, "
        f"{c['rodata_bytes']:,} B rodata, {c['data_bytes']:,} B data, {c['module_bytes']:,} B "
        f"VM module: {c['flash_bytes']:,} B of {c['flash_capacity']:,} B flash "
        f"(fits: {yes[c['flash_fits']]}); the host-compiled step equals onnxruntime's bit for "
        f"bit: {yes[c['host_parity']['integers_equal']]}. The firmware links the runtime "
        f"helpers {', '.join(c['runtime_helpers'])}.", "",
        f"Accuracy: MNIST, first {a['images']:,} training images, one epoch at batch 1, "
        f"{a['seconds']} s on this machine.", "",
        "Commands:", "", *[f"    {x['command']}" for x in (m, c, a)], ""])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="data root (else $EDGE_DATA)")
    ap.add_argument("--subset", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edge-moonshot-") as work:
        r = run(a.data_dir, a.subset, Path(work))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(r, indent=1))
    (a.out / "results.md").write_text(markdown(r))
    sys.stdout.write(markdown(r))
    return r


if __name__ == "__main__":
    main()
