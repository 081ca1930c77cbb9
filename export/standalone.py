"""Train an edge bundle with nothing but numpy and onnxruntime (no torch, no edge).

Copied into every bundle as `train_with_onnxruntime.py`. Usage:

    python train_with_onnxruntime.py --batches views.npy --steps 100 [--per-layer]
        [--bundle DIR] [--out trained_state.npz] [--threads 2] [--seed 0]

`views.npy` holds K pairs of views, shape (K, 2, batch, C, H, W), in the dtype the manifest
gives for x1 / x2, or for an integer bundle (int8 views) float32 normalised images, which are
quantized here exactly like edge does (x * 2^f_in, rounded half to even, clipped to int8);
step s trains on pair s mod K. Random bits for stochastic rounding are drawn from
numpy's default_rng(--seed), in sorted input-name order, so the whole-step graph and the
per-layer chain draw the same bits. Each step feeds the bound inputs (initially
from the bundle's state.npz), runs the whole-step graph (or the per-layer graphs in a chain,
layer i's y1, y2 becoming layer i+1's x1, x2), then moves every output to the input it is
bound to. Prints one JSON line per step and writes the final bound inputs as an npz.
Runs on Python 3.8+ (device images are often old).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def draw_noise(manifest: dict, graphs: list, rng: np.random.Generator) -> dict:
    """Random bits for the noise/* inputs (stochastic rounding): uniform in [low, high)."""
    if not manifest.get("noise"):
        return {}
    low, high = manifest["noise"]["low"], manifest["noise"]["high"]
    specs = {t["name"]: t for g in graphs for t in g["inputs"] if t["name"].startswith("noise/")}
    return {n: rng.integers(low, high, specs[n]["shape"], dtype=specs[n]["dtype"])
            for n in sorted(specs)}


def quantize_views(batches: np.ndarray, manifest: dict) -> np.ndarray:
    """Float views -> int8 at the integer plan's input scale 2^-f_in (round half to even,
    clip, then cast), the rule of edge's quantize_input."""
    f_in = manifest["quant"]["plan"]["layers"][0]["f_x"]
    q = np.round(batches.astype(np.float64) * 2.0 ** f_in)
    return np.clip(q, -128, 127).astype(np.int8)


def run_graph(sess: ort.InferenceSession, graph: dict, feeds: dict) -> dict:
    names = [o["name"] for o in graph["outputs"]]
    wanted = {i["name"] for i in graph["inputs"]}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))  # noqa: B905


def bind(carried: dict, outputs: dict, graph: dict) -> None:
    for b in graph["bindings"]:
        carried[b["input"]] = outputs[b["output"]]


def one_step(sessions: list, graphs: list, carried: dict, x1, x2, noise) -> tuple[dict, list]:
    new, losses = dict(carried), []
    if "y1" not in {o["name"] for o in graphs[0]["outputs"]}:  # the whole-step graph
        out = run_graph(sessions[0], graphs[0], {**carried, **noise, "x1": x1, "x2": x2})
        bind(new, out, graphs[0])
        return new, [float(v) for v in np.ravel(out["layer_loss"])]
    for sess, graph in zip(sessions, graphs):  # noqa: B905 - per-layer chain (py3.8+ devices)
        out = run_graph(sess, graph, {**carried, **noise, "x1": x1, "x2": x2})
        x1, x2 = out["y1"], out["y2"]
        losses.append(float(out["loss"]))
        bind(new, out, graph)
    return new, losses


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=here)
    ap.add_argument("--batches", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--per-layer", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    graphs = manifest["layers"] if args.per_layer else [manifest["step"]]
    if not graphs:
        print("error: this bundle has no per-layer graphs (export with --per-layer)",
              file=sys.stderr)
        return 2
    x_spec = next(t for t in manifest["step"]["inputs"] if t["name"] == "x1")
    batches = np.load(args.batches, allow_pickle=False)
    if x_spec["dtype"] == "int8" and batches.dtype.kind == "f" and manifest.get("quant"):
        batches = quantize_views(batches, manifest)
    want = (2, *x_spec["shape"])
    if batches.shape[1:] != want or str(batches.dtype) != x_spec["dtype"]:
        print(f"error: {args.batches} is {batches.dtype}{list(batches.shape)}, want "
              f"{x_spec['dtype']}[K, {', '.join(map(str, want))}]", file=sys.stderr)
        return 2
    with np.load(args.bundle / manifest["state_file"], allow_pickle=False) as z:
        carried = {k: z[k] for k in z.files}
    sessions = [session(args.bundle / g["file"], args.threads) for g in graphs]
    rng = np.random.default_rng(args.seed)
    for s in range(args.steps):
        x1, x2 = batches[s % len(batches)]
        noise = draw_noise(manifest, graphs, rng)
        carried, losses = one_step(sessions, graphs, carried, x1, x2, noise)
        print(json.dumps({"step": s + 1, "loss": sum(losses), "layer_loss": losses}), flush=True)
    out = args.out or args.bundle / "trained_state.npz"
    np.savez(out, **carried)
    print(json.dumps({"steps": args.steps, "state": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
