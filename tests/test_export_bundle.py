"""Bundles: what write_bundle writes, what the manifest says (edge-bundle/2), the standalone
script's imports and bad input, and `edge export` writing and checking a bundle.

The refusals of check_bundle are tests/test_bundle_refusals.py; a driver written from the
manifest alone, against the script and torch, is tests/test_bundle_driver.py.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from net_setup import build, int_state

from edge.app.cli import main
from edge.errors import EdgeError
from edge.nets import encode, fold_batchnorm, preset
from edge.optim import OptimConfig
from edge.step import init_state
from export.bundle import (
    MANIFEST,
    RECORD_KEY,
    SCRIPT,
    STATE_FILE,
    check_bundle,
    load_state,
    summary,
    write_bundle,
)
from export.manifest import FORMAT, NOISE, PARAMS, STATE, Manifest
from export.runner import Runner
from export.step import fp32_program, integer_program
from quant.calibrate import make_plan
from quant.integer import IntegerUpdate, integer_forward, quantize_input
from quant.plan import QuantPlan

BATCH = 4
NORM = ((0.5,), (0.25,))


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory):
    net, rule, params = build()
    opt = OptimConfig("adamw", lr=1e-3)
    out = tmp_path_factory.mktemp("fp32")
    manifest = write_bundle(out, net, rule, fp32_program(net, rule, opt), params,
                            init_state(net, rule, opt, params), BATCH, target={"name": "host"},
                            per_layer=True, normalisation=NORM)
    return out, manifest, opt, params


@pytest.fixture(scope="module")
def int_bundle(tmp_path_factory):
    net, rule, params = build()
    gen = torch.Generator().manual_seed(1)
    calib = [tuple(torch.randn(2, BATCH, 1, 8, 8, generator=gen)) for _ in range(2)]
    plan, stores = make_plan(net, rule, params, calib, "int8-w16", 1e-3)
    out = tmp_path_factory.mktemp("int")
    manifest = write_bundle(out, net, rule, integer_program(net, rule, plan, stores), stores,
                            int_state(net, rule, plan, stores), BATCH,
                            per_layer=True, normalisation=NORM)
    return out, manifest, plan, stores


@pytest.fixture(params=["fp32", "int"])
def any_bundle(request, fp32_bundle, int_bundle):
    return fp32_bundle if request.param == "fp32" else int_bundle


def test_bundle_holds_every_file_and_checks(fp32_bundle):
    out, manifest, _, params = fp32_bundle
    graphs = ["train_step.onnx", *(f"layers/layer_{i}.onnx" for i in range(3)), "infer.onnx"]
    for rel in (*graphs, STATE_FILE, SCRIPT, MANIFEST):
        assert (out / rel).is_file(), rel
    assert check_bundle(out) == manifest
    assert Manifest.from_json((out / MANIFEST).read_text()) == manifest
    assert set(manifest.files) == {*graphs, STATE_FILE, SCRIPT}
    assert manifest.format == FORMAT == "edge-bundle/2"
    state = load_state(out)
    assert set(state) == set(manifest.step.bound_inputs)
    assert {PARAMS + k for k in params} | {STATE + "step"} <= set(state)
    s = summary(manifest)
    assert (s["format"], s["optimizer"], s["batch_size"], s["target"]) == (
        FORMAT, "adamw", BATCH, "host")


def test_manifest_digest_follows_the_documented_rule(any_bundle):
    """sha256 of manifest.json with the digest's 64 hex digits replaced by zeros; last key."""
    out = any_bundle[0]
    text = (out / MANIFEST).read_text()
    found = re.findall(r'"manifest_sha256": "([0-9a-f]{64})"', text)
    assert len(found) == 1
    blanked = text.replace(found[0], "0" * 64)
    assert hashlib.sha256(blanked.encode()).hexdigest() == found[0]
    assert list(json.loads(text))[-1] == "manifest_sha256"


