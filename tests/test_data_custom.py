"""Tests for loading the user's own data by path: .npz, image folders, STL-10's binary
format and Tiny ImageNet's layout, all built small in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge.data import load
from edge.data.custom import STL_CLASSES
from edge.errors import EdgeError

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EDGE_DATA", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


def _one_line(e: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, (p, msg)
    return msg


# ----------------------------------------------------------------------------- npz


def _arrays(shape: tuple[int, ...] = (6, 5, 7), n_test: int = 3, seed: int = 0,
            classes: int = 13) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, shape, dtype=np.uint8),
            "y_train": rng.integers(0, classes, shape[0]).astype(np.int16),
            "x_test": rng.integers(0, 256, (n_test, *shape[1:]), dtype=np.uint8),
            "y_test": np.full(n_test, classes - 1, dtype=np.uint32)}


@pytest.mark.parametrize("shape", [(6, 5, 7), (6, 5, 7, 1), (6, 5, 7, 2), (6, 9, 4, 3),
                                   (6, 4, 4, 4)])
def test_npz_any_shape(tmp_path: Path, shape: tuple[int, ...]) -> None:
    a = _arrays(shape)
    f = tmp_path / "my_set.npz"
    np.savez(f, **a)
    ds = load(f)
    c = shape[3] if len(shape) == 4 else 1
    assert ds.name == "my_set" and ds.in_shape == (c, shape[1], shape[2])
    assert ds.num_classes == 13 and len(ds.classes) == 13 and ds.y_train.dtype == torch.int64
    want = a["x_train"] if len(shape) == 4 else a["x_train"][..., None]
    np.testing.assert_array_equal(ds.x_train.permute(0, 2, 3, 1).numpy(), want)
    np.testing.assert_array_equal(ds.y_test.numpy(), a["y_test"])
    x = ds.x_train.double() / 255
    np.testing.assert_allclose(ds.mean, x.mean((0, 2, 3)).numpy(), atol=1e-9)
    assert load(str(f)).x_train.data_ptr() == ds.x_train.data_ptr()  # cached, str path too


def test_npz_float_scales(tmp_path: Path) -> None:
    a = _arrays((4, 3, 3, 3))
    ref = a["x_train"]
    for name, x_tr, x_te in (
        ("unit", ref / 255.0, a["x_test"] / 255.0),
        ("byte", ref.astype(np.float32), a["x_test"].astype(np.float64)),
        ("int", ref.astype(np.int64), a["x_test"].astype(np.uint16)),
    ):
        np.savez(tmp_path / f"{name}.npz", **{**a, "x_train": x_tr, "x_test": x_te})
        ds = load(tmp_path / f"{name}.npz")
        np.testing.assert_array_equal(ds.x_train.permute(0, 2, 3, 1).numpy(), ref, err_msg=name)
        np.testing.assert_array_equal(ds.x_test.permute(0, 2, 3, 1).numpy(), a["x_test"])
    # one scale for the whole file: test values above 1 make train's 0..1 floats 0..255
    np.savez(tmp_path / "mixed.npz", **{**a, "x_train": np.full((4, 3, 3, 3), 0.6),
                                         "x_test": np.full((3, 3, 3, 3), 2.0)})
    assert int(load(tmp_path / "mixed.npz").x_train.max()) == 1  # 0.6 on 0..255, not 153


def _bad(case: str) -> dict[str, np.ndarray]:
    a = _arrays()
    rng = np.random.default_rng(1)
    return {
        "float labels": {**a, "y_train": a["y_train"].astype(np.float64)},
        "bool labels": {**a, "y_test": np.ones(3, dtype=bool)},
        "negative label": {**a, "y_test": np.array([0, -1, 2])},
        "2-d labels": {**a, "y_train": np.zeros((6, 2), dtype=np.int64)},
        "shape mismatch": {**a, "x_test": rng.integers(0, 256, (3, 5, 6), dtype=np.uint8)},
        "channel mismatch": {**a, "x_test": rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)},
        "length": {**a, "y_train": a["y_train"][:5]},
        "empty": {**a, "x_test": a["x_test"][:0], "y_test": a["y_test"][:0]},
        "nan": {**a, "x_train": np.where(a["x_train"] > 200, np.nan, 0.5)},
        "rank": {**a, "x_train": a["x_train"][:, 0]},
        "rank 5": {**a, "x_train": a["x_train"][:, :, :, None, None]},
        "channels 5": {**a, "x_train": rng.integers(0, 256, (6, 5, 7, 5), dtype=np.uint8)},
        "channels first": {**a, "x_train": rng.integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)},
        "float > 255": {**a, "x_train": np.full((6, 5, 7), 300.0)},
        "negative float": {**a, "x_train": np.full((6, 5, 7), -0.5)},
        "int > 255": {**a, "x_train": np.full((6, 5, 7), 256, dtype=np.int32)},
        "bool images": {**a, "x_train": np.ones((6, 5, 7), dtype=bool)},
        "complex": {**a, "x_train": np.ones((6, 5, 7), dtype=np.complex64)},
    }[case]


@pytest.mark.parametrize(("case", "field", "why"), [
    ("float labels", "y_train", "labels must be integers"),
    ("bool labels", "y_test", "labels must be integers"),
    ("negative label", "y_test", "negative label"),
    ("2-d labels", "y_train", "one-dimensional"),
    ("shape mismatch", "x_test", "differs from x_train"),
    ("channel mismatch", "x_test", "differs from x_train"),
    ("length", "y_train", "one label per image"),
    ("empty", "y_test", "empty"),
    ("nan", "x_train", "NaN"),
    ("rank", "x_train", "rank 2"),
    ("rank 5", "x_train", "rank 5"),
    ("channels 5", "x_train", "C in 1..4"),
    ("channels first", "x_train", "store channels last"),
    ("float > 255", "x_train", "above 255"),
    ("negative float", "x_train", "negative pixel"),
    ("int > 255", "x_train", "0..255"),
    ("bool images", "x_train", "dtype bool"),
    ("complex", "x_train", "dtype complex64"),
])
def test_npz_refused(tmp_path: Path, case: str, field: str, why: str) -> None:
    f = tmp_path / "bad.npz"
    np.savez(f, **_bad(case))
    with pytest.raises(EdgeError, match=why) as e:
        load(f)
    _one_line(e, str(f), field)


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(EdgeError, match="no such file") as e:
        load(tmp_path / "nope.npz")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(EdgeError, match="unsupported file type .csv") as e:
        load(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeError, match="not a data folder") as e:
        load(tmp_path / "empty")
    _one_line(e, "empty", "STL-10")
    np.savez(tmp_path / "lacks.npz", x_train=np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(EdgeError, match="lacks arrays"):
        load(tmp_path / "lacks.npz")


def test_relative_path_is_cwd_relative(tmp_path: Path) -> None:
    np.savez(Path.cwd() / "mine.npz", **_arrays())
    assert load("mine.npz").name == "mine" and load("./mine.npz").num_classes == 13
    np.savez(Path.cwd() / "mnist.npz", **_arrays())  # a path, not the built-in name
    assert load("./mnist.npz").in_shape == (1, 5, 7)


# ----------------------------------------------------------------------------- image folder


def _png(p: Path, arr: np.ndarray, mode: str | None = None, fmt: str | None = None) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    img = PIL.fromarray(arr) if mode is None else PIL.fromarray(arr).convert(mode)
    img.save(p, format=fmt)


def _folder(root: Path, classes: dict[str, int], hw: tuple[int, int] = (6, 5), rgb: bool = True,
            seed: int = 0) -> dict[str, np.ndarray]:
    """Writes lossless PNGs; returns {relative path: pixels (H, W[, 3])}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "test"):
        for c, n in classes.items():
            for i in range(n if split == "train" else 1):
                arr = rng.integers(0, 256, (*hw, 3) if rgb else hw, dtype=np.uint8)
                rel = f"{split}/{c}/img{i}.png"
                _png(root / rel, arr)
                out[rel] = arr
    return out


