"""Tests for edge.data: loaders for every accepted format (synthetic files), real data when
present, and the augmentation pipeline's reproducibility and exact special cases."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge import data
from edge.data import DATASETS, Dataset, ViewConfig, default_views, load, to_float, two_views
from edge.errors import EdgeError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ambient $EDGE_DATA, and cwd in an empty dir so fallbacks find nothing by accident."""
    monkeypatch.delenv("EDGE_DATA", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)


# ----------------------------------------------------------------------------- digits


def test_datasets_names() -> None:
    assert DATASETS == ("digits", "mnist", "cifar10")


def test_digits_split() -> None:
    from sklearn.datasets import load_digits

    ds = load("digits")
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.in_shape == (1, 8, 8)
    assert ds.num_classes == 10
    assert len(ds.x_train) + len(ds.x_test) == 1797 and len(ds.x_train) == len(ds.y_train)
    assert int(ds.x_train.max()) == 255 and int(ds.x_train.min()) == 0
    full = np.bincount(load_digits().target, minlength=10)
    test = np.bincount(ds.y_test.numpy(), minlength=10)
    np.testing.assert_array_equal(test, np.rint(0.2 * full).astype(int))
    np.testing.assert_array_equal(np.bincount(ds.y_train.numpy(), minlength=10), full - test)
    assert len(set(ds.y_train[:20].tolist())) >= 8  # original interleaved order kept
    x = ds.x_train.double() / 255
    assert ds.mean[0] == pytest.approx(float(x.mean()), abs=1e-9)
    assert ds.std[0] == pytest.approx(float(x.std(unbiased=False)), abs=1e-9)


def test_digits_split_deterministic() -> None:
    a = data._load_digits.__wrapped__()
    b = load("digits")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_subset() -> None:
    full = load("digits")
    ds = load("digits", subset=100)
    assert ds.x_train.shape == (100, 1, 8, 8) and torch.equal(ds.x_train, full.x_train[:100])
    assert torch.equal(ds.x_test, full.x_test) and ds.mean == full.mean
    assert len(load("digits", subset=10**6).x_train) == len(full.x_train)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(EdgeError, match="subset"):
            load("digits", subset=bad)


def test_unknown_name() -> None:
    with pytest.raises(EdgeError) as e:
        load("imagenet")
    assert all(n in str(e.value) for n in DATASETS)
    with pytest.raises(EdgeError):
        default_views("imagenet")


# ----------------------------------------------------------------------------- mnist


def _idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _mnist_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, (7, 5, 4), dtype=np.uint8),
            "y_train": rng.integers(0, 10, 7, dtype=np.uint8),
            "x_test": rng.integers(0, 256, (3, 5, 4), dtype=np.uint8),
            "y_test": rng.integers(0, 10, 3, dtype=np.uint8)}


def _write_idx_set(d: Path, arrays: dict[str, np.ndarray], gz: bool) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for key, base in data._IDX.items():
        blob = _idx(arrays[key])
        (d / (base + ".gz" if gz else base)).write_bytes(gzip.compress(blob) if gz else blob)


def _check_mnist(ds: Dataset, arrays: dict[str, np.ndarray]) -> None:
    assert ds.x_train.shape == (7, 1, 5, 4) and ds.y_test.dtype == torch.int64
    np.testing.assert_array_equal(ds.x_train[:, 0].numpy(), arrays["x_train"])
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["y_train"])
    np.testing.assert_array_equal(ds.x_test[:, 0].numpy(), arrays["x_test"])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["y_test"])


@pytest.mark.parametrize(("sub", "gz"), [("", False), ("", True), ("mnist", True),
                                         ("MNIST/raw", False)])
def test_mnist_idx_round_trip(tmp_path: Path, sub: str, gz: bool) -> None:
    arrays = _mnist_arrays()
    _write_idx_set(tmp_path / sub, arrays, gz)
    _check_mnist(load("mnist", data_dir=tmp_path), arrays)


@given(st.lists(st.integers(1, 6), min_size=1, max_size=3), st.integers(0, 2**31))
@settings(max_examples=25, deadline=None)
def test_idx_parser_any_shape(dims: list[int], seed: int) -> None:
    import tempfile

    want_rank = 3 if len(dims) == 3 else 1
    dims = dims if want_rank == 3 else dims[:1]
    arr = np.random.default_rng(seed).integers(0, 256, dims, dtype=np.uint8)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / ("x-images-idx3-ubyte" if want_rank == 3 else "y-labels-idx1-ubyte")
        p.write_bytes(_idx(arr))
        np.testing.assert_array_equal(data._read_idx(p), arr)


def test_mnist_idx_corrupt(tmp_path: Path) -> None:
    arrays = _mnist_arrays()
    _write_idx_set(tmp_path, arrays, gz=False)
    bad = tmp_path / data._IDX["x_train"]
    blob = bytearray(bad.read_bytes())
    blob[2] = 0x0D  # float type code instead of uint8
    bad.write_bytes(bytes(blob))
    with pytest.raises(EdgeError, match="train-images-idx3-ubyte.*magic"):
        load("mnist", data_dir=tmp_path)
    bad.write_bytes(_idx(arrays["x_train"])[:-5])  # truncated payload
    with pytest.raises(EdgeError, match="train-images-idx3-ubyte.*truncated"):
        load("mnist", data_dir=tmp_path)
    bad.write_bytes(_idx(arrays["x_train"][:6]))  # 6 images, 7 labels
    with pytest.raises(EdgeError, match="one label per image"):
        load("mnist", data_dir=tmp_path)


