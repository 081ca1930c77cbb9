"""The :class:`Dataset` record, array validation shared by every format, and normalisation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edge.errors import EdgeError

SPLITS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class Dataset:
    """A labelled image data set held as uint8 NCHW, with its train-split channel statistics.

    ``classes`` names the labels (index = label). ``x_unlabeled`` holds extra images without
    labels (STL-10's unlabeled split) for self-supervised training, or is None; it may be a
    memory-mapped, non-contiguous view, so index it to take batches and never write to it.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()
    x_unlabeled: torch.Tensor | None = None

    @property
    def in_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        return int(max(int(self.y_train.max()), int(self.y_test.max()))) + 1

    @property
    def x_ssl(self) -> torch.Tensor:
        """The images self-supervised training draws from: x_unlabeled if present, else
        x_train (the probe always uses the labelled splits)."""
        return self.x_train if self.x_unlabeled is None else self.x_unlabeled


def to_float(x: torch.Tensor, ds_or_mean_std: Dataset | tuple[Sequence[float], Sequence[float]]
             ) -> torch.Tensor:
    """uint8 images -> float32 ``(x/255 - mean) / std``, the form every model consumes."""
    if isinstance(ds_or_mean_std, Dataset):
        mean, std = ds_or_mean_std.mean, ds_or_mean_std.std
    else:
        mean, std = ds_or_mean_std
    if x.dtype != torch.uint8:
        raise EdgeError(f"to_float expects uint8 images, got {x.dtype}")
    return normalise(x.float() / 255.0, mean, std, channel_dim=-3)


def normalise(img: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              channel_dim: int) -> torch.Tensor:
    """``(img - mean) / std`` per channel along ``channel_dim``."""
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


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of x/255 via a 256-bin histogram (no float copy of x).

    A constant channel gets std 1 rather than 0, so normalising it stays finite."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    mean, std = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        m = float((counts * levels).sum() / counts.sum())
        s = float(((counts * (levels - m) ** 2).sum() / counts.sum()).sqrt())
        mean.append(m)
        std.append(s if s > 0 else 1.0)
    return tuple(mean), tuple(std)


def check_labels(y: np.ndarray, where: str, field: str) -> np.ndarray:
    """Integer labels, one dimension, not empty, not negative -> int64."""
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise EdgeError(f"{where}: {field}: labels must be integers, got dtype {y.dtype}")
    if y.ndim != 1:
        raise EdgeError(f"{where}: {field}: labels must be one-dimensional, got shape {y.shape}")
    if len(y) == 0:
        raise EdgeError(f"{where}: {field}: the split is empty")
    if int(y.min()) < 0:
        raise EdgeError(f"{where}: {field}: negative label {int(y.min())}")
    return y.astype(np.int64)


def to_uint8(xs: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Images of any accepted dtype -> uint8, one rule for the whole file.

    uint8 is kept; other integer dtypes must lie in 0..255. Float images must be finite and
    non-negative; if no value in the file exceeds 1 they are read as 0..1 (times 255),
    otherwise as 0..255 (then none may exceed 255); either way rounded to the nearest level.
    """
    out: dict[str, np.ndarray] = {}
    floats = {k: x for k, x in xs.items() if np.issubdtype(x.dtype, np.floating)}
    top = 0.0
    for k, x in floats.items():
        if not np.isfinite(x).all():
            raise EdgeError(f"{where}: {k}: holds NaN or infinite values")
        if x.size and float(x.min()) < 0:
            raise EdgeError(f"{where}: {k}: negative pixel value {float(x.min()):g}")
        top = max(top, float(x.max()) if x.size else 0.0)
    scale = 255.0 if top <= 1.0 else 1.0
    for k, x in xs.items():
        if x.dtype == np.uint8:
            out[k] = x
        elif k in floats:
            if scale == 1.0 and float(x.max()) > 255.0:
                raise EdgeError(f"{where}: {k}: float pixel value {float(x.max()):g} is above "
                                "255 (floats must be in 0..1 or 0..255)")
            out[k] = np.rint(x.astype(np.float32) * scale).astype(np.uint8)
        elif x.dtype != np.bool_ and np.issubdtype(x.dtype, np.integer):
            if x.size and (int(x.min()) < 0 or int(x.max()) > 255):
                raise EdgeError(f"{where}: {k}: integer pixels must lie in 0..255, got "
                                f"{int(x.min())}..{int(x.max())}")
            out[k] = x.astype(np.uint8)
        else:
            raise EdgeError(f"{where}: {k}: images must be uint8, integer or float, "
                            f"got dtype {x.dtype}")
    return out


def channels_last(x: np.ndarray, where: str, field: str) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) with C in 1..4 -> (N, C, H, W)."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise EdgeError(f"{where}: {field}: want images of shape (N, H, W) or (N, H, W, C), "
                        f"got rank {x.ndim} {x.shape}")
    if not 1 <= x.shape[-1] <= 4:
        hint = "; store channels last" if 1 <= x.shape[1] <= 4 else ""
        raise EdgeError(f"{where}: {field}: {x.shape[-1]} channels in shape {x.shape}; want "
                        f"C in 1..4 in (N, H, W, C){hint}")
    return x.transpose(0, 3, 1, 2)


def build(name: str, arrays: Mapping[str, np.ndarray], where: str,
          classes: Sequence[str] = (), x_unlabeled: torch.Tensor | None = None) -> Dataset:
    """uint8 NCHW image arrays and integer labels -> Dataset, after the checks every format
    shares: one label per image, non-empty splits, one image shape in train and test."""
    tensors = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], check_labels(arrays[f"y_{split}"], where, f"y_{split}")
        if x.dtype != np.uint8 or x.ndim != 4:
            raise EdgeError(f"{where}: x_{split}: want uint8 (N, C, H, W), got "
                            f"{x.dtype}{x.shape}")
        if len(x) != len(y):
            raise EdgeError(f"{where}: x_{split} has {len(x)} images but y_{split} has "
                            f"{len(y)} labels; want one label per image")
        x = np.ascontiguousarray(x)
        tensors[split] = (torch.from_numpy(x if x.flags.writeable else x.copy()),
                          torch.from_numpy(y))
    a, b = tensors["train"][0].shape[1:], tensors["test"][0].shape[1:]
    if a != b:
        raise EdgeError(f"{where}: x_test: image shape {tuple(b)} (C, H, W) differs from "
                        f"x_train's {tuple(a)}")
    if x_unlabeled is not None and x_unlabeled.shape[1:] != a:
        raise EdgeError(f"{where}: x_unlabeled: image shape {tuple(x_unlabeled.shape[1:])} "
                        f"differs from x_train's {tuple(a)}")
    top = max(int(tensors["train"][1].max()), int(tensors["test"][1].max()))
    if classes and top >= len(classes):
        raise EdgeError(f"{where}: label {top} is outside the {len(classes)} classes")
    mean, std = channel_stats(tensors["train"][0])
    return Dataset(name, *tensors["train"], *tensors["test"], mean=mean, std=std,
                   classes=tuple(classes) or tuple(str(i) for i in range(top + 1)),
                   x_unlabeled=x_unlabeled)
