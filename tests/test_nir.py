"""NIR export (export.nir): the graph reads back with nir.read, holds only node types NIR
readers share, and its rate-coded IF run approximates the ANN's normalised activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

nir = pytest.importorskip("nir")

from edge.errors import EdgeError  # noqa: E402
from edge.nets import NetSpec, preset  # noqa: E402
from export.nir import (  # noqa: E402
    ann_accuracy,
    ann_features,
    output_scale,
    simulate,
    spiking_accuracies,
    spiking_predicts,
    to_nir,
    write_nir,
)

READERS = {"Input", "Output", "Conv2d", "Affine", "Linear", "IF", "LIF", "CubaLIF", "SumPool2d",
           "Flatten"}
SPEC = {"name": "tiny", "in_shape": [1, 12, 12], "blocks": [
    {"layers": [{"op": "conv", "cout": 4, "k": 3, "padding": 1}, {"op": "relu"},
                {"op": "avgpool", "k": 2}]},
    {"layers": [{"op": "conv", "cout": 8, "k": 3, "padding": 1, "groups": 2}, {"op": "bn"},
                {"op": "relu"}, {"op": "avgpool", "k": 2}, {"op": "flatten"}]},
]}


def _net(spec=SPEC, seed=0):
    net = NetSpec.from_dict(spec)
    params = net.init_params(torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    for k in params:  # some bias and a non-trivial BatchNorm, so folding matters
        if k.endswith(".b"):
            params[k] = 0.1 + 0.1 * torch.rand(params[k].shape, generator=gen)
        if k.endswith((".gamma", ".var")):
            params[k] = 0.5 + torch.rand(params[k].shape, generator=gen)
        if k.endswith((".beta", ".mean")):
            params[k] = 0.1 * torch.randn(params[k].shape, generator=gen)
    return net, params


@pytest.fixture(scope="module")
def tiny():
    net, params = _net()
    x = torch.randn(48, 1, 12, 12, generator=torch.Generator().manual_seed(7))
    return net, params, x


def _ann_preacts(params, x):
    """The tiny net's two pre-activations, written out with torch ops (BN folded by hand)."""
    z1 = F.conv2d(x, params["enc.0.0.w"], params["enc.0.0.b"], padding=1)
    a1 = F.avg_pool2d(F.relu(z1), 2)
    z2 = F.conv2d(a1, params["enc.1.0.w"], params["enc.1.0.b"], padding=1, groups=2)
    s = params["enc.1.1.gamma"] / torch.sqrt(params["enc.1.1.var"] + 1e-5)
    z2 = (z2 - params["enc.1.1.mean"][:, None, None]) * s[:, None, None] \
        + params["enc.1.1.beta"][:, None, None]
    return z1, z2


def _lams(graph):
    return {k: float(n.metadata["edge_lambda"]) for k, n in graph.nodes.items()
            if isinstance(n, nir.IF)}


def test_export_reads_back_with_reader_node_types(tiny, tmp_path):
    net, params, x = tiny
    write_nir(tmp_path / "tiny.nir", net, params, x)
    g = nir.read(str(tmp_path / "tiny.nir"))
    kinds = {k: type(n).__name__ for k, n in g.nodes.items()}
    assert set(kinds.values()) <= READERS
    assert [kinds[a] for a, _ in g.edges] == ["Input", "Conv2d", "IF", "SumPool2d", "Conv2d",
                                             "IF", "SumPool2d", "Flatten"]
    assert g.edges[-1][1] == "output" and kinds["output"] == "Output"
    conv = g.nodes["enc.1.0"]  # BN folded: the relu moved up to enc.1.1
    assert conv.weight.shape == (8, 4, 3, 3) and int(conv.groups) == 1  # groups made dense
    assert np.all(conv.weight[:4, 2:] == 0) and np.all(conv.weight[4:, :2] == 0)
    assert tuple(conv.padding) == (1, 1) and tuple(conv.stride) == (1, 1)
    assert list(g.nodes["enc.0.2"].kernel_size) == [2, 2]
    for k in ("enc.0.1", "enc.1.1"):  # weights form: unit thresholds, reset to 0
        assert np.all(g.nodes[k].v_threshold == 1) and np.all(g.nodes[k].v_reset == 0)
    assert g.nodes["enc.1.1"].v_threshold.shape == (8, 6, 6)
    assert g.nodes["output"].output_type["output"].tolist() == [8 * 3 * 3]


