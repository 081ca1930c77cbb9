"""Data sets and self-supervised augmentations, with no network access and no torchvision.

Three data sets, all returned as uint8 NCHW tensors plus int64 labels (10 classes each):

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, values 0..16, rescaled to
  0..255 as ``round(v * 255 / 16)``). No files needed. The split is fixed and stratified:
  one ``numpy.random.default_rng(0)`` permutes each class in turn (classes 0..9), the first
  ``round(0.2 * n_class)`` indices go to test, the rest to train; each split is then sorted
  back into the original order, so classes stay interleaved and ``subset`` stays balanced.
* ``mnist``: ``mnist.npz`` (keys x_train, y_train, x_test, y_test; x uint8 N x 28 x 28), or
  the official idx files (``train-images-idx3-ubyte`` ..., optionally ``.gz``) directly in a
  data dir or in its ``mnist/`` or ``MNIST/raw`` subdir. idx is parsed here: two zero bytes,
  a type byte (0x08 = uint8), a rank byte, then big-endian uint32 dims, then the raw data.
* ``cifar10``: ``cifar10.npz`` (x uint8 N x 32 x 32 x 3, HWC RGB), or the official python
  version, either unpacked (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``) or the
  ``cifar-10-python.tar.gz`` archive, read member by member without extracting. The batches
  are pickles; they are read with an unpickler that only admits numpy's array constructors.

Data dirs are searched in the order given by :func:`resolve_data_dir`; the first dir that
holds an accepted file wins, and a corrupt file there is an error rather than a reason to
look further (silently training on some other copy would be worse). Decoded data sets are
cached in memory per file (path, size, mtime), because CIFAR-10 takes seconds to inflate.
The cached tensors are shared: treat them as read-only.

Views (:func:`two_views`) are SimCLR-style augmentations done batched in torch, with every
random number drawn from one ``torch.Generator``, so a run is reproducible from its seed.
"""

from __future__ import annotations

import functools
import gzip
import io
import math
import os
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from numbers import Integral
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge.errors import EdgeError

DATASETS: tuple[str, ...] = ("digits", "mnist", "cifar10")
_NUM_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10}
_SPLITS = ("x_train", "y_train", "x_test", "y_test")
_IDX = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TAR = "cifar-10-python.tar.gz"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_ACCEPTS = {
    "mnist": "mnist.npz, or the idx files " + ", ".join(_IDX.values())
    + " (optionally .gz; also under mnist/ or MNIST/raw/)",
    "cifar10": f"cifar10.npz, {_CIFAR_DIR}/ (data_batch_1..5, test_batch) or {_CIFAR_TAR}",
}