def test_mnist_npz_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = _mnist_arrays(1)
    np.savez(tmp_path / "mnist.npz", **arrays)
    _check_mnist(load("mnist", data_dir=tmp_path), arrays)
    monkeypatch.setenv("EDGE_DATA", str(tmp_path))
    assert data.resolve_data_dir(None)[0] == tmp_path
    _check_mnist(load("mnist"), arrays)
    np.savez(tmp_path / "mnist.npz", x_train=arrays["x_train"])  # rewritten: cache must see it
    with pytest.raises(EdgeError, match="lacks arrays"):
        load("mnist")


def test_resolve_data_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = Path.cwd()
    monkeypatch.setenv("EDGE_DATA", str(tmp_path / "env"))
    assert data.resolve_data_dir(tmp_path / "arg") == [
        tmp_path / "arg", cwd / "data", cwd.parent / "shared" / "data"]
    assert data.resolve_data_dir(None)[0] == tmp_path / "env"


def test_missing_data_message(tmp_path: Path) -> None:
    nope = tmp_path / "nope"
    for name, accepted in (("cifar10", "cifar-10-python.tar.gz"), ("mnist", "t10k-images")):
        with pytest.raises(EdgeError) as e:
            load(name, data_dir=nope)
        msg = str(e.value)
        assert "\n" not in msg and name in msg and accepted in msg
        assert str(nope) in msg and str(Path.cwd() / "data") in msg
        assert "--data-dir" in msg and "EDGE_DATA" in msg


# ----------------------------------------------------------------------------- cifar10


def _cifar_batches() -> dict[str, tuple[np.ndarray, list[int]]]:
    """Two images per batch; image k of batch b has pixel (c=1, y=2, x=3) = 10*b + k."""
    out = {}
    for b, name in enumerate((*data._CIFAR_TRAIN, "test_batch")):
        x = np.zeros((2, 3072), dtype=np.uint8)
        for k in range(2):
            x[k, 1 * 1024 + 2 * 32 + 3] = 10 * b + k
        out[name] = (x, [b, (b + 1) % 10])
    return out


def _cifar_pickle(x: np.ndarray, labels: list[int]) -> bytes:
    return pickle.dumps({b"batch_label": b"synthetic", b"labels": labels, b"data": x,
                         b"filenames": [b"a.png", b"b.png"]}, protocol=2)