def test_grouped_conv_kept_reads_back_without_type_check(tiny, tmp_path):
    net, params, x = tiny
    write_nir(tmp_path / "g.nir", net, params, x, groups="keep")
    g = nir.read(str(tmp_path / "g.nir"), type_check=False)
    conv = g.nodes["enc.1.0"]
    assert conv.weight.shape == (8, 2, 3, 3) and int(conv.groups) == 2
    dense = to_nir(net, params, x)
    a, b = (simulate(h, x, 32, record=True) for h in (g, dense))
    for k in a.rates:
        assert float((a.rates[k] - b.rates[k]).abs().mean()) < 1e-3


def test_thresholds_are_the_percentile_of_positive_activations(tiny):
    net, params, x = tiny
    g = to_nir(net, params, x, percentile=99.0)
    z1, z2 = _ann_preacts(params, x)
    want = [np.percentile(z[z > 0].numpy(), 99.0) for z in (z1, z2)]
    assert list(_lams(g).values()) == pytest.approx(want, rel=1e-4)
    # pools fold 1/k^2 into the next layer; the last pool's stays in the output scale
    assert output_scale(g) == pytest.approx(want[1] / 4, rel=1e-6)


def test_subtract_reset_rates_approximate_normalised_activations(tiny):
    """First IF layer: constant current u, reset by subtraction keeps v in [0, 1] after every
    step, so the count is T clip(u) minus at most one: |rate - clip(u)| <= 1/T exactly. The
    second layer integrates spike trains whose rates are each within 1/T: its current is off
    by at most sum|W_row| / T, plus its own 1/T; its mean error must stay below that bound
    and shrink at least twofold from T = 32 to T = 256 (it scales as 1/T)."""
    net, params, x = tiny
    g = to_nir(net, params, x)
    lams = _lams(g)
    z1, z2 = _ann_preacts(params, x)
    target = {"enc.0.1": (z1 / lams["enc.0.1"]).clamp(0, 1),
              "enc.1.1": (z2 / lams["enc.1.1"]).clamp(0, 1)}
    err = {}
    for T in (32, 256):
        run = simulate(g, x, T, reset="subtract", record=True)
        err[T] = {k: (run.rates[k] - target[k]).abs() for k in target}
        assert float(err[T]["enc.0.1"].max()) <= 1 / T + 1e-5
    w2 = torch.as_tensor(g.nodes["enc.1.0"].weight)
    bound = (1 + float(w2.abs().sum((1, 2, 3)).mean())) / 256
    assert float(err[256]["enc.1.1"].mean()) <= bound
    assert float(err[256]["enc.1.1"].mean()) < 0.5 * float(err[32]["enc.1.1"].mean())


def test_half_threshold_start_rounds_instead_of_flooring(tiny):
    """Reset by subtraction from v = theta / 2: v stays in [0, theta] after every step, so
    the count is T clip(u) + 1/2 - v_T: within 1/(2T) of it (half the bound from v = 0)."""
    net, params, x = tiny
    g = to_nir(net, params, x)
    target = (_ann_preacts(params, x)[0] / _lams(g)["enc.0.1"]).clamp(0, 1)
    T = 64
    half = simulate(g, x, T, reset="subtract", v_init=0.5, record=True).rates["enc.0.1"]
    zero = simulate(g, x, T, reset="subtract", record=True).rates["enc.0.1"]
    assert float((half - target).abs().max()) <= 0.5 / T + 1e-5
    assert abs(float((half - target).mean())) < 0.5 * abs(float((zero - target).mean()))
    with pytest.raises(EdgeError, match="v_init"):
        simulate(g, x, 4, v_init=1.5)