@dataclass(frozen=True)
class Dataset:
    """A labelled image data set held as uint8 NCHW, with its train-split channel statistics."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def num_classes(self) -> int:
        return _NUM_CLASSES.get(self.name, int(self.y_train.max()) + 1)


def resolve_data_dir(data_dir: str | Path | None) -> list[Path]:
    """Candidate data dirs, most specific first: the argument (else $EDGE_DATA), then
    ./data and ../shared/data relative to the working directory (the repo/CI layout)."""
    first = data_dir if data_dir not in (None, "") else os.environ.get("EDGE_DATA") or None
    cwd = Path.cwd()
    cands = [Path(first).expanduser().absolute()] if first else []
    cands += [cwd / "data", cwd.parent / "shared" / "data"]
    out: list[Path] = []
    for p in cands:
        if p not in out:
            out.append(p)
    return out


def load(name: str, data_dir: str | Path | None = None, subset: int | None = None) -> Dataset:
    """Load a data set by name; ``subset`` keeps the first N training images (test untouched,
    mean/std still from the full train split so runs with different N are comparable)."""
    if name not in DATASETS:
        raise EdgeError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, Integral)
                               or subset <= 0):
        raise EdgeError(f"subset must be a positive number of images, got {subset!r}")
    if name == "digits":
        ds = _load_digits()
    else:
        dirs = resolve_data_dir(data_dir)
        kind, paths = _find(name, dirs)
        stamps = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
        ds = _read_cached(name, kind, tuple(str(p) for p in paths), stamps)
    if subset is not None and subset < len(ds.y_train):
        n = int(subset)
        ds = replace(ds, x_train=ds.x_train[:n], y_train=ds.y_train[:n])
    return ds


def to_float(x: torch.Tensor, ds_or_mean_std: Dataset | tuple[Sequence[float], Sequence[float]]
             ) -> torch.Tensor:
    """uint8 images -> float32 ``(x/255 - mean) / std``, the form every model consumes."""
    if isinstance(ds_or_mean_std, Dataset):
        mean, std = ds_or_mean_std.mean, ds_or_mean_std.std
    else:
        mean, std = ds_or_mean_std
    if x.dtype != torch.uint8:
        raise EdgeError(f"to_float expects uint8 images, got {x.dtype}")
    return _normalise(x.float() / 255.0, mean, std, channel_dim=-3)


# ----------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
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
    return _make("digits", {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]},
                 "sklearn load_digits")


# ----------------------------------------------------------------------------- finding files


def _find(name: str, dirs: list[Path]) -> tuple[str, tuple[Path, ...]]:
    """First accepted source in the first dir that has one, as (kind, files)."""
    for d in dirs:
        if name == "mnist":
            if (d / "mnist.npz").is_file():
                return "npz", (d / "mnist.npz",)
            for sub in (d, d / "mnist", d / "MNIST" / "raw"):
                files = [_first_file(sub / base, sub / (base + ".gz")) for base in _IDX.values()]
                if all(files):
                    return "idx", tuple(files)  # type: ignore[arg-type]
        else:
            if (d / "cifar10.npz").is_file():
                return "npz", (d / "cifar10.npz",)
            names = (*_CIFAR_TRAIN, "test_batch")
            if all((d / _CIFAR_DIR / n).is_file() for n in names):
                return "batches", tuple(d / _CIFAR_DIR / n for n in names)
            if (d / _CIFAR_TAR).is_file():
                return "tar", (d / _CIFAR_TAR,)
    looked = "; ".join(f"{d}{'' if d.is_dir() else ' (missing)'}" for d in dirs)
    raise EdgeError(f"{name} data not found; looked in: {looked}; accepted: {_ACCEPTS[name]}; "
                    "pass --data-dir or set EDGE_DATA")


def _first_file(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


@functools.lru_cache(maxsize=4)
def _read_cached(name: str, kind: str, paths: tuple[str, ...], stamps: tuple) -> Dataset:
    """Decode once per (file, size, mtime); ``stamps`` is only part of the cache key."""
    files = tuple(Path(p) for p in paths)
    if kind == "npz":
        arrays = _read_npz(files[0])
    elif kind == "idx":
        arrays = {k: _read_idx(p) for k, p in zip(_IDX, files, strict=True)}
    elif kind == "batches":
        parts = [_read_cifar_batch(p.read_bytes(), str(p)) for p in files]
        arrays = _join_cifar(parts)
    else:
        arrays = _read_cifar_tar(files[0])
    return _make(name, arrays, str(files[0]) if len(files) == 1 else str(files[0].parent))


def _make(name: str, arrays: dict[str, np.ndarray], where: str) -> Dataset:
    """Validate shapes/labels, convert to NCHW tensors and compute train channel stats."""
    xs = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y):
            raise EdgeError(f"{name}: bad {split} arrays in {where}: x {x.dtype}{x.shape}, "
                            f"y {y.shape} (want uint8 images and one label per image)")
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)  # HWC -> CHW
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise EdgeError(f"{name}: cannot read image shape {x.shape} in {where}")
        if len(y) and (y.min() < 0 or y.max() >= _NUM_CLASSES[name]):
            raise EdgeError(f"{name}: labels outside 0..{_NUM_CLASSES[name] - 1} in {where}")
        x = np.ascontiguousarray(x)
        xs[split] = (torch.from_numpy(x if x.flags.writeable else x.copy()),
                     torch.from_numpy(y.astype(np.int64)))
    mean, std = _channel_stats(xs["train"][0])
    return Dataset(name, *xs["train"], *xs["test"], mean=mean, std=std)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of x/255 via a 256-bin histogram (no float copy of x)."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    mean, std = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        m = float((counts * levels).sum() / counts.sum())
        mean.append(m)
        std.append(float(((counts * (levels - m) ** 2).sum() / counts.sum()).sqrt()))
    return tuple(mean), tuple(std)


# ----------------------------------------------------------------------------- formats


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _SPLITS if k not in z.files]
            if missing:
                raise EdgeError(f"{path} lacks arrays {missing}; it holds {z.files}")
            return {k: z[k] for k in _SPLITS}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise EdgeError(f"cannot read {path}: {e}") from None


def _read_idx(path: Path) -> np.ndarray:
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


def _read_cifar_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a corrupt or foreign file
        raise EdgeError(f"cannot unpickle CIFAR batch {where}: {e}") from None
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise EdgeError(f"{where} is not a CIFAR-10 batch (want a dict with b'data', b'labels')")
    x, y = np.asarray(d[b"data"]), np.asarray(d[b"labels"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or y.shape != (len(x),):
        raise EdgeError(f"{where}: data {x.dtype}{x.shape}, labels {y.shape}; "
                        "want uint8 (N, 3072) and N labels")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _join_cifar(parts: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches 1..5 then test_batch (the order ``_find``/``_read_cifar_tar`` produce)."""
    return {"x_train": np.concatenate([p[0] for p in parts[:5]]),
            "y_train": np.concatenate([p[1] for p in parts[:5]]),
            "x_test": parts[5][0], "y_test": parts[5][1]}


