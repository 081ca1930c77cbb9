"""check_bundle refuses every incomplete, inconsistent or edited bundle with one line.

Each case copies a good bundle (fp32 AdamW or integer, both with per-block graphs), breaks
one thing and expects `check_bundle` to name it. Manifest edits are made twice where it
matters: as a user would (the manifest's own digest then fails), and with the digest
recomputed by the documented rule (`redigest`, written here from the manifest docstring), so
the semantic check itself is what refuses. `edge export --check` and `edge simulate
--bundle` exit 2 with `error: <one line>`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from net_setup import build, int_state

from edge.app.cli import main
from edge.errors import EdgeError
from edge.optim import OptimConfig
from edge.step import init_state
from export.bundle import MANIFEST, STATE_FILE, check_bundle, write_bundle
from export.step import fp32_program, integer_program
from quant.calibrate import make_plan

BATCH = 4
ZEROS = "0" * 64


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory) -> Path:
    net, rule, params = build()
    opt = OptimConfig("adamw", lr=1e-3)
    out = tmp_path_factory.mktemp("fp32")
    write_bundle(out, net, rule, fp32_program(net, rule, opt), params,
                 init_state(net, rule, opt, params), BATCH, per_layer=True,
                 normalisation=((0.5,), (0.25,)))
    return out


@pytest.fixture(scope="module")
def int_bundle(tmp_path_factory) -> Path:
    net, rule, params = build()
    gen = torch.Generator().manual_seed(1)
    calib = [tuple(torch.randn(2, BATCH, 1, 8, 8, generator=gen)) for _ in range(2)]
    plan, stores = make_plan(net, rule, params, calib, "int8-w16", 1e-3)
    out = tmp_path_factory.mktemp("int")
    write_bundle(out, net, rule, integer_program(net, rule, plan, stores), stores,
                 int_state(net, rule, plan, stores), BATCH, per_layer=True)
    return out


def redigest(d: dict) -> str:
    """The manifest text with its manifest_sha256 recomputed: sha256 of the text whose 64
    digest hex digits are zeros (the rule of export.manifest's docstring)."""
    d = {k: v for k, v in d.items() if k != "manifest_sha256"}
    text = json.dumps({**d, "manifest_sha256": ZEROS}, indent=2)
    return text.replace(ZEROS, hashlib.sha256(text.encode()).hexdigest())


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    return copy


def edited(bundle: Path, tmp_path: Path, edit: Callable[[dict], object],
           digest: bool = True) -> Path:
    copy = copy_of(bundle, tmp_path)
    d = json.loads((copy / MANIFEST).read_text())
    edit(d)
    (copy / MANIFEST).write_text(redigest(d) if digest else json.dumps(d, indent=2))
    return copy


def refused(copy: Path, pattern: str) -> str:
    with pytest.raises(EdgeError) as err:
        check_bundle(copy)
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert re.search(pattern, msg), msg
    return msg


def binding(d: dict, output: str, graph: str = "step") -> dict:
    io = d["step"] if graph == "step" else d["layers"][int(graph)]
    return next(b for b in io["bindings"] if b["output"] == output)


def test_good_bundles_pass(fp32_bundle, int_bundle):
    assert check_bundle(fp32_bundle).optimizer["name"] == "adamw"
    assert check_bundle(int_bundle).optimizer["name"] == "integer-sgd"


# ------------------------------------------------------------------ bindings


def test_removed_binding(fp32_bundle, tmp_path):
    def drop(d):
        d["step"]["bindings"] = [b for b in d["step"]["bindings"]
                                 if b["output"] != "new_params/enc.1.0.w"]

    refused(edited(fp32_bundle, tmp_path, drop),
            r"^train_step.onnx: output new_params/enc.1.0.w is bound to no input")


def test_removed_binding_of_a_block_graph(int_bundle, tmp_path):
    def drop(d):
        d["layers"][2]["bindings"] = d["layers"][2]["bindings"][1:]

    refused(edited(int_bundle, tmp_path, drop), r"^layers/layer_2.onnx: output \S+ is bound "
                                                "to no input")


def test_removed_binding_and_output_leave_the_input_unfed(fp32_bundle, tmp_path):
    """A bound output deleted from graph and manifest alike: the graph check names the
    difference, and even a manifest without it would leave params/* unfed."""
    def drop(d):
        d["step"]["bindings"] = [b for b in d["step"]["bindings"]
                                 if b["output"] != "new_state/v.enc.0.0.w"]
        d["step"]["outputs"] = [t for t in d["step"]["outputs"]
                                if t["name"] != "new_state/v.enc.0.0.w"]

    refused(edited(fp32_bundle, tmp_path, drop),
            r"train_step.onnx and the manifest disagree on outputs.*new_state/v.enc.0.0.w")


def test_duplicated_binding(fp32_bundle, tmp_path):
    def dup(d):
        d["step"]["bindings"].append(dict(d["step"]["bindings"][0]))

    refused(edited(fp32_bundle, tmp_path, dup), r"^train_step.onnx: output \S+ is bound twice")


def test_two_outputs_bound_to_one_input(fp32_bundle, tmp_path):
    def both(d):
        binding(d, "new_state/v.enc.0.0.w")["input"] = "state/m.enc.0.0.w"

    refused(edited(fp32_bundle, tmp_path, both),
            r"^train_step.onnx: input state/m.enc.0.0.w is bound twice")


def test_binding_to_a_wrong_shaped_input(fp32_bundle, tmp_path):
    def wrong(d):
        binding(d, "new_params/enc.0.0.w")["input"] = "params/enc.0.0.b"

    refused(edited(fp32_bundle, tmp_path, wrong),
            r"binding new_params/enc.0.0.w -> params/enc.0.0.b changes shape or dtype")


@pytest.mark.parametrize("graph", ["step", "0"])
def test_swapped_adamw_moments(fp32_bundle, tmp_path, graph):
    """m and v have the same shape: only the names tell them apart."""
    def swap(d):
        binding(d, "new_state/m.enc.0.0.w", graph)["input"] = "state/v.enc.0.0.w"
        binding(d, "new_state/v.enc.0.0.w", graph)["input"] = "state/m.enc.0.0.w"

    file = "train_step.onnx" if graph == "step" else "layers/layer_0.onnx"
    refused(edited(fp32_bundle, tmp_path, swap),
            rf"^{file}: binding new_state/m.enc.0.0.w -> state/v.enc.0.0.w: an output must "
            "feed the input of its own name")


def test_a_binding_moved_to_another_block_graph(int_bundle, tmp_path):
    def move(d):
        b = binding(d, "new_params/enc.0.0.w", "0")
        d["layers"][0]["bindings"].remove(b)
        d["layers"][1]["bindings"].append(b)

    refused(edited(int_bundle, tmp_path, move), r"binding new_params/enc.0.0.w -> "
                                                "params/enc.0.0.w names an unknown tensor")


# ------------------------------------------------------------------ manifest edits


def test_edited_batch_size(fp32_bundle, tmp_path):
    def halve(d):
        d["batch_size"] = BATCH // 2

    refused(edited(fp32_bundle, tmp_path, halve, digest=False),
            r"manifest.json does not match its manifest_sha256")
    shutil.rmtree(tmp_path / "b")
    refused(edited(fp32_bundle, tmp_path, halve),
            rf"manifest batch_size is {BATCH // 2}, the graphs take x1, x2 of {BATCH} rows")


def test_edited_fp32_optimizer(fp32_bundle, tmp_path):
    def lr(d):
        d["optimizer"]["lr"] = 1e-4

    refused(edited(fp32_bundle, tmp_path, lr, digest=False), r"does not match its manifest_sha")
    shutil.rmtree(tmp_path / "b")
    refused(edited(fp32_bundle, tmp_path, lr),
            r"does not describe the step train_step.onnx was exported as: manifest.optimizer.lr"
            r" 0.0001 vs 0.001")


def test_fp32_optimizer_must_match_the_state_inputs(fp32_bundle, tmp_path):
    def sgd(d):
        d["optimizer"]["name"] = "sgd"

    refused(edited(fp32_bundle, tmp_path, sgd),
            r"^optimizer sgd keeps no state/v.enc.0.0.b, yet the step takes it")


def test_integer_manifest_claiming_adamw(int_bundle, tmp_path):
    def adamw(d):
        d["optimizer"] = {"name": "adamw", "lr": 1e-4, "momentum": 0.9, "weight_decay": 0.0,
                          "betas": [0.9, 0.999], "eps": 1e-8}

    refused(edited(int_bundle, tmp_path, adamw),
            r"^manifest optimizer 'adamw' is not the integer step's update 'integer-sgd'")


def test_integer_manifest_with_another_lr_shift(int_bundle, tmp_path):
    def shift(d):
        d["optimizer"]["lr_shift"]["enc.0.0.w"] += 1
        d["quant"]["plan"]["params"]["enc.0.0.w"]["lr_shift"] += 1  # consistent, still wrong

    refused(edited(int_bundle, tmp_path, shift),
            r"does not describe the step train_step.onnx was exported as: "
            r"manifest.optimizer.lr_shift.enc.0.0.w")


def test_integer_views_scale_exponent(int_bundle, tmp_path):
    def scale(d):
        d["feeds"]["views"]["quantization"]["scale_exponent"] += 1

    refused(edited(int_bundle, tmp_path, scale),
            r"^feeds.views.quantization.scale_exponent is \d+, the step takes \d+")


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d["feeds"]["random_bits"]["inputs"].pop(), r"feeds.random_bits.inputs and the "
     r"graphs differ on noise/rule\.2\.(B|V)$"),  # the last input: the top predictor's
    (lambda d: d["feeds"]["random_bits"].update(high=256), r"feeds.random_bits.high is 256"),
    (lambda d: d["feeds"]["random_bits"].update(fresh=False), r"feeds.random_bits.fresh is "
     "False"),
    (lambda d: d["feeds"].update(random_bits=None), r"feeds.random_bits is null"),
    (lambda d: d["feeds"]["views"]["quantization"].update(rounding="floor"),
     r"quantization.rounding is 'floor'"),
    (lambda d: d.update(noise={"low": 0, "high": 2}), r"manifest noise is"),
    (lambda d: d["feeds"]["chain"].update(streams=3), r"feeds.chain.streams is 3"),
], ids=["bits-input-missing", "bits-range", "bits-not-fresh", "bits-null", "rounding",
        "legacy-noise", "chain"])