def test_zero_reset_first_layer_within_its_bounds(tiny):
    """NIR's IF resets to 0: with a = u / theta in (0, 1] the neuron fires every
    floor(1 / a) + 1 steps, a rate in [a / (1 + a), a]; a <= 0 never fires; a > 1 fires every
    step."""
    net, params, x = tiny
    g = to_nir(net, params, x)
    T = 128
    rate = simulate(g, x, T, record=True).rates["enc.0.1"]
    a = _ann_preacts(params, x)[0] / _lams(g)["enc.0.1"]
    mid = (a > 0) & (a <= 1)
    assert torch.all(rate[a <= 0] == 0) and torch.all(rate[a > 1.001] == 1)
    assert torch.all(rate[mid] >= (a / (1 + a))[mid] - 1 / T - 1e-6)
    assert torch.all(rate[mid] <= a[mid] + 1 / T + 1e-6)
    assert float((a[mid] - rate[mid]).mean()) > 0.02  # the drop the subtracting reset avoids


def test_norse_runs_the_file_as_the_reference_does(tiny, tmp_path):
    pytest.importorskip("norse")
    net, params, x = tiny
    write_nir(tmp_path / "t.nir", net, params, x)
    g = nir.read(str(tmp_path / "t.nir"))
    ref = simulate(g, x, [16, 64], record=True)
    nor = simulate(g, x, [16, 64], record=True, backend="norse")
    assert set(nor.rates) == set(ref.rates) == {"enc.0.1", "enc.1.1"}
    for k in ref.rates:  # identical spikes, up to float ties at the threshold
        assert float((nor.rates[k] != ref.rates[k]).float().mean()) < 1e-3
    for t in (16, 64):
        assert torch.allclose(nor.outputs[t], ref.outputs[t], atol=1e-4)
    with pytest.raises(EdgeError, match="subtract"):
        simulate(g, x, 4, backend="norse", reset="subtract")
    with pytest.raises(EdgeError, match="v_init"):
        simulate(g, x, 4, backend="norse", v_init=0.5)


def test_threshold_form_and_integer_weights_fire_the_same_spikes(tiny):
    net, params, x = tiny
    wform = to_nir(net, params, x)
    tform = to_nir(net, params, x, fold="threshold")
    assert np.array_equal(tform.nodes["enc.0.0"].weight, params["enc.0.0.w"].numpy())
    assert float(tform.nodes["enc.0.1"].v_threshold.flat[0]) == pytest.approx(
        _lams(tform)["enc.0.1"])
    T = 64
    a, b = (simulate(g, x, T, record=True) for g in (wform, tform))
    for k in a.rates:
        assert float((a.rates[k] - b.rates[k]).abs().mean()) < 1e-3
    assert torch.allclose(a.outputs[T] * output_scale(wform), b.outputs[T] * output_scale(tform),
                          atol=1e-4)
    # the integer hook: int8 codes with a power-of-two scale are written bit-exactly
    w = params["enc.0.0.w"]
    codes = torch.clamp(torch.round(w * 2**5), -128, 127)
    q = to_nir(net, params, x, fold="threshold", weights={"enc.0.0.w": codes},
               scales={"enc.0.0.w": 2.0**-5})
    deq = to_nir(net, params, x, weights={"enc.0.0.w": codes * 2.0**-5})
    assert np.array_equal(q.nodes["enc.0.0"].weight, codes.numpy())
    c, d = (simulate(g, x, T, record=True) for g in (q, deq))
    for k in c.rates:
        assert float((c.rates[k] - d.rates[k]).abs().mean()) < 1e-3
    with pytest.raises(EdgeError, match="does not have"):
        to_nir(net, params, x, weights={"enc.9.0.w": codes})