def _read_cifar_tar(path: Path) -> dict[str, np.ndarray]:
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            parts = []
            for n in (*_CIFAR_TRAIN, "test_batch"):
                if n not in members:
                    raise EdgeError(f"{path} lacks member {_CIFAR_DIR}/{n}")
                f = tar.extractfile(members[n])
                assert f is not None  # isfile() members always have a file object
                parts.append(_read_cifar_batch(f.read(), f"{path}:{members[n].name}"))
    except (OSError, EOFError, tarfile.TarError) as e:
        raise EdgeError(f"cannot read {path}: {e}") from None
    return _join_cifar(parts)


# ----------------------------------------------------------------------------- views


@dataclass(frozen=True)
class ViewConfig:
    """SimCLR-style augmentation settings (Chen et al. 2020 defaults)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2


def default_views(name: str) -> ViewConfig:
    """Per-data-set presets: digits/MNIST keep more of the image (an 8x8 digit cropped to 20%
    is a couple of pixels) and are never mirrored (a mirrored 2 or 7 is not a digit)."""
    if name not in DATASETS:
        raise EdgeError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    if name == "cifar10":
        return ViewConfig()
    return ViewConfig(crop_scale=(0.5, 1.0), flip_p=0.0)


def two_views(x: torch.Tensor, gen: torch.Generator, cfg: ViewConfig,
              mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent augmented views of a uint8 batch, normalised float32, same shape.

    Every random number comes from ``gen`` in a fixed order, so the same generator state
    gives bit-identical views (on the same device and torch build).
    """
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise EdgeError(f"two_views expects uint8 (N, 1|3, H, W), got {x.dtype}{tuple(x.shape)}")
    img = x.float() / 255.0
    return (_normalise(_view(img, gen, cfg), mean, std, 1),
            _normalise(_view(img, gen, cfg), mean, std, 1))


