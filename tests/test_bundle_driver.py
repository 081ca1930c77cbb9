"""A driver written from the manifest alone trains a bundle exactly like edge.

`DRIVER` below is a device implementer's driver: numpy and onnxruntime, reading nothing but
manifest.json and the files it names (feeds.views.quantization for the int8 views,
feeds.random_bits and its reference generator for the random bits, feeds.chain for the
per-block graphs, the bindings). It runs in a subprocess where torch, edge, export and quant
cannot be imported. Integer bundle: after several steps it, the bundle's own script and
edge's torch integer step (`quant.integer.integer_step`, fed the bits the manifest's
reference generator gives) hold the same stores bit for bit, whole step and per-block
chain. fp32 bundle: it equals the script bit for bit and torch's step within FP32_TOL.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from net_setup import build, int_state

from edge.optim import OptimConfig
from edge.step import init_state, train_step
from export.bundle import SCRIPT, check_bundle, load_state, write_bundle
from export.manifest import NOISE, PARAMS, STATE
from export.runner import draw_noise
from export.step import fp32_program, integer_program
from quant.calibrate import make_plan
from quant.integer import integer_step, quantize_input

BATCH, STEPS, SEED = 4, 5, 7
FP32_TOL = 1e-4  # relative L2 of the whole trajectory's update (float32 summation order)
BLOCKED = ("torch", "edge", "export", "quant")

DRIVER = r'''
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def train(bundle, views_file, steps, seed, per_block, out):
    bundle = Path(bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["format"] == "edge-bundle/2", m["format"]
    feeds = m["feeds"]
    graphs = m["layers"] if per_block else [m["step"]]
    sessions = [ort.InferenceSession(str(bundle / g["file"]), providers=["CPUExecutionProvider"])
                for g in graphs]
    with np.load(bundle / m["state_file"]) as z:
        bound = {k: z[k] for k in z.files}
    views = np.load(views_file)
    q = feeds["views"]["quantization"]
    if q is not None:  # round half to even (np.rint), clip, cast
        lo, hi = q["clip"]
        views = np.clip(np.rint(views.astype(np.float64) * 2.0 ** q["scale_exponent"]), lo, hi)
        views = views.astype(q["dtype"])
    assert str(views.dtype) == feeds["views"]["dtype"]
    assert list(views.shape[2:]) == feeds["views"]["shape"]
    bits_spec = feeds["random_bits"]
    shapes = {t["name"]: t["shape"] for g in [m["step"]] + m["layers"] for t in g["inputs"]}
    rng = np.random.default_rng(seed)
    chain = feeds["chain"] if per_block else None
    chain_in, chain_out = (chain["input"], chain["output"]) if chain else (None, None)
    losses = []
    for s in range(steps):
        x1, x2 = views[s % len(views)]
        bits = {}
        if bits_spec:  # fresh every step, in the listed order
            for name in bits_spec["inputs"]:
                bits[name] = rng.integers(bits_spec["low"], bits_spec["high"],
                                          size=shapes[name], dtype=bits_spec["dtype"])
        new, x, step_losses = dict(bound), None, []
        for g, sess in zip(graphs, sessions):
            fed = {}
            for t in g["inputs"]:
                n = t["name"]
                if n == "x1" or n == "x2":
                    fed[n] = x1 if n == "x1" else x2
                elif n == chain_in:
                    fed[n] = x
                elif n in bits:
                    fed[n] = bits[n]
                else:
                    fed[n] = bound[n]  # a bound input: its value at the step's start
                assert list(fed[n].shape) == t["shape"] and str(fed[n].dtype) == t["dtype"], n
            names = [o["name"] for o in g["outputs"]]
            result = dict(zip(names, sess.run(names, fed)))
            for b in g["bindings"]:
                new[b["input"]] = result[b["output"]]
            if chain_out:
                x = result[chain_out]
                step_losses.append(float(result["loss"]))
            else:
                step_losses = [float(v) for v in result["layer_loss"]]
        bound = new
        losses.append(step_losses)
    np.savez(out, **bound)
    return losses
'''


def run_driver(bundle: Path, views: Path, out: Path, per_block: bool) -> list[list[float]]:
    code = (
        "import sys\n"
        f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
        f"{DRIVER}\n"
        f"losses = train({str(bundle)!r}, {str(views)!r}, {STEPS}, {SEED}, {per_block},"
        f" {str(out)!r})\n"
        f"leaked = [k for k in sys.modules if k.split('.')[0] in {BLOCKED!r}"
        " and sys.modules[k] is not None]\n"
        "assert not leaked, leaked\n"
        "print(json.dumps(losses))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def run_script(bundle: Path, views: Path, out: Path, per_block: bool) -> list[list[float]]:
    code = (
        "import sys, runpy\n"
        f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
        f"sys.argv = ['{SCRIPT}', '--batches', {str(views)!r}, '--steps', '{STEPS}',"
        f" '--seed', '{SEED}', '--threads', '1', '--out', {str(out)!r}"
        f"{', ' + repr('--per-layer') if per_block else ''}]\n"
        f"runpy.run_path({str(bundle / SCRIPT)!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line)["layer_loss"] for line in proc.stdout.splitlines()[:-1]]


def npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def float_views(tmp_path_factory) -> Path:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, BATCH, 1, 8, 8, generator=gen)
    views = torch.cat([x, x + 0.3 * torch.randn(x.shape, generator=gen)], dim=1)
    path = tmp_path_factory.mktemp("views") / "views.npy"
    np.save(path, views.numpy())
    return path


@pytest.fixture(scope="module")
def int_bundle(tmp_path_factory):
    net, rule, params = build()
    gen = torch.Generator().manual_seed(1)
    calib = [tuple(torch.randn(2, BATCH, 1, 8, 8, generator=gen)) for _ in range(2)]
    plan, stores = make_plan(net, rule, params, calib, "int8-w16", 1e-3)
    out = tmp_path_factory.mktemp("int")
    write_bundle(out, net, rule, integer_program(net, rule, plan, stores), stores,
                 int_state(net, rule, plan, stores), BATCH, per_layer=True)
    return out, net, rule, plan


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory):
    net, rule, params = build()
    opt = OptimConfig("sgd", lr=1e-2)
    out = tmp_path_factory.mktemp("fp32")
    write_bundle(out, net, rule, fp32_program(net, rule, opt), params,
                 init_state(net, rule, opt, params), BATCH, per_layer=True)
    return out, net, rule, opt, params


def reference_bits(manifest: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One step of the manifest's reference generator, written from its words."""
    spec = manifest["feeds"]["random_bits"]
    assert spec["reference"]["draw"] == "rng.integers(0, 65536, size=shape, dtype=numpy.int32)"
    shapes = {t["name"]: t["shape"] for t in manifest["step"]["inputs"]}
    return {n: rng.integers(0, 65536, size=shapes[n], dtype=np.int32) for n in spec["inputs"]}