def test_edited_feeds(int_bundle, tmp_path, edit, pattern):
    refused(edited(int_bundle, tmp_path, edit), pattern)


def test_fp32_normalisation_must_fit_the_channels(fp32_bundle, tmp_path):
    def three(d):
        d["feeds"]["views"]["normalisation"]["mean"] = [0.1, 0.2, 0.3]

    refused(edited(fp32_bundle, tmp_path, three),
            r"feeds.views.normalisation needs 1 means and 1 positive stds")


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("rule"), "'rule'"),
    (lambda d: d.pop("feeds"), "'feeds'"),
    (lambda d: d["step"]["inputs"][0].pop("dtype"), "'step.inputs[0].dtype'"),
    (lambda d: d["layers"][1]["bindings"][0].pop("input"), "'layers[1].bindings[0].input'"),
    (lambda d: d["feeds"]["random_bits"].pop("inputs"), "'feeds.random_bits.inputs'"),
    (lambda d: d["feeds"]["views"].pop("quantization"), "'feeds.views.quantization'"),
    (lambda d: d["quant"]["plan"].pop("f_in"), "'quant.plan.f_in'"),
], ids=["rule", "feeds", "dtype", "binding", "bits", "quantization", "plan"])
def test_partial_manifest_names_the_missing_field(int_bundle, tmp_path, edit, field):
    refused(edited(int_bundle, tmp_path, edit), rf"^manifest lacks the field {re.escape(field)}")