_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def _gray(img: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) -> (N,1,H,W) luma."""
    w = img.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (img * w).sum(1, keepdim=True)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, shape=()) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand((n, *shape), generator=gen, device=gen.device)


def _view(img: torch.Tensor, gen: torch.Generator, cfg: ViewConfig) -> torch.Tensor:
    """One view of a float [0,1] batch: crop+flip, colour jitter, grayscale (in that order).

    Draws, always in this order and regardless of the config: 10 crop attempts (area scale,
    log aspect ratio), crop offsets, flip, jitter gate and its 4 factors, grayscale gate.
    """
    n, c, h, w = img.shape
    dev = img.device
    # Random resized crop, torchvision-style but continuous (sub-pixel boxes): take the
    # first of 10 (scale, ratio) draws whose box fits, else the centre crop fallback.
    scale = _uniform(n, *cfg.crop_scale, gen, (10,))
    logr = _uniform(n, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), gen, (10,))
    bw, bh = (h * w * scale * logr.exp()).sqrt(), (h * w * scale / logr.exp()).sqrt()
    ok = (bw <= w) & (bh <= h)
    pick = ok.float().argmax(1, keepdim=True)  # first fitting attempt
    r0, r1 = cfg.crop_ratio
    fw, fh = (w, w / r0) if w / h < r0 else (h * r1, h) if w / h > r1 else (w, h)
    bw = torch.where(ok.any(1), bw.gather(1, pick)[:, 0], torch.full_like(bw[:, 0], fw))
    bh = torch.where(ok.any(1), bh.gather(1, pick)[:, 0], torch.full_like(bh[:, 0], fh))
    x0 = _uniform(n, 0, 1, gen) * (w - bw)
    y0 = _uniform(n, 0, 1, gen) * (h - bh)
    sign = torch.where(_uniform(n, 0, 1, gen) < cfg.flip_p, -1.0, 1.0)
    # Output pixel u in [-1,1] samples input at centre + half-size * u (align_corners=False
    # coordinates: -1/+1 are the outer pixel edges); a negative x scale mirrors the crop.
    theta = torch.zeros(n, 2, 3, device=gen.device)
    theta[:, 0, 0] = sign * bw / w
    theta[:, 0, 2] = 2 * (x0 + bw / 2) / w - 1
    theta[:, 1, 1] = bh / h
    theta[:, 1, 2] = 2 * (y0 + bh / 2) / h - 1
    grid = F.affine_grid(theta.to(dev), [n, c, h, w], align_corners=False)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # Colour jitter, fixed order brightness -> contrast -> saturation -> hue (torchvision
    # shuffles the order; a fixed one keeps the batch vectorised). Hue rotates the chroma
    # plane of YIQ, a close, cheap stand-in for an HSV hue shift.
    jit = (_uniform(n, 0, 1, gen) < cfg.jitter_p).to(dev)
    f_b = _uniform(n, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, gen).to(dev)
    f_c = _uniform(n, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, gen).to(dev)
    f_s = _uniform(n, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, gen).to(dev)
    f_h = _uniform(n, -cfg.hue, cfg.hue, gen).to(dev)
    gray_gate = (_uniform(n, 0, 1, gen) < cfg.gray_p).to(dev)
    if cfg.jitter_p > 0:
        j = (out * f_b.view(n, 1, 1, 1)).clamp(0, 1)
        m = (_gray(j) if c == 3 else j).mean((1, 2, 3), keepdim=True)
        j = ((j - m) * f_c.view(n, 1, 1, 1) + m).clamp(0, 1)
        if c == 3:
            g = _gray(j)
            j = (g + (j - g) * f_s.view(n, 1, 1, 1)).clamp(0, 1)
            j = torch.einsum("nij,njhw->nihw", _hue_matrix(f_h), j).clamp(0, 1)
        out = torch.where(jit.view(n, 1, 1, 1), j, out)
    if c == 3 and cfg.gray_p > 0:
        out = torch.where(gray_gate.view(n, 1, 1, 1), _gray(out).expand_as(out), out)
    return out


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114],
                         [0.595716, -0.274453, -0.321263],
                         [0.211456, -0.522591, 0.311135]], dtype=torch.float64)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def _hue_matrix(h: torch.Tensor) -> torch.Tensor:
    """Per-sample RGB->RGB matrices rotating YIQ chroma by ``h`` turns."""
    a = h.double() * 2 * math.pi
    rot = torch.zeros(len(h), 3, 3, dtype=torch.float64, device=h.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = a.cos(), -a.sin()
    rot[:, 2, 1], rot[:, 2, 2] = a.sin(), a.cos()
    to, back = _RGB2YIQ.to(h.device), _YIQ2RGB.to(h.device)
    return (back @ rot @ to).float()


def _normalise(img: torch.Tensor, mean: Sequence[float], std: Sequence[float],
               channel_dim: int) -> torch.Tensor:
    c = img.shape[channel_dim]
    m = torch.as_tensor(mean, dtype=torch.float32, device=img.device).flatten()
    s = torch.as_tensor(std, dtype=torch.float32, device=img.device).flatten()
    if len(m) != c or len(s) != c:
        raise EdgeError(f"mean/std have {len(m)}/{len(s)} values for {c}-channel images")
    if bool((s <= 0).any()):
        raise EdgeError(f"std must be positive, got {tuple(s.tolist())}")
    shape = [1] * img.ndim
    shape[channel_dim] = c
    return (img - m.view(shape)) / s.view(shape)
