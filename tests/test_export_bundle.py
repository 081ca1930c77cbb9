"""Bundles: written, checked, refused when tampered with, and trained by the standalone script
with nothing but numpy and onnxruntime."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import targets
from edge.app.commands.export import export_cmd
from edge.errors import EdgeError
from edge.step import local_step
from edge.app.train import TrainConfig, build, initial_params
from export.bundle import MANIFEST, SCRIPT, STATE_FILE, check_bundle, load_state, write_bundle
from export.manifest import PARAMS, STATE, Manifest

BATCH = 8


@pytest.fixture(scope="module")
def setup():
    cfg = TrainConfig(width=0.25, batch_size=BATCH)
    net, rule = build(cfg, (1, 8, 8))
    opt = cfg.optim()
    params = initial_params(cfg, net, rule)
    return net, rule, opt, params, opt.init_state(params)


@pytest.fixture(scope="module")
def bundle(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    manifest = write_bundle(out, *setup, BATCH, target=targets.load("host"), per_layer=True)
    return out, manifest


def tampered(bundle, tmp_path: Path) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(bundle[0], copy)
    return copy


def test_bundle_holds_every_file_and_checks(bundle):
    out, manifest = bundle
    for rel in ("train_step.onnx", "infer.onnx", STATE_FILE, SCRIPT, MANIFEST,
                "layers/layer_0.onnx", "layers/layer_2.onnx"):
        assert (out / rel).is_file(), rel
    assert check_bundle(out) == manifest
    assert Manifest.from_json((out / MANIFEST).read_text()) == manifest
    assert manifest.target["name"] == "host"
    assert set(manifest.files) == {"train_step.onnx", "infer.onnx", STATE_FILE, SCRIPT,
                                   *(f"layers/layer_{i}.onnx" for i in range(3))}
    assert set(load_state(out)) == set(manifest.step.bound_inputs)


def test_script_needs_no_torch_and_no_edge(bundle):
    tree = ast.parse((bundle[0] / SCRIPT).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "argparse", "json", "sys", "pathlib", "numpy",
                        "onnxruntime"}


def _run_script(out: Path, batches: Path, steps: int, result: Path, *extra: str):
    # torch, edge and export made unimportable: the script must live without them
    code = (
        "import sys, runpy\n"
        "for name in ('torch', 'edge', 'export', 'quant'): sys.modules[name] = None\n"
        f"sys.argv = ['{SCRIPT}', '--batches', {str(batches)!r}, '--steps', '{steps}',"
        f" '--out', {str(result)!r}, *{list(extra)!r}]\n"
        f"runpy.run_path({str(out / SCRIPT)!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("per_layer", [False, True], ids=["whole-step", "per-layer"])
def test_standalone_script_trains_like_torch(setup, bundle, tmp_path, per_layer):
    net, rule, opt, params, state = setup
    out, _ = bundle
    gen = torch.Generator().manual_seed(5)
    views = torch.randn(3, 2, BATCH, 1, 8, 8, generator=gen)
    np.save(tmp_path / "views.npy", views.numpy())
    steps = 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's spinning threads crawl on a busy 2-core machine
    lines = _run_script(out, tmp_path / "views.npy", steps, tmp_path / "trained.npz",
                        *(["--per-layer"] if per_layer else []))
    assert [line["step"] for line in lines[:-1]] == list(range(1, steps + 1))
    try:
        for s in range(steps):
            x1, x2 = views[s % 3]
            params, state, m = local_step(net, rule, opt, params, state, x1, x2)
            assert lines[s]["loss"] == pytest.approx(float(m["loss"]), rel=1e-5)
    finally:
        torch.set_num_threads(threads)
    with np.load(tmp_path / "trained.npz") as z:
        got = {k: torch.from_numpy(z[k]) for k in z.files}
    want = {PARAMS + k: v for k, v in params.items()} | {STATE + k: v for k, v in state.items()}
    assert set(got) == set(want)
    for k, v in want.items():
        assert float((got[k] - v).norm() / v.norm().clamp_min(1e-30)) < 1e-5, k


def test_check_refuses_a_corrupted_graph(bundle, tmp_path):
    copy = tampered(bundle, tmp_path)
    blob = bytearray((copy / "train_step.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (copy / "train_step.onnx").write_bytes(bytes(blob))
    with pytest.raises(EdgeError, match="train_step.onnx does not match its sha256"):
        check_bundle(copy)


def test_check_refuses_a_missing_file(bundle, tmp_path):
    copy = tampered(bundle, tmp_path)
    (copy / "layers" / "layer_1.onnx").unlink()
    with pytest.raises(EdgeError, match="layer_1.onnx is missing"):
        check_bundle(copy)


def test_check_refuses_a_manifest_that_disagrees_with_the_graph(bundle, tmp_path):
    copy = tampered(bundle, tmp_path)
    d = json.loads((copy / MANIFEST).read_text())
    x1 = next(t for t in d["step"]["inputs"] if t["name"] == "x1")
    x1["shape"][0] = BATCH * 2
    (copy / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(EdgeError, match=r"disagree on inputs x1: manifest says float32\[16"):
        check_bundle(copy)
    d["step"]["outputs"] = d["step"]["outputs"][:-1]  # drop layer_loss
    x1["shape"][0] = BATCH
    (copy / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(EdgeError, match="graph-only.*layer_loss"):
        check_bundle(copy)


def test_check_refuses_a_state_of_the_wrong_shape(bundle, tmp_path):
    copy = tampered(bundle, tmp_path)
    state = load_state(copy)
    state["params/enc.0.w"] = state["params/enc.0.w"][:1]
    np.savez(copy / STATE_FILE, **state)
    d = json.loads((copy / MANIFEST).read_text())
    from export.bundle import sha256

    d["files"][STATE_FILE] = sha256(copy / STATE_FILE)  # a consistent hash, a wrong tensor
    (copy / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(EdgeError, match=r"state.npz: params/enc.0.w is float32\[1, 1, 3, 3\]"):
        check_bundle(copy)


def test_check_refuses_what_is_no_bundle(tmp_path):
    with pytest.raises(EdgeError, match="no manifest.json"):
        check_bundle(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(EdgeError, match="not valid JSON"):
        check_bundle(tmp_path)


def test_write_refuses_a_foreign_directory(setup, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(EdgeError, match="not empty"):
        write_bundle(tmp_path, *setup, BATCH)


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command(name="export")(export_cmd)
    app.callback()(lambda: None)
    return app


def test_export_command_writes_and_checks(tmp_path):
    runner, out = CliRunner(), tmp_path / "cli"
    args = ["export", "-o", str(out), "--width", "0.25", "--batch-size", "4", "--net", "mlp",
            "--target", "hailo8", "--json"]
    res = runner.invoke(_cli(), args)
    assert res.exit_code == 0, res.output
    written = json.loads(res.output)
    assert written["target"] == "hailo8" and written["batch_size"] == 4
    assert "fp32" not in targets.load("hailo8").dtypes
    assert any("lists no fp32" in w for w in written["warnings"])
    res = runner.invoke(_cli(), ["export", "--check", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ok"] is True


def test_export_command_errors_are_edge_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(_cli(), ["export"])
    assert isinstance(res.exception, EdgeError) and "-o DIR" in str(res.exception)
    res = runner.invoke(_cli(), ["export", "-o", str(tmp_path / "x"), "--rule", "bp-infonce"])
    assert isinstance(res.exception, EdgeError) and "global backprop" in str(res.exception)
    res = runner.invoke(_cli(), ["export", "-o", str(tmp_path / "x"), "--target", "nope"])
    assert isinstance(res.exception, EdgeError) and "unknown target" in str(res.exception)


# ------------------------------------------------------------------ integer-mode bundles

INT_ARGS = ["--quant", "int8-w16", "--mode", "integer", "--data", "digits", "--width", "0.25",
            "--batch-size", str(BATCH)]


@pytest.fixture(scope="module")
def int_bundle(tmp_path_factory):
    """`edge export --quant int8-w16 --mode integer --per-layer` of the digits conv net."""
    out = tmp_path_factory.mktemp("int_bundle")
    res = CliRunner().invoke(_cli(), ["export", "-o", str(out), *INT_ARGS, "--per-layer",
                                      "--json"])
    assert res.exit_code == 0, res.output
    return out, json.loads(res.output)


def test_integer_bundle_checks_and_holds_integer_graphs(int_bundle):
    out, written = int_bundle
    assert written["quant"] == "int8-w16 integer"
    res = CliRunner().invoke(_cli(), ["export", "--check", str(out), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["ok"] is True, res.output
    manifest = check_bundle(out)
    assert manifest.quant["mode"] == "integer" and manifest.noise == {"low": 0, "high": 65536}
    assert manifest.step.input("x1").dtype == "int8" and len(manifest.layers) == 3
    state = load_state(out)
    assert state["params/enc.1.w"].dtype == np.int16 and state["params/enc.1.b"].dtype == np.int32
    # infer.onnx: the integer network on the stores the step trains
    assert manifest.infer.input("x").dtype == "int8"
    assert {t.name for t in manifest.infer.inputs} - {"x"} == {
        n for n in manifest.step.bound_inputs if n.startswith("params/enc.")}
    assert {t.dtype for t in manifest.infer.outputs} == {"uint8"}


def _script_noise(out: Path, manifest: dict, graphs: list, rng) -> dict:
    """The standalone script's own noise draw (the script imports neither torch nor edge)."""
    import runpy

    script = runpy.run_path(str(out / SCRIPT), run_name="bundle_script")
    return script["draw_noise"](manifest, graphs, rng)