def test_minimal_manifests(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "edge-bundle/2"}))
    refused(tmp_path, r"^manifest lacks the field 'rule'$")
    (tmp_path / MANIFEST).write_text(json.dumps({"rule": "clapp++"}))
    refused(tmp_path, r"^manifest lacks the field 'format'$")
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "edge-bundle/1"}))
    refused(tmp_path, r"^manifest format 'edge-bundle/1' is not 'edge-bundle/2'; re-export")
    (tmp_path / MANIFEST).write_text("[1, 2]")
    refused(tmp_path, r"^manifest is not a JSON object$")
    (tmp_path / MANIFEST).write_text("{not json")
    refused(tmp_path, r"^manifest is not valid JSON")


def test_manifest_without_its_digest(fp32_bundle, tmp_path):
    copy = copy_of(fp32_bundle, tmp_path)
    d = json.loads((copy / MANIFEST).read_text())
    del d["manifest_sha256"]
    (copy / MANIFEST).write_text(json.dumps(d))
    refused(copy, r"^manifest lacks the field 'manifest_sha256'$")
    d["manifest_sha256"] = "abc"
    (copy / MANIFEST).write_text(json.dumps(d))
    refused(copy, r"manifest_sha256' must be 64 lowercase hex digits")


def test_mistyped_field(fp32_bundle, tmp_path):
    refused(edited(fp32_bundle, tmp_path, lambda d: d.update(batch_size="4")),
            r"^manifest field 'batch_size' must be an integer, got str$")