def test_head_readout_matches_the_ann(tiny):
    net, params, x = tiny
    gen = torch.Generator().manual_seed(3)
    f = ann_features(net, params, x)
    head = (torch.randn(5, f.shape[1], generator=gen) / 8, torch.randn(5, generator=gen))
    y = (f @ head[0].T + head[1]).argmax(1)
    assert ann_accuracy(net, params, x, y, head) == 1.0
    g = to_nir(net, params, x, head=head, percentile=100.0)
    assert type(g.nodes["head"]).__name__ == "Affine" and g.edges[-1] == ("head", "output")
    logits = f @ head[0].T + head[1]
    run = simulate(g, x, 512, reset="subtract")
    assert float((run.outputs[512] - logits).abs().mean()) < 0.05 * float(logits.abs().mean())
    acc = spiking_accuracies(g, x, y, [8, 512], reset="subtract")
    assert acc[512] >= 0.9 and acc[512] >= acc[8]
    bare = to_nir(net, params, x, percentile=100.0)  # the same readout outside the graph
    p_in = spiking_predicts(g, x, [64])[64]
    p_out = spiking_predicts(bare, x, [64], head=head)[64]
    assert float((p_in == p_out).float().mean()) >= 0.95
    with pytest.raises(EdgeError, match="head"):
        to_nir(net, params, x, head=(head[0][:, :-1], head[1]))


def test_pool_before_the_activation_folds_into_the_conv():
    """conv -> avgpool -> relu: the pool sums currents, so the conv carries lam k^2 and the
    IF keeps a unit threshold; its input current is constant, so the 1/T bound holds."""
    spec = {"name": "p", "in_shape": [1, 8, 8], "blocks": [
        {"layers": [{"op": "conv", "cout": 3, "k": 3, "padding": 1}, {"op": "avgpool", "k": 2},
                    {"op": "relu"}, {"op": "flatten"}]}]}
    net, params = _net(spec)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    g = to_nir(net, params, x)
    assert [type(g.nodes[a]).__name__ for a, _ in g.edges][1:4] == ["Conv2d", "SumPool2d", "IF"]
    assert np.all(g.nodes["enc.0.2"].v_threshold == 1)
    z = F.avg_pool2d(F.conv2d(x, params["enc.0.0.w"], params["enc.0.0.b"], padding=1), 2)
    lam = _lams(g)["enc.0.2"]
    assert lam == pytest.approx(np.percentile(z[z > 0].numpy(), 99.9), rel=1e-4)
    T = 64
    rate = simulate(g, x, T, reset="subtract", record=True).rates["enc.0.2"]
    assert float((rate - (z / lam).clamp(0, 1)).abs().max()) <= 1 / T + 1e-5


def test_gap_linear_relu6_and_bernoulli_input():
    spec = {"name": "g", "in_shape": [2, 6, 6], "blocks": [
        {"layers": [{"op": "conv", "cout": 4, "k": 3, "stride": 2, "padding": 1},
                    {"op": "relu6"}, {"op": "gap"}, {"op": "linear", "fout": 3},
                    {"op": "relu"}]}]}
    net, params = _net(spec)
    x = torch.randn(32, 2, 6, 6, generator=torch.Generator().manual_seed(2))
    g = to_nir(net, params, x)
    kinds = [type(g.nodes[a]).__name__ for a, _ in g.edges]
    assert kinds == ["Input", "Conv2d", "IF", "SumPool2d", "Flatten", "Affine", "IF"]
    assert list(g.nodes["enc.0.2"].kernel_size) == [3, 3] and tuple(g.nodes["enc.0.0"].stride) \
        == (2, 2)
    assert _lams(g)["enc.0.1"] <= 6.0
    want = ann_features(net, params, x)
    T = 256
    cur = simulate(g, x, T, reset="subtract").outputs[T] * output_scale(g)
    ber = simulate(g, x, T, reset="subtract", encoding="bernoulli").outputs[T] * output_scale(g)
    scale = float(want.abs().mean())
    assert float((cur - want).abs().mean()) < 0.1 * scale
    assert float((ber - want).abs().mean()) < 0.25 * scale