def test_image_folder_rgb(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    pix = _folder(root, {"dog": 3, "cat": 1, "emu": 2})
    (root / "train" / "dog" / "notes.txt").write_text("ignored")
    (root / "train" / ".hidden").mkdir()
    ds = load(root)
    assert ds.name == "pets" and ds.classes == ("cat", "dog", "emu") and ds.num_classes == 3
    assert ds.in_shape == (3, 6, 5) and len(ds.x_train) == 6 and len(ds.x_test) == 3
    # round-robin over classes: cat0 dog0 emu0 dog1 emu1 dog2
    assert ds.y_train.tolist() == [0, 1, 2, 1, 2, 1]
    order = ["cat/img0", "dog/img0", "emu/img0", "dog/img1", "emu/img1", "dog/img2"]
    for img, rel in zip(ds.x_train, order, strict=True):
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), pix[f"train/{rel}.png"])
    assert ds.y_test.tolist() == [0, 1, 2]


def test_image_folder_gray_and_mixed(tmp_path: Path) -> None:
    root = tmp_path / "g"
    pix = _folder(root, {"a": 2, "b": 2}, rgb=False)
    ds = load(root)
    assert ds.in_shape == (1, 6, 5)
    np.testing.assert_array_equal(ds.x_train[0, 0].numpy(), pix["train/a/img0.png"])
    rgb = np.random.default_rng(5).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    _png(root / "test" / "b" / "img9.png", rgb)  # one colour image makes the set RGB
    _png(root / "train" / "a" / "img7.jpeg", np.full((6, 5, 3), 99, np.uint8), fmt="JPEG")
    _png(root / "train" / "b" / "img8.PNG", np.zeros((6, 5, 4), np.uint8), mode="RGBA")
    ds = load(root)
    assert ds.in_shape == (3, 6, 5) and len(ds.x_train) == 6 and len(ds.x_test) == 3
    g = ds.x_train[0]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    np.testing.assert_array_equal(g[0].numpy(), pix["train/a/img0.png"])
    np.testing.assert_array_equal(ds.x_test[2].permute(1, 2, 0).numpy(), rgb)
    assert abs(int(ds.x_train[4].float().mean()) - 99) <= 2  # the JPEG (lossy)


