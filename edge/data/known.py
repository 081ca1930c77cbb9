"""The built-in data sets (digits, mnist, cifar10) in their official formats and as .npz."""

from __future__ import annotations

import functools
import gzip
import io
import math
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

from edge.data.dataset import Dataset, build
from edge.data.npz import read_npz
from edge.errors import EdgeError

DATASETS: tuple[str, ...] = ("digits", "mnist", "cifar10")
SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
CLASSES = {
    "digits": tuple(str(i) for i in range(10)),
    "mnist": tuple(str(i) for i in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                "ship", "truck"),
}
IDX = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TAR = "cifar-10-python.tar.gz"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
ACCEPTS = {
    "mnist": "mnist.npz, or the idx files " + ", ".join(IDX.values())
    + " (optionally .gz; also under mnist/ or MNIST/raw/)",
    "cifar10": f"cifar10.npz, {CIFAR_DIR}/ (data_batch_1..5, test_batch) or {CIFAR_TAR}",
}


def load_known(name: str, data_dir: Path | None) -> Dataset:
    """A built-in data set; ``data_dir`` (already resolved) is needed for all but digits."""
    if name == "digits":
        return load_digits()
    assert data_dir is not None
    kind, paths = find(name, data_dir)
    stamps = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    return _read_cached(name, kind, tuple(str(p) for p in paths), stamps)