def test_every_input_is_bound_or_defined_by_feeds(any_bundle):
    out, manifest = any_bundle[:2]
    d = json.loads((out / MANIFEST).read_text())
    feeds = d["feeds"]
    bits = feeds["random_bits"]
    noise = bits["inputs"] if bits else []
    for i, io in enumerate([d["step"], *d["layers"]]):
        bound = {b["input"] for b in io["bindings"]}
        if i >= 1:  # state/step: bound by the last block graph, read by every one
            bound.add("state/step")
        views = feeds["views"]["inputs"] if i <= 1 else [feeds["chain"]["input"]]
        for t in io["inputs"]:
            n = t["name"]
            assert (n in bound) + (n in views) + (n in noise) == 1, (io["file"], n)
            if n in views and i <= 1:
                assert [t["dtype"], t["shape"]] == [feeds["views"]["dtype"],
                                                     feeds["views"]["shape"]]
    assert feeds["views"]["shape"][0] == d["batch_size"] == BATCH
    assert feeds["views"]["normalisation"]["mean"] == [0.5]
    assert feeds["views"]["normalisation"]["std"] == [0.25]
    chain = feeds["chain"]
    assert (chain["input"], chain["output"], chain["blocks"], chain["streams"]) == ("x", "y", 3, 2)
    y0 = next(t for t in d["layers"][0]["outputs"] if t["name"] == "y")
    assert y0["shape"][0] == chain["streams"] * BATCH


def test_fp32_manifest_has_no_random_bits_and_its_real_optimizer(fp32_bundle):
    out, manifest, opt, _ = fp32_bundle
    assert manifest.optimizer == json.loads(json.dumps(vars(opt)))
    assert manifest.quant is None and manifest.noise is None
    assert manifest.feeds["random_bits"] is None
    assert manifest.feeds["views"]["dtype"] == "float32"
    assert manifest.feeds["views"]["quantization"] is None
    assert not any(t.name.startswith(NOISE) for io in manifest.graphs() for t in io.inputs)


def test_integer_manifest_states_the_step_it_runs(int_bundle):
    """The optimizer is the plan's power-of-two SGD, not the float optimizer it came from;
    the random bits and the int8 views are defined in full."""
    out, manifest, plan, stores = int_bundle
    assert manifest.optimizer == IntegerUpdate(plan).describe()
    assert manifest.optimizer["name"] == "integer-sgd" and "betas" not in manifest.optimizer
    assert manifest.optimizer["lr_shift"] == {k: p.lr_shift for k, p in plan.params.items()}
    assert QuantPlan.from_dict(manifest.quant["plan"]) == plan
    q = manifest.feeds["views"]["quantization"]
    assert (q["scale_exponent"], q["rounding"], q["clip"], q["dtype"]) == (
        plan.f_in, "half_to_even", [-128, 127], "int8")
    bits = manifest.feeds["random_bits"]
    noise = sorted(t.name for t in manifest.step.inputs if t.name.startswith(NOISE))
    assert bits["inputs"] == noise
    assert {NOISE + k for k in stores} <= set(noise)
    assert any(n.startswith(NOISE + "err.") for n in noise)  # error roundings listed too
    assert (bits["dtype"], bits["low"], bits["high"], bits["fresh"]) == ("int32", 0, 65536,
                                                                          True)
    assert sorted(bits["purpose"]) == noise
    assert "update of params/enc.0.0.w" in bits["purpose"]["noise/enc.0.0.w"]
    assert bits["reference"]["generator"].startswith("numpy.random.default_rng(seed)")
    assert manifest.noise == {"low": 0, "high": 65536}  # v1's field, kept


def test_every_training_graph_records_the_step_it_runs(any_bundle):
    out, manifest = any_bundle[:2]
    d = manifest.to_dict()
    for io in (manifest.step, *manifest.layers):
        meta = {p.key: p.value for p in onnx.load(str(out / io.file)).metadata_props}
        record = json.loads(meta[RECORD_KEY])
        assert record["graph"] == io.file
        for key in ("rule", "hparams", "optimizer", "net", "batch_size", "quant", "feeds"):
            assert record[key] == d[key], (io.file, key)