# ------------------------------------------------------------------ files


def test_tampered_graph(fp32_bundle, tmp_path):
    copy = copy_of(fp32_bundle, tmp_path)
    blob = bytearray((copy / "train_step.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (copy / "train_step.onnx").write_bytes(bytes(blob))
    refused(copy, r"^bundle file train_step.onnx does not match its sha256")


def test_replaced_graph_with_a_consistent_hash(fp32_bundle, tmp_path):
    """A graph exported for another optimizer, hashes and digest updated: its own record
    says what it runs."""
    copy = copy_of(fp32_bundle, tmp_path)
    path = copy / "layers" / "layer_1.onnx"
    model = onnx.load(str(path))
    for p in model.metadata_props:
        if p.key == "edge.step":
            record = json.loads(p.value)
            record["optimizer"]["betas"] = [0.8, 0.99]
            p.value = json.dumps(record)
    onnx.save(model, path)
    d = json.loads((copy / MANIFEST).read_text())
    d["files"]["layers/layer_1.onnx"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (copy / MANIFEST).write_text(redigest(d))
    refused(copy, r"does not describe the step layers/layer_1.onnx was exported as: "
                  r"manifest.optimizer.betas\[0\] 0.9 vs 0.8")


def test_missing_graph(int_bundle, tmp_path):
    copy = copy_of(int_bundle, tmp_path)
    (copy / "layers" / "layer_1.onnx").unlink()
    refused(copy, r"^bundle file layers/layer_1.onnx is missing")


def test_state_with_an_extra_array(fp32_bundle, tmp_path):
    copy = copy_of(fp32_bundle, tmp_path)
    with np.load(copy / STATE_FILE) as z:
        state = {k: z[k] for k in z.files}
    np.savez(copy / STATE_FILE, **state, **{"params/ghost": np.zeros(3, np.float32)})
    d = json.loads((copy / MANIFEST).read_text())
    d["files"][STATE_FILE] = hashlib.sha256((copy / STATE_FILE).read_bytes()).hexdigest()
    (copy / MANIFEST).write_text(redigest(d))
    refused(copy, r"^state.npz holds params/ghost, which no graph input is bound to$")


# ------------------------------------------------------------------ the CLI


def _swap_moments(d: dict) -> None:
    binding(d, "new_state/m.enc.0.0.w")["input"] = "state/v.enc.0.0.w"
    binding(d, "new_state/v.enc.0.0.w")["input"] = "state/m.enc.0.0.w"


@pytest.mark.parametrize("edit, digest, message", [
    (_swap_moments, True, "error: train_step.onnx: binding new_state/m.enc.0.0.w -> "
                          "state/v.enc.0.0.w: an output must feed the input of its own name"),
    (lambda d: d.update(batch_size=BATCH // 2), False,
     "error: manifest.json does not match its manifest_sha256"),
    (lambda d: d.pop("optimizer"), True, "error: manifest lacks the field 'optimizer'"),
], ids=["swapped", "batch-size", "partial"])
def test_cli_refusal_is_exit_2_and_one_line(fp32_bundle, tmp_path, capsys, edit, digest,
                                            message):
    copy = edited(fp32_bundle, tmp_path, edit, digest=digest)
    for argv in (["export", "--check", str(copy)],
                 ["simulate", "--bundle", str(copy), "--target", "host"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(message), err
        assert err.count("\n") == 1, err