def test_image_folder_errors(tmp_path: Path) -> None:
    root = tmp_path / "f"
    _folder(root, {"a": 2, "b": 1})
    bad = root / "train" / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(EdgeError, match="cannot decode image") as e:
        load(root)
    _one_line(e, str(bad))
    bad.unlink()
    odd = root / "train" / "a" / "big.png"
    _png(odd, np.zeros((7, 5, 3), np.uint8))
    with pytest.raises(EdgeError, match="all images must have one size") as e:
        load(root)
    _one_line(e, str(odd), "5x7")
    odd.unlink()
    deep = root / "train" / "a" / "deep.png"
    _png(deep, np.zeros((6, 5), np.uint16) + 4000, mode="I;16")
    with pytest.raises(EdgeError, match="mode I;16 is not supported") as e:
        load(root)
    _one_line(e, str(deep))
    deep.unlink()
    (root / "test" / "c").mkdir()
    with pytest.raises(EdgeError, match=r"differ from train/: missing \[\], extra \['c'\]"):
        load(root)
    (root / "test" / "c").rmdir()
    (root / "train" / "c").mkdir()
    (root / "test" / "c").mkdir()
    with pytest.raises(EdgeError, match="holds no .png/.jpg/.jpeg images") as e:
        load(root)
    _one_line(e, str(root / "train" / "c"))
    empty = tmp_path / "no_test"
    _png(empty / "train" / "a" / "x.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(EdgeError, match="test: missing"):
        load(empty)


def test_image_folder_sees_changes(tmp_path: Path) -> None:
    root = tmp_path / "f"
    _folder(root, {"a": 1, "b": 1})
    assert len(load(root).x_train) == 2
    _png(root / "train" / "a" / "new.png", np.zeros((6, 5, 3), np.uint8))
    assert len(load(root).x_train) == 3


# ----------------------------------------------------------------------------- STL-10


def _stl_write(p: Path, x_nchw: np.ndarray) -> None:
    """STL-10 layout: per image, each channel a column-major 96x96 matrix."""
    p.write_bytes(np.ascontiguousarray(x_nchw.transpose(0, 1, 3, 2)).tobytes())


def _stl(root: Path, unlabeled: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", 3), ("test", 2), ("unlabeled", 4)):
        if split == "unlabeled" and not unlabeled:
            continue
        x = np.zeros((n, 3, 96, 96), dtype=np.uint8)
        x[:, :, :50] = rng.integers(0, 256, (n, 3, 50, 96), dtype=np.uint8)  # top rows only
        _stl_write(root / f"{split}_X.bin", x)
        out[f"x_{split}"] = x
        if split != "unlabeled":
            y = rng.integers(1, 11, n).astype(np.uint8)
            (root / f"{split}_y.bin").write_bytes(y.tobytes())
            out[f"y_{split}"] = y
    return out


def test_stl10(tmp_path: Path) -> None:
    root = tmp_path / "stl10_binary"
    a = _stl(root)
    ds = load(root)
    assert ds.name == "stl10_binary" and ds.in_shape == (3, 96, 96)
    assert ds.classes == STL_CLASSES and ds.num_classes == 10
    np.testing.assert_array_equal(ds.x_train.numpy(), a["x_train"])
    np.testing.assert_array_equal(ds.x_test.numpy(), a["x_test"])
    assert int(ds.x_train[:, :, 50:].sum()) == 0  # rows, not columns, were written
    np.testing.assert_array_equal(ds.y_train.numpy(), a["y_train"].astype(np.int64) - 1)
    assert ds.x_unlabeled is not None and ds.x_ssl is ds.x_unlabeled
    assert ds.x_unlabeled.shape == (4, 3, 96, 96) and ds.x_unlabeled.dtype == torch.uint8
    np.testing.assert_array_equal(ds.x_unlabeled[torch.tensor([3, 0])].numpy(),
                                  a["x_unlabeled"][[3, 0]])
    x = ds.x_train.double() / 255
    np.testing.assert_allclose(ds.std, x.std((0, 2, 3), unbiased=False).numpy(), atol=1e-9)
    sub = load(root, subset=2)
    assert len(sub.x_train) == 2 and sub.x_unlabeled is not None and len(sub.x_unlabeled) == 2
    assert len(sub.x_test) == 2 and sub.mean == ds.mean


def test_stl10_without_unlabeled(tmp_path: Path) -> None:
    root = tmp_path / "s"
    _stl(root, unlabeled=False)
    ds = load(root)
    assert ds.x_unlabeled is None and ds.x_ssl is ds.x_train


def test_stl10_errors(tmp_path: Path) -> None:
    root = tmp_path / "s"
    _stl(root)
    with open(root / "train_X.bin", "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(EdgeError, match="not a positive multiple of 27648") as e:
        load(root)
    _one_line(e, "train_X.bin")
    _stl(root)
    (root / "test_y.bin").write_bytes(bytes([1, 11]))
    with pytest.raises(EdgeError, match="1..10") as e:
        load(root)
    _one_line(e, "test_y.bin")
    (root / "test_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(EdgeError, match="one label per image") as e:
        load(root)
    _one_line(e, "test_y.bin", "3 labels", "2 images")
    (root / "test_y.bin").write_bytes(bytes([1, 2]))
    (root / "unlabeled_X.bin").write_bytes(b"\0" * 5)
    with pytest.raises(EdgeError, match="unlabeled_X.bin"):
        load(root)


# ----------------------------------------------------------------------------- Tiny ImageNet


def _tiny(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    wnids = ["n02", "n01", "n03"]  # wnids.txt is not sorted; classes are
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    pix = {}
    for w in wnids:
        for i in range(2):
            arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            _png(root / "train" / w / "images" / f"{w}_{i}.JPEG", arr, fmt="PNG")
            pix[f"{w}_{i}"] = arr
        (root / "train" / w / f"{w}_boxes.txt").write_text("ignored")
    rows = []
    for i, w in enumerate(["n03", "n01", "n03", "n02"]):
        arr = rng.integers(0, 256, (8, 8), dtype=np.uint8)  # some val images are grayscale
        _png(root / "val" / "images" / f"val_{i}.JPEG", arr, fmt="PNG")
        pix[f"val_{i}"] = arr
        rows.append(f"val_{i}.JPEG\t{w}\t0\t0\t7\t7")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    (root / "test" / "images").mkdir(parents=True)
    return pix


def test_tiny_imagenet(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    pix = _tiny(root, np.random.default_rng(0))
    ds = load(root)
    assert ds.name == "tiny-imagenet-200" and ds.classes == ("n01", "n02", "n03")
    assert ds.in_shape == (3, 8, 8) and ds.x_unlabeled is None
    assert ds.y_train.tolist() == [0, 1, 2, 0, 1, 2]
    np.testing.assert_array_equal(ds.x_train[1].permute(1, 2, 0).numpy(), pix["n02_0"])
    np.testing.assert_array_equal(ds.x_train[5].permute(1, 2, 0).numpy(), pix["n03_1"])
    assert ds.y_test.tolist() == [2, 0, 2, 1]
    for c in range(3):
        np.testing.assert_array_equal(ds.x_test[3, c].numpy(), pix["val_3"])


def test_tiny_imagenet_errors(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _tiny(root, np.random.default_rng(0))
    ann = root / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text(good + "val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(EdgeError, match="line 5") as e:
        load(root)
    _one_line(e, "val_annotations.txt", "wnid")
    ann.write_text(good + "val_7.JPEG\tn01\t0\t0\t1\t1\n")
    with pytest.raises(EdgeError, match="val_7.JPEG does not exist"):
        load(root)
    ann.write_text(good)
    (root / "train" / "n77" / "images").mkdir(parents=True)
    with pytest.raises(EdgeError, match="not in wnids.txt"):
        load(root)
    (root / "train" / "n77" / "images").rmdir()
    (root / "train" / "n77").rmdir()
    for f in (root / "train" / "n01" / "images").iterdir():
        f.unlink()
    with pytest.raises(EdgeError, match="holds no images for wnid n01"):
        load(root)