@functools.lru_cache(maxsize=1)
def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits with the fixed stratified split (see the package docs)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(0)
    train, test = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)[rng.permutation(int((y == c).sum()))]
        n_test = int(round(0.2 * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    tr, te = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    return build("digits", {"x_train": x[tr], "y_train": y[tr], "x_test": x[te],
                            "y_test": y[te]}, "sklearn load_digits", CLASSES["digits"])


def find(name: str, d: Path) -> tuple[str, tuple[Path, ...]]:
    """The accepted source for ``name`` in ``d`` as (kind, files); only ``d`` is searched."""
    if name == "mnist":
        if (d / "mnist.npz").is_file():
            return "npz", (d / "mnist.npz",)
        for sub in (d, d / "mnist", d / "MNIST" / "raw"):
            files = [_first_file(sub / base, sub / (base + ".gz")) for base in IDX.values()]
            if all(files):
                return "idx", tuple(files)  # type: ignore[arg-type]
    else:
        if (d / "cifar10.npz").is_file():
            return "npz", (d / "cifar10.npz",)
        names = (*CIFAR_TRAIN, "test_batch")
        if all((d / CIFAR_DIR / n).is_file() for n in names):
            return "batches", tuple(d / CIFAR_DIR / n for n in names)
        if (d / CIFAR_TAR).is_file():
            return "tar", (d / CIFAR_TAR,)
    raise EdgeError(f"{name} data not found in {d}; accepted: {ACCEPTS[name]}; point "
                    "--data-dir (or $EDGE_DATA) at the folder that holds them")


def _first_file(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


@functools.lru_cache(maxsize=4)
def _read_cached(name: str, kind: str, paths: tuple[str, ...], stamps: tuple) -> Dataset:
    """Decode once per (file, size, mtime); ``stamps`` is only part of the cache key."""
    files = tuple(Path(p) for p in paths)
    if kind == "npz":
        arrays = read_npz(files[0])
    elif kind == "idx":
        arrays = {k: read_idx(p) for k, p in zip(IDX, files, strict=True)}
    elif kind == "batches":
        arrays = _join_cifar([read_cifar_batch(p.read_bytes(), str(p)) for p in files])
    else:
        arrays = _read_cifar_tar(files[0])
    where = str(files[0]) if len(files) == 1 else str(files[0].parent)
    return build(name, _known_layout(name, arrays, where), where, CLASSES[name])


def _known_layout(name: str, arrays: dict[str, np.ndarray], where: str
                  ) -> dict[str, np.ndarray]:
    """Check a built-in set's images are uint8 of its one official shape; -> NCHW."""
    want = SHAPES[name]
    out = dict(arrays)
    for k in ("x_train", "x_test"):
        x = arrays[k]
        if x.dtype != np.uint8:
            raise EdgeError(f"{where}: {k}: {name} images must be uint8, got {x.dtype} (for "
                            "other data pass the file's path instead of the name)")
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] == want[0] and x.shape[1:] != want:
            x = x.transpose(0, 3, 1, 2)  # HWC -> CHW
        if x.ndim != 4 or x.shape[1:] != want:
            c, h, w = want
            raise EdgeError(f"{where}: {k}: {name} images must be {h}x{w} with {c} "
                            f"channel{'s' if c > 1 else ''}, got shape {arrays[k].shape} "
                            "(for other data pass the file's path instead of the name)")
        out[k] = x
    for k in ("y_train", "y_test"):
        y = arrays[k]
        if np.issubdtype(y.dtype, np.integer) and y.size and int(y.max()) >= len(CLASSES[name]):
            raise EdgeError(f"{where}: {k}: {name} labels must lie in 0..9, got {int(y.max())}")
    return out


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (big-endian header, uint8 payload), checking magic and size."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise EdgeError(f"cannot read {path}: {e}") from None
    want_rank = 3 if "images" in path.name else 1
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != want_rank:
        raise EdgeError(f"{path} is not a uint8 idx file of rank {want_rank} "
                        f"(magic {raw[:4].hex() or 'missing'}, want 0000080{want_rank})")
    head = 4 + 4 * want_rank
    if len(raw) < head:
        raise EdgeError(f"{path} is truncated inside its header")
    dims = struct.unpack(f">{want_rank}I", raw[4:head])
    if len(raw) - head != math.prod(dims):
        raise EdgeError(f"{path} holds {len(raw) - head} data bytes, header {dims} says "
                        f"{math.prod(dims)}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches that refuses every global except numpy's array pieces,
    so a tampered batch file cannot run code."""

    _NUMPY = {"_reconstruct", "ndarray", "dtype", "_frombuffer", "scalar"}

    def find_class(self, module: str, name: str) -> object:
        numpy_part = module.split(".")[0] == "numpy" and name in self._NUMPY
        # _codecs.encode: how Python 3 writes bytes at pickle protocol <= 2 (re-pickled files)
        if numpy_part or (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_cifar_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One official CIFAR-10 python batch -> (uint8 N x 3 x 32 x 32, int64 labels)."""
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a corrupt or foreign file
        raise EdgeError(f"cannot read CIFAR batch {where}: {e}") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise EdgeError(f"{where} is not a CIFAR-10 batch (want a dict with b'data', b'labels')")
    x, y = np.asarray(d[b"data"]), np.asarray(d[b"labels"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or y.shape != (len(x),):
        raise EdgeError(f"{where}: data {x.dtype}{x.shape}, labels {y.shape}; "
                        "want uint8 (N, 3072) and N labels")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _join_cifar(parts: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches 1..5 then test_batch (the order ``find``/``_read_cifar_tar`` produce)."""
    return {"x_train": np.concatenate([p[0] for p in parts[:5]]),
            "y_train": np.concatenate([p[1] for p in parts[:5]]),
            "x_test": parts[5][0], "y_test": parts[5][1]}


def _read_cifar_tar(path: Path) -> dict[str, np.ndarray]:
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            parts = []
            for n in (*CIFAR_TRAIN, "test_batch"):
                if n not in members:
                    raise EdgeError(f"{path} lacks member {CIFAR_DIR}/{n}")
                f = tar.extractfile(members[n])
                assert f is not None  # isfile() members always have a file object
                parts.append(read_cifar_batch(f.read(), f"{path}:{members[n].name}"))
    except (OSError, EOFError, tarfile.TarError) as e:
        raise EdgeError(f"cannot read {path}: {e}") from None
    return _join_cifar(parts)
