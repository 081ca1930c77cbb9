"""Train an edge bundle with nothing but numpy and onnxruntime (no torch, no edge).

Copied into every bundle as `train_with_onnxruntime.py`: the reference driver of the
manifest (format edge-bundle/2, `export.manifest`); it reads manifest.json and the files it
names, nothing else. Usage:

    python train_with_onnxruntime.py --batches views.npy --steps 100 [--per-layer]
        [--bundle DIR] [--out trained_state.npz] [--threads 2] [--seed 0]

`views.npy` holds K pairs of views, shape (K, 2, batch, C, H, W), in the dtype of
feeds.views, or for an integer bundle float32 normalised images, quantized as
feeds.views.quantization says (clip(round_half_even(x * 2^f_in), -128, 127), int8). Step s
trains on pair s mod K. Every step:
  bits    feeds.random_bits: one numpy default_rng(--seed) for the whole run; each step draws
          rng.integers(low, high, shape, dtype) for every name of its `inputs`, in that
          (sorted) order; `export.runner.draw_noise` draws the same, so edge reproduces it
  graphs  the whole step, or (--per-layer) the block graphs in order: block 0 takes x1, x2,
          block i > 0 the previous block's y as x; every graph gets the bound values of the
          step's start (initially state.npz) and the bits it lists
  bind    then every output moves to the input it is bound to
Prints one JSON line per step ({step, loss, layer_loss}) and writes the final bound inputs as
an npz. Runs on Python 3.8+ (device images are often old).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

FORMAT = "edge-bundle/2"


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def draw_noise(manifest: dict, graphs: list, rng: np.random.Generator) -> dict:
    """One step's random bits: feeds.random_bits' reference generator over the inputs the
    graphs take, in sorted name order."""
    bits = manifest["feeds"]["random_bits"]
    if not bits:
        return {}
    specs = {t["name"]: t for g in graphs for t in g["inputs"] if t["name"] in bits["inputs"]}
    return {n: rng.integers(bits["low"], bits["high"], specs[n]["shape"], dtype=bits["dtype"])
            for n in sorted(specs)}


def quantize_views(batches: np.ndarray, manifest: dict) -> np.ndarray:
    """Float views -> int8 by feeds.views.quantization (round half to even, clip, cast)."""
    q = manifest["feeds"]["views"]["quantization"]
    lo, hi = q["clip"]
    x = np.round(batches.astype(np.float64) * 2.0 ** q["scale_exponent"])  # half to even
    return np.clip(x, lo, hi).astype(q["dtype"])


def run_graph(sess: ort.InferenceSession, graph: dict, feeds: dict) -> dict:
    names = [o["name"] for o in graph["outputs"]]
    wanted = {i["name"] for i in graph["inputs"]}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))  # noqa: B905


def bind(carried: dict, outputs: dict, graph: dict) -> None:
    for b in graph["bindings"]:
        carried[b["input"]] = outputs[b["output"]]


def one_step(sessions: list, graphs: list, carried: dict, x1, x2, noise) -> tuple[dict, list]:
    new, losses = dict(carried), []
    if "y" not in {o["name"] for o in graphs[0]["outputs"]}:  # the whole-step graph
        feeds = dict(carried, **noise)
        feeds.update(x1=x1, x2=x2)
        out = run_graph(sessions[0], graphs[0], feeds)
        bind(new, out, graphs[0])
        return new, [float(v) for v in np.ravel(out["layer_loss"])]
    x = None
    for i, (sess, graph) in enumerate(zip(sessions, graphs)):  # noqa: B905 - py3.8 devices
        feeds = dict(carried, **noise)
        feeds.update({"x1": x1, "x2": x2} if i == 0 else {"x": x})
        out = run_graph(sess, graph, feeds)
        x = out["y"]
        losses.append(float(out["loss"]))
        bind(new, out, graph)
    return new, losses


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


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
    if manifest.get("format") != FORMAT:
        return fail(f"manifest format {manifest.get('format')!r} is not {FORMAT!r}")
    graphs = manifest["layers"] if args.per_layer else [manifest["step"]]
    if not graphs:
        return fail("this bundle has no per-layer graphs (export with --per-layer)")
    views = manifest["feeds"]["views"]
    batches = np.load(args.batches, allow_pickle=False)
    if views["quantization"] and batches.dtype.kind == "f":
        batches = quantize_views(batches, manifest)
    want = (2, *views["shape"])
    if batches.shape[1:] != want or str(batches.dtype) != views["dtype"]:
        return fail(f"{args.batches} is {batches.dtype}{list(batches.shape)}, want "
                    f"{views['dtype']}[K, {', '.join(map(str, want))}]")
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
