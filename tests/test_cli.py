"""The `edge` command: JSON output, and bad input as one line with a non-zero exit."""

import json
import subprocess
import sys

import pytest

from edge.app.cli import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("edge ")


def test_train_json_and_probe(capsys, tmp_path):
    code, out, _ = run(
        capsys,
        "train",
        "--rule",
        "clapp++",
        "--epochs",
        "1",
        "--subset",
        "256",
        "--batch-size",
        "32",
        "--width",
        "0.25",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert code in (0, None)
    r = json.loads(out)
    assert r["rule"] == "clapp++" and r["epochs"] == 1 and len(r["weights_digest"]) == 64
    code, out, _ = run(capsys, "probe", str(tmp_path), "--json")
    assert json.loads(out)["probe_accuracy"] == pytest.approx(r["probe_accuracy"])


def test_rules_json(capsys):
    code, out, _ = run(capsys, "rules", "--json")
    rows = json.loads(out)["rules"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["clapp++"]["local"] and not by_name["bp-infonce"]["local"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--rule", "hebb"], "valid: "),
        (["train", "--data", "imagenet"], "unknown data set 'imagenet'"),
        (["train", "--device", "tpu"], "unknown --device 'tpu'"),
        (["train", "--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["train", "--lr", "inf"], "--lr must be a positive finite"),
        (["train", "--hp", "nosuchkey=1"], "valid: pool, predictor, rank"),
        (["train", "--resume", "--out", "/nonexistent/run"], "holds no checkpoint"),
        (["export", "--check", "/nonexistent/bundle"], "no bundle directory"),
        (["train", "--epochs", "0"], "--epochs must be positive"),
        (["train", "--batch-size", "-3"], "--batch-size must be positive"),
        (["train", "--subset", "0"], "--subset must be positive"),
        (["train", "--hp", "pool"], "key=value"),
        (["probe", "/nonexistent/run"], "no checkpoint"),
    ],
)
def test_bad_input_is_one_line(capsys, args, needle):
    code, _, err = run(capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_data_dir_is_named_and_never_replaced(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGE_DATA", raising=False)
    code, _, err = run(capsys, "train", "--data", "mnist", "--data-dir", str(tmp_path / "none"))
    assert code == 2 and str(tmp_path / "none") in err and err.count("\n") == 1
    code, _, err = run(capsys, "train", "--data", "mnist")
    assert code == 2 and "EDGE_DATA" in err and err.count("\n") == 1


def test_checkpoint_of_another_network(capsys, tmp_path):
    import torch

    from edge import checkpoint

    code, out, _ = run(
        capsys,
        "train",
        "--epochs",
        "1",
        "--subset",
        "64",
        "--batch-size",
        "32",
        "--width",
        "0.25",
        "--out",
        str(tmp_path),
        "--json",
    )
    params, state, meta = checkpoint.load(tmp_path)
    params["enc.0.0.w"] = torch.zeros(3, 3)
    checkpoint.save(tmp_path / "checkpoint.safetensors", params, state, meta)
    code, _, err = run(capsys, "probe", str(tmp_path))
    assert code == 2 and "does not match network" in err


def test_console_script_prints_no_traceback():
    p = subprocess.run(
        [sys.executable, "-m", "edge", "train", "--rule", "nope"], capture_output=True, text=True
    )
    assert p.returncode == 2 and p.stderr.startswith("error: unknown rule 'nope'")
    assert "Traceback" not in p.stderr


def test_alignment_and_plot(capsys, tmp_path):
    code, out, _ = run(capsys, "train", "--epochs", "1", "--subset", "64", "--batch-size", "32",
                       "--width", "0.25", "--alignment", "--out", str(tmp_path), "--json")
    r = json.loads(out)
    assert len(r["alignment"]) == 3 and all(-1 <= a <= 1 for a in r["alignment"])
    assert r["history"][0]["alignment"] == r["alignment"]
    code, out, _ = run(capsys, "plot", str(tmp_path), "--json")
    plots = json.loads(out)["plots"]
    assert {p.rsplit("/", 1)[1] for p in plots} == {"loss.png", "alignment.png"}
    code, _, err = run(capsys, "train", "--rule", "bp-infonce", "--alignment", "--out",
                       str(tmp_path / "bp"))
    assert code == 2 and "is global" in err


def test_integer_mode_defaults_to_its_own_learning_rate(capsys, tmp_path):
    """Integer mode's normalised SGD gets quant.engine's default, recorded in the config;
    an explicit --lr is kept as given."""
    from edge.rules import default_lr
    from quant.engine import INTEGER_LR_FACTOR

    args = ["train", "--epochs", "1", "--subset", "64", "--batch-size", "32", "--width", "0.25",
            "--quant", "int8-w16", "--mode", "integer", "--json"]
    code, out, _ = run(capsys, *args, "--out", str(tmp_path / "a"))
    assert code in (0, None)
    want = default_lr("clapp++") * INTEGER_LR_FACTOR
    assert json.loads(out)["optimizer"]["lr"] == pytest.approx(want)
    code, out, _ = run(capsys, *args, "--lr", "0.002", "--out", str(tmp_path / "b"))
    assert json.loads(out)["optimizer"]["lr"] == 0.002


def test_a_bad_flag_answers_before_torch_is_imported():
    code = ("import sys\nfrom edge.app.cli import main\n"
            "try:\n    main(['train', '--device', 'tpu'])\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.stdout.split() == ["2", "False"], p.stdout + p.stderr


def test_a_rerun_into_a_used_out_is_refused(capsys, tmp_path):
    args = ["train", "--epochs", "1", "--subset", "64", "--batch-size", "32", "--width", "0.25",
            "--out", str(tmp_path)]
    assert run(capsys, *args, "--json")[0] in (0, None)
    code, _, err = run(capsys, *args)
    assert code == 2 and "already holds a run" in err and err.count("\n") == 1
    assert run(capsys, *args, "--overwrite", "--json")[0] in (0, None)


INTEGER_RUN = ["train", "--quant", "int8-w16", "--mode", "integer", "--subset", "64",
               "--epochs", "1", "--batch-size", "16", "--width", "0.25", "--json"]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino",
                                     pytest.param("iree", marks=pytest.mark.slow)])
def test_integer_training_on_a_runtime_is_torch_bit_for_bit(capsys, tmp_path, runtime):
    """Every step of a full epoch in the exported integer graph: the same weights as torch."""
    pytest.importorskip({"iree": "iree.compiler", "openvino": "openvino"}.get(runtime, "onnx"))
    code, out, err = run(capsys, *INTEGER_RUN, "--runtime", "torch", "--out", str(tmp_path / "t"))
    assert code == 0, err
    want = json.loads(out)
    code, out, err = run(capsys, *INTEGER_RUN, "--runtime", runtime, "--out",
                         str(tmp_path / runtime))
    assert code == 0, err
    got = json.loads(out)
    assert got["runtime"]["name"] == runtime and got["runtime"]["graphs"] == 1
    assert got["weights_digest"] == want["weights_digest"]
    assert got["history"] == want["history"]


def test_integer_training_on_qnn_htp_is_torch_bit_for_bit(tmp_path):
    """The same on the QNN HTP simulator, every node on the HTP (a child process: the HTP
    keeps one precision per process)."""
    pytest.importorskip("onnxruntime_qnn")
    digests = {}
    for rt in ("torch", "qnn-htp"):
        done = subprocess.run([sys.executable, "-m", "edge", *INTEGER_RUN, "--runtime", rt,
                               "--out", str(tmp_path / rt)], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        r = json.loads(done.stdout)
        digests[rt] = r["weights_digest"]
    placed = r["runtime"]["placement"]
    assert placed and all(p["on_accelerator"] == p["nodes"] and not p["cpu_ops"] for p in placed)
    assert digests["qnn-htp"] == digests["torch"]