def test_standalone_script_trains_an_integer_bundle_bit_identically(int_bundle, tmp_path):
    """Float views in, quantized by the script; whole step and per-layer chain end with the
    same stores as the torch integer step fed the script's random bits (digest equal)."""
    from edge import checkpoint, rules
    from edge.nets import NetSpec
    from quant.calibrate import quantize_input
    from quant.integer import integer_forward, integer_step
    from quant.plan import QuantPlan

    out, _ = int_bundle
    d = json.loads((out / MANIFEST).read_text())
    net, plan = NetSpec.from_dict(d["net"]), QuantPlan.from_dict(d["quant"]["plan"])
    rule = rules.get(d["rule"], **d["hparams"])
    rule.check(net)
    gen = torch.Generator().manual_seed(5)
    views = torch.randn(3, 2, BATCH, 1, 8, 8, generator=gen)
    np.save(tmp_path / "views.npy", views.numpy())
    steps = 4
    runs = {}
    for mode in ("whole", "per-layer"):
        lines = _run_script(out, tmp_path / "views.npy", steps, tmp_path / f"{mode}.npz",
                            *(["--per-layer"] if mode == "per-layer" else []))
        with np.load(tmp_path / f"{mode}.npz") as z:
            runs[mode] = ({k: z[k] for k in z.files}, lines)
    q = {k[len(PARAMS):]: torch.from_numpy(v) for k, v in load_state(out).items()
         if k.startswith(PARAMS)}
    rng = np.random.default_rng(0)
    for s in range(steps):
        x1, x2 = (quantize_input(v, plan.f_in) for v in views[s % 3])
        bits = _script_noise(out, d, [d["step"]], rng)
        noise = {k.split("/", 1)[1]: torch.from_numpy(v) for k, v in bits.items()}
        q, m = integer_step(net, rule, plan, q, x1, x2, noise)
        for mode in runs:
            assert runs[mode][1][s]["layer_loss"] == m["layer_loss"].tolist(), (mode, s)
    for mode, (trained, _) in runs.items():
        stores = {k: torch.from_numpy(trained[PARAMS + k]) for k in q}
        assert checkpoint.weights_digest(stores) == checkpoint.weights_digest(q), mode
        assert float(trained[STATE + "step"]) == steps
    # the bundle's infer.onnx on the trained stores is the torch integer forward
    from export.runner import Runner

    x = quantize_input(views[0, 0], plan.f_in)
    outs = Runner(out / "infer.onnx").run(
        {"x": x.numpy(), **{PARAMS + k: v.numpy() for k, v in q.items() if k.startswith("enc.")}})
    for i, y in enumerate(integer_forward(net, plan, q, x)):
        np.testing.assert_array_equal(outs[f"y{i}"], y.numpy())


@pytest.mark.parametrize("args, why", [
    (["--quant", "int8", "--mode", "qat"], "--mode qat trains fp32 latent weights"),
    (["--quant", "int4"], "unknown --quant 'int4'"),
    (["--quant", "int8-w16", "--mode", "float"], "unknown --mode 'float'"),
    (["--quant", "int8-w16", "--rule", "ff"], "rule 'ff' has no integer form"),
])
def test_integer_export_bad_input_is_one_line_edge_error(tmp_path, args, why):
    res = CliRunner().invoke(_cli(), ["export", "-o", str(tmp_path / "x"), "--width", "0.25",
                                      "--batch-size", "4", *args])
    assert isinstance(res.exception, EdgeError), res.output
    assert why in str(res.exception) and "\n" not in str(res.exception)