def _check_cifar(ds: Dataset) -> None:
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    assert ds.x_train[:, 1, 2, 3].tolist() == [10 * (i // 2) + i % 2 for i in range(10)]
    assert int(ds.x_train.sum()) == int(ds.x_train[:, 1, 2, 3].sum())  # nothing else set
    assert ds.x_test[:, 1, 2, 3].tolist() == [50, 51]
    assert ds.y_train.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert ds.y_test.tolist() == [5, 6] and ds.in_shape == (3, 32, 32)


def test_cifar_batches_dir(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name, (x, y) in _cifar_batches().items():
        (d / name).write_bytes(_cifar_pickle(x, y))
    _check_cifar(load("cifar10", data_dir=tmp_path))


def test_cifar_tar_gz(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, (x, y) in _cifar_batches().items():
            blob = _cifar_pickle(x, y)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    _check_cifar(load("cifar10", data_dir=tmp_path))
    assert not (tmp_path / "cifar-10-batches-py").exists()  # read in place, not extracted


def test_cifar_batch_rejects_code(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name, (x, y) in _cifar_batches().items():
        (d / name).write_bytes(_cifar_pickle(x, y))
    (d / "data_batch_3").write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(EdgeError, match="data_batch_3.*refusing"):
        load("cifar10", data_dir=tmp_path)


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes str/bytes as Python 2 ``str`` (BINSTRING), like the official CIFAR batches."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_py2_str(self, obj: str | bytes) -> None:
        b = obj if isinstance(obj, bytes) else obj.encode("latin1")
        self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def test_cifar_py2_pickle() -> None:
    """The official batches come from Python 2 + numpy 1 (numpy.core.multiarray, str keys)."""
    x = np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072)
    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump({"batch_label": "training batch 1 of 5", "data": x,
                                     "labels": [3, 4], "filenames": ["a.png", "b.png"]})
    blob = f.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"_codecs" not in blob
    xs, ys = data._read_cifar_batch(blob, "py2")
    assert xs.shape == (2, 3, 32, 32) and ys.tolist() == [3, 4]
    np.testing.assert_array_equal(xs.reshape(2, 3072), x)


def test_cifar_npz_hwc(tmp_path: Path) -> None:
    x = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    x[2, 5, 7, 1] = 200  # image 2, row 5, col 7, green
    y = np.arange(4, dtype=np.uint8)
    np.savez(tmp_path / "cifar10.npz", x_train=x, y_train=y, x_test=x[:1], y_test=y[:1])
    ds = load("cifar10", data_dir=tmp_path)
    assert ds.x_train.shape == (4, 3, 32, 32) and int(ds.x_train[2, 1, 5, 7]) == 200
    assert int(ds.x_train.sum()) == 200 and ds.y_train.tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- real data


def _real(name: str) -> Dataset:
    f = REAL / f"{name}.npz"
    if not f.is_file():
        pytest.skip(f"real {name} data not found at {f}")
    return load(name, data_dir=REAL)


def test_real_cifar10() -> None:
    ds = _real("cifar10")
    assert ds.x_train.shape == (50000, 3, 32, 32) and ds.x_test.shape == (10000, 3, 32, 32)
    assert ds.y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    np.testing.assert_allclose(np.array(ds.mean) * 255, [125.307, 122.950, 113.865], atol=1e-3)
    assert load("cifar10", data_dir=REAL, subset=10).x_train.data_ptr() == ds.x_train.data_ptr()


def test_real_mnist() -> None:
    ds = _real("mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.mean[0] == pytest.approx(0.1307, abs=1e-4)
    assert ds.std[0] == pytest.approx(0.3081, abs=1e-4)
    assert sorted(set(ds.y_test.tolist())) == list(range(10))


# ----------------------------------------------------------------------------- views

MEAN3, STD3 = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _batch(n: int = 16, c: int = 3, hw: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, hw, hw), generator=g, dtype=torch.uint8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_views_reproducible_and_distinct() -> None:
    x, cfg = _batch(), ViewConfig()
    a1, b1 = two_views(x, _gen(0), cfg, MEAN3, STD3)
    a2, b2 = two_views(x, _gen(0), cfg, MEAN3, STD3)
    a3, _ = two_views(x, _gen(1), cfg, MEAN3, STD3)
    assert a1.shape == x.shape and a1.dtype == torch.float32 and b1.shape == x.shape
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.allclose(a1, a3) and not torch.allclose(a1, b1)


@pytest.mark.parametrize("c", [1, 3])
def test_flip_only_is_exact(c: int) -> None:
    x = _batch(n=64, c=c)
    cfg = ViewConfig(crop_scale=(1.0, 1.0), jitter_p=0.0, gray_p=0.0)
    mean, std = MEAN3[:c], STD3[:c]
    base = to_float(x, (mean, std))
    a, b = two_views(x, _gen(3), cfg, mean, std)
    flips = 0
    for view in (a, b):
        for img, ref in zip(view, base, strict=True):
            same = torch.allclose(img, ref, atol=1e-5)
            mirrored = torch.allclose(img, ref.flip(-1), atol=1e-5)
            assert same or mirrored
            flips += int(mirrored and not same)
    assert 0 < flips < 2 * len(x)


def test_grayscale_p1_equal_channels() -> None:
    cfg = ViewConfig(gray_p=1.0)
    a, b = two_views(_batch(), _gen(0), cfg, (0.5,) * 3, (0.25,) * 3)
    for v in (a, b):
        assert torch.allclose(v[:, 0], v[:, 1], atol=1e-6)
        assert torch.allclose(v[:, 1], v[:, 2], atol=1e-6)


def test_views_one_channel_and_presets() -> None:
    ds = load("digits", subset=32)
    cfg = default_views("digits")
    assert cfg.flip_p == 0.0 and cfg.crop_scale == (0.5, 1.0)
    assert default_views("cifar10") == ViewConfig()
    a, b = two_views(ds.x_train, _gen(0), cfg, ds.mean, ds.std)
    assert a.shape == (32, 1, 8, 8) and torch.isfinite(a).all() and not torch.equal(a, b)


def test_view_errors() -> None:
    with pytest.raises(EdgeError, match="uint8"):
        two_views(_batch().float(), _gen(0), ViewConfig(), MEAN3, STD3)
    with pytest.raises(EdgeError, match="mean/std"):
        two_views(_batch(), _gen(0), ViewConfig(), (0.5,), (0.2,))
    with pytest.raises(EdgeError, match="uint8"):
        to_float(torch.zeros(1, 1, 2, 2), ((0.0,), (1.0,)))


@given(st.integers(0, 2**32), st.sampled_from([1, 3]), st.integers(1, 9))
@settings(max_examples=20, deadline=None)
def test_views_stay_in_range(seed: int, c: int, hw: int) -> None:
    """Every augmented pixel is a valid [0,1] intensity before normalisation."""
    a, b = two_views(_batch(n=4, c=c, hw=hw, seed=seed % 7), _gen(seed), ViewConfig(),
                     (0.0,) * c, (1.0,) * c)
    for v in (a, b):
        assert v.shape == (4, c, hw, hw)
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0 + 1e-6


def test_to_float_matches_dataset_stats() -> None:
    ds = load("digits")
    z = to_float(ds.x_train, ds)
    assert z.dtype == torch.float32
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(z.std()) == pytest.approx(1.0, abs=1e-3)
    assert to_float(ds.x_train[0], ds).shape == (1, 8, 8)