@pytest.mark.parametrize(("spec", "match"), [
    ("maxpool", r"^NIR readers take no max-pool \(enc\.0\.2\); use average pooling"),
    ("resnet8", r"^block 1 is a residual block"),
    ("bnfirst", r"^bn at enc\.0\.0 follows no conv or linear layer"),
    ("nonsquare", r"^enc\.0\.0 has a 3x1 kernel; NIR's Conv2d .* only square kernels"),
])
def test_refused_networks_give_one_line_errors(spec, match):
    if spec == "maxpool":
        net = NetSpec.from_dict({**SPEC, "blocks": [{"layers": [
            {"op": "conv", "cout": 4, "k": 3}, {"op": "relu"}, {"op": "maxpool", "k": 2}]}]})
    elif spec == "resnet8":
        net = preset("resnet8", (3, 8, 8), width=0.25)
    elif spec == "nonsquare":  # DS-CNN's first conv is 10x4: nir's type inference fails on it
        net = NetSpec.from_dict({**SPEC, "blocks": [{"layers": [
            {"op": "conv", "cout": 4, "k": [3, 1]}, {"op": "relu"}]}]})
    else:
        net = NetSpec.from_dict({**SPEC, "blocks": [{"layers": [
            {"op": "bn"}, {"op": "conv", "cout": 4, "k": 3}, {"op": "relu"}]}]})
    params = net.init_params(torch.Generator().manual_seed(0))
    x = torch.randn(4, *net.in_shape)
    with pytest.raises(EdgeError, match=match) as e:
        to_nir(net, params, x)
    assert "\n" not in str(e.value)


def test_bad_arguments(tiny):
    net, params, x = tiny
    with pytest.raises(EdgeError, match="fold"):
        to_nir(net, params, x, fold="both")
    with pytest.raises(EdgeError, match="sample shape"):
        to_nir(net, params, x[:, :, :8])
    g = to_nir(net, params, x)
    with pytest.raises(EdgeError, match="reset"):
        simulate(g, x, 4, reset="none")
    with pytest.raises(EdgeError, match="no head"):
        spiking_predicts(g, x, [4])


def test_cli_export_format_nir_from_a_trained_run(tmp_path, capsys):
    """`edge export --format nir --checkpoint RUN`: the file reads back with nir.read; a
    max-pool network is refused in one line."""
    import json

    from edge.app.cli import main

    def edge(*args):
        with pytest.raises(SystemExit) as e:
            main(list(args))
        out = capsys.readouterr()
        return e.value.code, out.out, out.err

    code, _, err = edge("train", "--net", "mlp", "--width", "0.25", "--epochs", "1", "--subset",
                        "128", "--out", str(tmp_path / "run"), "--json")
    assert code == 0, err
    code, out, err = edge("export", "--format", "nir", "--checkpoint", str(tmp_path / "run"),
                          "-o", str(tmp_path / "enc.nir"), "--json")
    assert code == 0, err
    r = json.loads(out)
    graph = nir.read(str(tmp_path / "enc.nir"))
    kinds = {}
    for node in graph.nodes.values():
        kinds[type(node).__name__] = kinds.get(type(node).__name__, 0) + 1
    assert r["nodes"] == dict(sorted(kinds.items())) and kinds["IF"] == 2
    code, _, err = edge("train", "--width", "0.25", "--epochs", "1", "--subset", "64", "--out",
                        str(tmp_path / "pool"), "--json")
    assert code == 0, err
    code, _, err = edge("export", "--format", "nir", "--checkpoint", str(tmp_path / "pool"),
                        "-o", str(tmp_path / "pool.nir"))
    assert code == 2 and "no max-pool" in err and len(err.splitlines()) == 1
