"""Tests for edge.data's built-in data sets: loaders for every accepted format (synthetic
files), their validation, the data-dir rules, and the real data when present."""

from __future__ import annotations

import gzip
import io
import os
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
from edge.data import DATASETS, Dataset, default_views, load
from edge.data import known as K
from edge.errors import EdgeError

_ENV_AT_IMPORT = os.environ.get("EDGE_DATA")


def shared_data_dir() -> Path:
    """The real data folder ($EDGE_DATA, else the checkout's ../shared/data); skips the test
    when neither holds mnist.npz and cifar10.npz."""
    for cand in (_ENV_AT_IMPORT, Path(__file__).resolve().parents[2] / "shared" / "data"):
        if cand and all((Path(cand) / f).is_file() for f in ("mnist.npz", "cifar10.npz")):
            return Path(cand)
    pytest.skip("real data not found: set EDGE_DATA to the folder with mnist.npz, cifar10.npz")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ambient $EDGE_DATA, and cwd in an empty dir so nothing is found by accident."""
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
    assert ds.num_classes == 10 and ds.x_unlabeled is None and ds.x_ssl is ds.x_train
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
    a = K.load_digits.__wrapped__()
    b = load("digits")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_subset() -> None:
    full = load("digits")
    ds = load("digits", subset=100)
    assert ds.x_train.shape == (100, 1, 8, 8) and torch.equal(ds.x_train, full.x_train[:100])
    assert torch.equal(ds.x_test, full.x_test) and ds.mean == full.mean
    assert ds.num_classes == 10
    assert len(load("digits", subset=10**6).x_train) == len(full.x_train)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(EdgeError, match="subset"):
            load("digits", subset=bad)


def test_unknown_name() -> None:
    with pytest.raises(EdgeError) as e:
        load("imagenet")
    assert all(n in str(e.value) for n in DATASETS) and "no file or folder" in str(e.value)
    with pytest.raises(EdgeError, match="no such file"):
        load("imagenet.npz")
    with pytest.raises(EdgeError):
        default_views("imagenet")
    with pytest.raises(EdgeError, match="name or a path"):
        load(3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- data dir


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env, arg = tmp_path / "env", tmp_path / "arg"
    env.mkdir()
    arg.mkdir()
    monkeypatch.setenv("EDGE_DATA", str(env))
    assert data.resolve_data_dir(arg) == arg and data.resolve_data_dir(str(arg)) == arg
    assert data.resolve_data_dir(None) == env and data.resolve_data_dir("") == env
    monkeypatch.delenv("EDGE_DATA")
    with pytest.raises(EdgeError) as e:
        data.resolve_data_dir(None)
    msg = str(e.value)
    assert "\n" not in msg and "--data-dir" in msg and "EDGE_DATA" in msg


@pytest.mark.parametrize("via_env", [False, True])
def test_bad_data_dir_never_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       via_env: bool) -> None:
    """A mistyped dir or a file given as one is an error, even when ./data and
    ../shared/data (the old fallbacks) hold a valid copy."""
    np.savez(tmp_path / "good.npz", **_mnist_arrays())
    for d in (Path.cwd() / "data", Path.cwd().parent / "shared" / "data"):
        d.mkdir(parents=True)
        np.savez(d / "mnist.npz", **_mnist_arrays())
    for bad, why in ((tmp_path / "typo", "does not exist"), (tmp_path / "good.npz", "a file")):
        if via_env:
            monkeypatch.setenv("EDGE_DATA", str(bad))
        for name in ("mnist", "cifar10"):
            with pytest.raises(EdgeError, match=why) as e:
                load(name, None if via_env else bad)
            assert str(bad) in str(e.value) and "\n" not in str(e.value)
        if not via_env:  # an explicit dir is checked even where it is not read
            for what in ("digits", tmp_path / "good.npz"):
                with pytest.raises(EdgeError, match=why):
                    load(what, bad)
    with pytest.raises(EdgeError, match="no data directory"):
        monkeypatch.delenv("EDGE_DATA", raising=False)
        load("mnist")
    assert load("digits").name == "digits"  # needs no dir


def test_missing_data_message(tmp_path: Path) -> None:
    for name, accepted in (("cifar10", "cifar-10-python.tar.gz"), ("mnist", "t10k-images")):
        with pytest.raises(EdgeError) as e:
            load(name, data_dir=tmp_path)
        msg = str(e.value)
        assert "\n" not in msg and name in msg and accepted in msg and str(tmp_path) in msg
        assert "--data-dir" in msg and "EDGE_DATA" in msg


# ----------------------------------------------------------------------------- mnist


def _idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _mnist_arrays(seed: int = 0, hw: tuple[int, int] = (28, 28)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, (7, *hw), dtype=np.uint8),
            "y_train": rng.integers(0, 10, 7, dtype=np.uint8),
            "x_test": rng.integers(0, 256, (3, *hw), dtype=np.uint8),
            "y_test": rng.integers(0, 10, 3, dtype=np.uint8)}


def _write_idx_set(d: Path, arrays: dict[str, np.ndarray], gz: bool) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for key, base in K.IDX.items():
        blob = _idx(arrays[key])
        (d / (base + ".gz" if gz else base)).write_bytes(gzip.compress(blob) if gz else blob)


def _check_mnist(ds: Dataset, arrays: dict[str, np.ndarray]) -> None:
    assert ds.x_train.shape == (7, 1, 28, 28) and ds.y_test.dtype == torch.int64
    np.testing.assert_array_equal(ds.x_train[:, 0].numpy(), arrays["x_train"])
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["y_train"])
    np.testing.assert_array_equal(ds.x_test[:, 0].numpy(), arrays["x_test"])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["y_test"])
    assert ds.name == "mnist" and ds.num_classes == 10


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
        np.testing.assert_array_equal(K.read_idx(p), arr)


def test_mnist_idx_corrupt(tmp_path: Path) -> None:
    arrays = _mnist_arrays()
    _write_idx_set(tmp_path, arrays, gz=False)
    bad = tmp_path / K.IDX["x_train"]
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
    _check_mnist(load("mnist"), arrays)
    np.savez(tmp_path / "mnist.npz", x_train=arrays["x_train"])  # rewritten: cache must see it
    with pytest.raises(EdgeError, match="lacks arrays"):
        load("mnist")
    a = _mnist_arrays(1)
    np.savez(tmp_path / "mnist.npz", **{**a, "x_train": a["x_train"][..., None]})  # N,28,28,1
    assert load("mnist").x_train.shape == (7, 1, 28, 28)


def _bad_mnist(a: dict[str, np.ndarray], case: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    if case == "20x20":
        return _mnist_arrays(hw=(20, 20))
    if case == "rgb":
        return {**a, "x_train": rng.integers(0, 256, (7, 28, 28, 3), dtype=np.uint8),
                "x_test": rng.integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)}
    if case == "test shape":
        return {**a, "x_test": rng.integers(0, 256, (3, 27, 28), dtype=np.uint8)}
    if case == "float labels":
        return {**a, "y_train": a["y_train"].astype(np.float32)}
    if case == "float images":
        return {**a, "x_train": a["x_train"] / 255.0}
    if case == "label 10":
        return {**a, "y_test": np.array([1, 10, 2])}
    return {**a, "y_test": a["y_test"][:2]}


@pytest.mark.parametrize(("case", "field", "why"), [
    ("20x20", "x_train", "must be 28x28 with 1 channel"),
    ("rgb", "x_train", "must be 28x28 with 1 channel"),
    ("test shape", "x_test", "must be 28x28"),
    ("float labels", "y_train", "labels must be integers"),
    ("float images", "x_train", "must be uint8"),
    ("label 10", "y_test", "0..9"),
    ("length", "y_test", "one label per image"),
])
def test_mnist_npz_refused(tmp_path: Path, case: str, field: str, why: str) -> None:
    np.savez(tmp_path / "mnist.npz", **_bad_mnist(_mnist_arrays(), case))
    with pytest.raises(EdgeError, match=why) as e:
        load("mnist", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "mnist.npz" in msg and field in msg


def test_cifar_npz_refuses_gray(tmp_path: Path) -> None:
    x = np.zeros((2, 32, 32), dtype=np.uint8)
    np.savez(tmp_path / "cifar10.npz", x_train=x, y_train=[0, 1], x_test=x, y_test=[0, 1])
    with pytest.raises(EdgeError, match="x_train: cifar10 images must be 32x32 with 3 channels"):
        load("cifar10", tmp_path)


@pytest.mark.parametrize("blob", [b"", b"garbage" * 20, b"PK\x03\x04garbage",
                                  pickle.dumps({"x_train": [1, 2]}), b"\x93NUMPY"])
def test_garbage_npz_no_pickle_advice(tmp_path: Path, blob: bytes) -> None:
    (tmp_path / "mnist.npz").write_bytes(blob)
    for args in (("mnist", tmp_path), (tmp_path / "mnist.npz", None)):
        with pytest.raises(EdgeError) as e:
            load(*args)
        msg = str(e.value)
        assert "\n" not in msg and "mnist.npz" in msg
        assert "pickle" not in msg.replace(str(tmp_path), "").lower()


def test_npz_object_array_and_npy(tmp_path: Path) -> None:
    a = _mnist_arrays()
    np.savez(tmp_path / "mnist.npz", **{**a, "y_train": np.array([object()] * 7)})
    with pytest.raises(EdgeError, match="y_train: holds object") as e:
        load("mnist", tmp_path)
    assert "allow_pickle" not in str(e.value)
    with open(tmp_path / "mnist.npz", "wb") as f:
        np.save(f, a["x_train"])
    with pytest.raises(EdgeError, match="single .npy array"):
        load("mnist", tmp_path)


# ----------------------------------------------------------------------------- cifar10


def _cifar_batches() -> dict[str, tuple[np.ndarray, list[int]]]:
    """Two images per batch; image k of batch b has pixel (c=1, y=2, x=3) = 10*b + k."""
    out = {}
    for b, name in enumerate((*K.CIFAR_TRAIN, "test_batch")):
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
    assert ds.classes[0] == "airplane" and ds.num_classes == 10


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
    xs, ys = K.read_cifar_batch(blob, "py2")
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


def test_real_cifar10() -> None:
    d = shared_data_dir()
    ds = load("cifar10", d)
    assert ds.x_train.shape == (50000, 3, 32, 32) and ds.x_test.shape == (10000, 3, 32, 32)
    assert ds.y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    np.testing.assert_allclose(np.array(ds.mean) * 255, [125.307, 122.950, 113.865], atol=1e-3)
    assert load("cifar10", d, subset=10).x_train.data_ptr() == ds.x_train.data_ptr()


def test_real_mnist() -> None:
    d = shared_data_dir()
    ds = load("mnist", d)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.mean[0] == pytest.approx(0.1307, abs=1e-4)
    assert ds.std[0] == pytest.approx(0.3081, abs=1e-4)
    assert sorted(set(ds.y_test.tolist())) == list(range(10))
    as_path = load(d / "mnist.npz")  # the same file as the user's own data
    assert as_path.name == "mnist" and torch.equal(as_path.x_test, ds.x_test)
    assert as_path.mean == ds.mean and as_path.num_classes == 10