def test_integer_bundle_driver_script_and_torch_agree_bit_for_bit(int_bundle, float_views,
                                                                   tmp_path):
    out, net, rule, plan = int_bundle
    check_bundle(out)
    manifest = json.loads((out / "manifest.json").read_text())
    runs = {}
    for per_block in (False, True):
        for who, run in (("driver", run_driver), ("script", run_script)):
            path = tmp_path / f"{who}-{per_block}.npz"
            runs[who, per_block] = (run(out, float_views, path, per_block), npz(path))
    # edge's own torch integer step, fed the manifest's reference bits
    form = rule.integer_form(net)
    stores = {k[len(PARAMS):]: torch.from_numpy(v) for k, v in load_state(out).items()
              if k.startswith(PARAMS)}
    start = dict(stores)
    count = torch.zeros((), dtype=torch.int64)
    rng, views, losses = np.random.default_rng(SEED), np.load(float_views), []
    for s in range(STEPS):
        x1, x2 = (quantize_input(torch.from_numpy(v), plan.f_in) for v in views[s % len(views)])
        bits = reference_bits(manifest, rng)
        noise = {k[len(NOISE):]: torch.from_numpy(v) for k, v in bits.items()}
        stores, metrics = integer_step(net, form, plan, stores, x1, x2, noise, count)
        count = count + 1
        losses.append(metrics["layer_loss"].tolist())
    assert any(not torch.equal(stores[k], start[k]) for k in stores)  # training moved them
    for key, (got_losses, got) in runs.items():
        assert got_losses == losses, key
        assert set(got) == {PARAMS + k for k in stores} | {STATE + "step"}, key
        for k, v in stores.items():
            np.testing.assert_array_equal(got[PARAMS + k], v.numpy(), err_msg=f"{key} {k}")
        assert int(got[STATE + "step"]) == STEPS