def test_integer_infer_graph_runs_the_integer_network_on_the_stores(int_bundle):
    out, manifest, plan, stores = int_bundle
    net = preset("digits", (1, 8, 8), 0.25)
    net, _ = fold_batchnorm(net, net.init_params(torch.Generator().manual_seed(0)))
    x = quantize_input(torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)),
                       plan.f_in)
    state = load_state(out)
    feeds = {"x": x.numpy(), **{t.name: state[t.name] for t in manifest.infer.inputs[1:]}}
    outs = Runner(out / "infer.onnx").run(feeds)
    for i, y in enumerate(integer_forward(net, plan, stores, x)):
        np.testing.assert_array_equal(outs[f"y{i}"], y.t.numpy())


def test_fp32_infer_graph_is_the_encoder(fp32_bundle):
    out, manifest, _, params = fp32_bundle
    net = build()[0]
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    state = load_state(out)
    outs = Runner(out / "infer.onnx").run(
        {"x": x, **{t.name: state[t.name] for t in manifest.infer.inputs[1:]}})
    for i, want in enumerate(encode(net, params, x)):
        np.testing.assert_allclose(outs[f"y{i}"], want.numpy(), rtol=1e-5, atol=1e-6)


def test_script_needs_no_torch_and_no_edge(fp32_bundle):
    tree = ast.parse((fp32_bundle[0] / SCRIPT).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "argparse", "json", "sys", "pathlib", "numpy",
                        "onnxruntime"}


def test_script_refuses_views_of_the_wrong_shape(fp32_bundle, tmp_path):
    out = fp32_bundle[0]
    np.save(tmp_path / "v.npy", np.zeros((2, 2, BATCH + 1, 1, 8, 8), np.float32))
    proc = subprocess.run([sys.executable, str(out / SCRIPT), "--batches",
                           str(tmp_path / "v.npy")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert f"want float32[K, 2, {BATCH}, 1, 8, 8]" in proc.stderr


def test_write_refuses_a_foreign_directory_and_bad_normalisation(tmp_path):
    net, rule, params = build()
    opt = OptimConfig("sgd")
    program, state = fp32_program(net, rule, opt), init_state(net, rule, opt, params)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(EdgeError, match="not empty and holds no bundle"):
        write_bundle(tmp_path, net, rule, program, params, state, BATCH)
    with pytest.raises(EdgeError, match="normalisation needs 1 means and positive stds"):
        write_bundle(tmp_path / "b", net, rule, program, params, state, BATCH,
                     normalisation=((0.5, 0.5), (0.2, 0.2)))


def test_rewriting_a_bundle_drops_its_stale_block_graphs(tmp_path):
    net, rule, params = build()
    opt = OptimConfig("sgd")
    program, state = fp32_program(net, rule, opt), init_state(net, rule, opt, params)
    write_bundle(tmp_path, net, rule, program, params, state, BATCH, per_layer=True)
    manifest = write_bundle(tmp_path, net, rule, program, params, state, BATCH)
    assert not (tmp_path / "layers").exists() and manifest.layers == ()
    assert manifest.feeds["chain"] is None
    assert check_bundle(tmp_path) == manifest


def _cli(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_export_command_writes_and_checks(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["export", "-o", str(out), "--net", "mlp", "--width", "0.25", "--batch-size",
            str(BATCH), "--optimizer", "sgd", "--json"]
    assert _cli(args) == 0, capsys.readouterr().err
    written = json.loads(capsys.readouterr().out)
    assert written["batch_size"] == BATCH and written["format"] == FORMAT
    assert _cli(["export", "--check", str(out), "--json"]) == 0
    checked = json.loads(capsys.readouterr().out)
    assert checked["ok"] is True and checked["optimizer"] == "sgd"
    assert _cli(["export", "--check", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err == f"error: no bundle directory at {tmp_path / 'nothing'}\n"


def test_standalone_script_rejects_an_older_format(fp32_bundle, tmp_path):
    import runpy

    script = runpy.run_path(str(fp32_bundle[0] / SCRIPT), run_name="bundle_script")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "edge-bundle/1"}))
    np.save(tmp_path / "v.npy", np.zeros((1, 2, BATCH, 1, 8, 8), np.float32))
    assert script["main"](["--bundle", str(tmp_path), "--batches",
                           str(tmp_path / "v.npy")]) == 2
    assert Path(tmp_path / "manifest.json").is_file()
