"""A user's own data given by path: an .npz, an image folder, STL-10 binaries, Tiny ImageNet."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from edge.data import folders
from edge.data.dataset import Dataset, build, channels_last, to_uint8
from edge.data.npz import read_npz
from edge.errors import EdgeError

STL_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")
STL_UNLABELED = "unlabeled_X.bin"
STL_SIDE = 96
STL_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
               "truck")
ACCEPTS_PATH = ("an .npz with x_train, y_train, x_test, y_test; an image folder with "
                "train/<class>/ and test/<class>/; an STL-10 binary folder (train_X.bin ...); "
                "or tiny-imagenet-200/ (wnids.txt, train/, val/)")


def load_path(path: Path) -> Dataset:
    """Detect the format of ``path`` and load it (cached per file set, size and mtime)."""
    if not path.exists():
        raise EdgeError(f"{path}: no such file or folder")
    name = path.absolute().stem if path.is_file() else path.absolute().name
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise EdgeError(f"{path}: unsupported file type {path.suffix or '(none)'}; "
                            f"accepted: {ACCEPTS_PATH}")
        st = path.stat()
        return _npz_cached(name, str(path), (st.st_size, st.st_mtime_ns))
    if all((path / f).is_file() for f in STL_FILES):
        files = [path / f for f in (*STL_FILES, STL_UNLABELED) if (path / f).is_file()]
        return _stl_cached(name, str(path), folders.stamp(files))
    if folders.is_tiny_imagenet(path):
        classes, files, labels = folders.tiny_imagenet_files(path)
    elif (path / "train").is_dir() or (path / "test").is_dir():
        classes, files, labels = folders.image_folder_files(path)
    else:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:6]) or "nothing"
        raise EdgeError(f"{path}: not a data folder (holds {found}); accepted: {ACCEPTS_PATH}")
    key = tuple((k, folders.stamp(v)) for k, v in files.items())
    return _images_cached(name, str(path), classes, key,
                          tuple(tuple(labels[k].tolist()) for k in ("y_train", "y_test")))


@functools.lru_cache(maxsize=2)
def _npz_cached(name: str, path: str, stamp: tuple) -> Dataset:
    arrays = read_npz(Path(path))
    for k in ("y_train", "y_test"):
        if arrays[k].ndim == 2 and arrays[k].shape[1] == 1:
            arrays[k] = arrays[k][:, 0]  # (N, 1) column of labels
    xs = to_uint8({k: arrays[k] for k in ("x_train", "x_test")}, path)
    nchw = {k: channels_last(x, path, k) for k, x in xs.items()}
    return build(name, {**arrays, **nchw}, path)


@functools.lru_cache(maxsize=2)
def _images_cached(name: str, path: str, classes: tuple[str, ...], key: tuple,
                   labels: tuple[tuple[int, ...], tuple[int, ...]]) -> Dataset:
    files = {k: [Path(f[0]) for f in stamps] for k, stamps in key}
    xs = folders.decode_all(files)
    arrays = {**xs, "y_train": np.asarray(labels[0], dtype=np.int64),
              "y_test": np.asarray(labels[1], dtype=np.int64)}
    return build(name, arrays, path, classes)


@functools.lru_cache(maxsize=2)
def _stl_cached(name: str, path: str, key: tuple) -> Dataset:
    root = Path(path)
    arrays = {"x_train": _stl_images(root / "train_X.bin", mmap=False),
              "x_test": _stl_images(root / "test_X.bin", mmap=False),
              "y_train": _stl_labels(root / "train_y.bin"),
              "y_test": _stl_labels(root / "test_y.bin")}
    unl = None
    if (root / STL_UNLABELED).is_file():
        unl = torch.from_numpy(_stl_images(root / STL_UNLABELED, mmap=True))
    return build(name, arrays, path, STL_CLASSES, x_unlabeled=unl)


def _stl_images(p: Path, mmap: bool) -> np.ndarray:
    """STL-10 images: uint8, each channel a column-major 96x96 matrix -> (N, 3, 96, 96).

    With ``mmap`` the file is mapped copy-on-write and returned as a transposed view (no
    copy; pages are read when indexed)."""
    per = 3 * STL_SIDE * STL_SIDE
    size = p.stat().st_size
    if size == 0 or size % per:
        raise EdgeError(f"{p}: {size} bytes is not a positive multiple of {per} (3x96x96 "
                        "uint8 images); the file is truncated or not STL-10")
    n = size // per
    if mmap:
        raw = np.memmap(p, dtype=np.uint8, mode="c", shape=(n, 3, STL_SIDE, STL_SIDE))
        return np.asarray(raw).transpose(0, 1, 3, 2)
    raw = np.fromfile(p, dtype=np.uint8).reshape(n, 3, STL_SIDE, STL_SIDE)
    return np.ascontiguousarray(raw.transpose(0, 1, 3, 2))


def _stl_labels(p: Path) -> np.ndarray:
    """STL-10 labels 1..10 -> 0..9."""
    y = np.fromfile(p, dtype=np.uint8)
    if len(y) and (int(y.min()) < 1 or int(y.max()) > 10):
        raise EdgeError(f"{p}: labels must lie in 1..10, got {int(y.min())}..{int(y.max())}")
    x_file = p.with_name(p.name.replace("_y.bin", "_X.bin"))
    n = x_file.stat().st_size // (3 * STL_SIDE * STL_SIDE)
    if len(y) != n:
        raise EdgeError(f"{p}: {len(y)} labels for the {n} images in {x_file.name}; want "
                        "one label per image")
    return y.astype(np.int64) - 1