def test_fp32_bundle_driver_equals_the_script_and_torch(fp32_bundle, float_views, tmp_path):
    out, net, rule, opt, params = fp32_bundle
    got = {}
    for who, run in (("driver", run_driver), ("script", run_script)):
        for per_block in (False, True):
            run(out, float_views, tmp_path / f"{who}-{per_block}.npz", per_block)
            got[who, per_block] = npz(tmp_path / f"{who}-{per_block}.npz")
    for per_block in (False, True):  # same graphs, same feeds, same runtime: same numbers
        for k, v in got["driver", per_block].items():
            np.testing.assert_array_equal(v, got["script", per_block][k], err_msg=k)
    state, p, views = init_state(net, rule, opt, params), dict(params), np.load(float_views)
    for s in range(STEPS):
        x1, x2 = (torch.from_numpy(v) for v in views[s % len(views)])
        p, state, _ = train_step(net, rule, opt, p, state, x1, x2)
    for per_block in (False, True):
        onnx_p = got["driver", per_block]
        d_onnx = np.concatenate([(onnx_p[PARAMS + k] - params[k].numpy()).ravel() for k in p])
        d_torch = np.concatenate([(p[k] - params[k]).numpy().ravel() for k in p])
        assert np.linalg.norm(d_torch) > 1e-3  # the weights moved: the comparison can fail
        err = np.linalg.norm(d_onnx - d_torch) / np.linalg.norm(d_torch)
        assert err < FP32_TOL, (per_block, err)
        assert float(onnx_p[STATE + "step"]) == STEPS


def test_edge_draws_the_manifest_reference_bits(int_bundle):
    """export.runner.draw_noise (OnnxStepper), the bundle script's draw_noise and the
    manifest's words give the same bits, step after step, whole step or per-block graphs."""
    import runpy

    from export.bundle import read_manifest

    out = int_bundle[0]
    manifest = json.loads((out / "manifest.json").read_text())
    script = runpy.run_path(str(out / SCRIPT), run_name="bundle_script")
    ios = read_manifest(out)
    edge_rng, layer_rng = np.random.default_rng(11), np.random.default_rng(11)
    script_rng, words_rng = np.random.default_rng(11), np.random.default_rng(11)
    for _ in range(2):
        want = reference_bits(manifest, words_rng)
        got = {
            "runner": draw_noise([ios.step], edge_rng, 0, 1 << 16),
            "runner per block": draw_noise(list(ios.layers), layer_rng, 0, 1 << 16),
            "script": script["draw_noise"](manifest, manifest["layers"], script_rng),
        }
        for who, bits in got.items():
            assert list(bits) == list(want), who
            for k in want:
                np.testing.assert_array_equal(bits[k], want[k], err_msg=f"{who} {k}")
    assert len(want) == len(manifest["feeds"]["random_bits"]["inputs"]) > 0
