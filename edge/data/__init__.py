"""Data sets and self-supervised augmentations, with no network access and no torchvision.

Every data set is returned as a :class:`Dataset`: uint8 NCHW image tensors, int64 labels,
the train split's per-channel mean/std (of x/255), class names, and optionally
``x_unlabeled``.

API
---
``load(name_or_path, data_dir=None, subset=None) -> Dataset``
    ``name_or_path`` is a built-in name (exactly one of :data:`DATASETS`) or a path (str or
    ``os.PathLike``; a relative one is relative to the working directory, never to
    ``data_dir``; write ``./mnist`` for a folder called ``mnist``). ``subset`` keeps the
    first N images of x_train (and of x_unlabeled); test is untouched and mean/std still come
    from the full train split, so runs with different N are comparable.
``resolve_data_dir(data_dir=None) -> Path``
    The folder built-in data sets are read from: the argument if given, else ``$EDGE_DATA``,
    else an error saying how to point edge at the files. It is used as given: a missing
    folder or a file is an error, and nothing else is searched.
``to_float(x, ds_or_mean_std) -> Tensor``
    uint8 images -> float32 ``(x/255 - mean) / std``, the form every model consumes.
``view_config(preset="edge", data=None) -> ViewConfig``
    Views for a preset (:data:`VIEW_PRESETS`) fitted to a Dataset or a (C, H, W) shape.
``default_views(name) -> ViewConfig``
    The built-in data set's default (what ``"edge"`` gives it).
``two_views(x, gen, views, mean, std) -> (Tensor, Tensor)``
    Two augmented, normalised float32 views of a uint8 (N, C, H, W) batch.

Dataset fields: ``name`` (built-in name, or the file's stem / folder's name for a path),
``x_train``, ``y_train``, ``x_test``, ``y_test``, ``mean``, ``std``, ``classes`` (label ->
name; ``num_classes`` is its length), ``x_unlabeled`` (or None); properties ``in_shape``,
``num_classes`` and ``x_ssl`` (x_unlabeled if present, else x_train: what self-supervised
training should draw from; the linear probe uses the labelled splits).

Built-in data sets (10 classes each; each must have its official image shape, uint8 pixels
and integer labels 0..9, otherwise the file is refused):

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, values 0..16, rescaled to
  0..255 as ``round(v * 255 / 16)``). No files needed (``data_dir`` is then not read, but a
  given one must still exist). The split is fixed and stratified: one
  ``numpy.random.default_rng(0)`` permutes each class in turn (classes 0..9), the first
  ``round(0.2 * n_class)`` indices go to test, the rest to train; each split is then sorted
  back into the original order, so classes stay interleaved and ``subset`` stays balanced.
* ``mnist``: ``mnist.npz`` (keys x_train, y_train, x_test, y_test; x uint8 N x 28 x 28), or
  the official idx files (``train-images-idx3-ubyte`` ..., optionally ``.gz``) directly in
  the data dir or in its ``mnist/`` or ``MNIST/raw`` subdir. idx is parsed here: two zero
  bytes, a type byte (0x08 = uint8), a rank byte, then big-endian uint32 dims, then the data.
* ``cifar10``: ``cifar10.npz`` (x uint8 N x 32 x 32 x 3, HWC RGB), or the official python
  version, either unpacked (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``) or the
  ``cifar-10-python.tar.gz`` archive, read member by member without extracting. The batches
  are pickles; they are read with an unpickler that only admits numpy's array constructors.

Paths (the format is detected from what is there):

* ``.npz`` with x_train, y_train, x_test, y_test. Images (N, H, W) or (N, H, W, C), channels
  last, C in 1..4, the same (H, W, C) in train and test. Pixels: uint8; other integer
  dtypes in 0..255; or float, finite and non-negative: if no value in the file exceeds 1
  the file is read as 0..1, else as 0..255 (then none may exceed 255); floats are rounded
  to the nearest of 256 levels. Labels: any integer dtype, shape (N,) or (N, 1), >= 0;
  ``num_classes`` = largest label + 1 over both splits. Never unpickled.
* image folder: ``train/<class>/*.png|jpg|jpeg`` and ``test/<class>/...`` (not recursive,
  hidden and other files ignored). Classes are the sorted folder names and must be the same
  in both splits, none empty. All images one size; 1 channel if every image is grayscale
  (modes 1, L, LA), else RGB (gray ones repeated); alpha dropped; 16-bit, float and other
  modes are refused naming the file.
* STL-10 binary folder (``stl10_binary/``): train_X.bin, train_y.bin, test_X.bin,
  test_y.bin, and optionally unlabeled_X.bin (-> ``x_unlabeled``, memory-mapped, 100000
  images). uint8, each image 3 channels of column-major 96x96; labels 1..10 -> 0..9.
* Tiny ImageNet (``tiny-imagenet-200/``): wnids.txt, train/<wnid>/images/*.JPEG,
  val/images + val/val_annotations.txt; val is the test split (the images the annotations
  list; the unlabelled test/ is not read). Classes are the sorted wnids.

In image folders and Tiny ImageNet, each split is ordered round-robin over classes (each
class's files by name), so ``subset`` stays balanced. Decoded data sets are cached in
memory per file set (path, size, mtime); the cached tensors are shared: treat them as
read-only. A corrupt file is an error, never a reason to look elsewhere.

Views
-----
SimCLR-style augmentations done batched in torch, every random number drawn from one
``torch.Generator`` in a fixed order, so a run is reproducible from its seed. Order: random
resized crop (+ horizontal flip), colour jitter (with probability ``jitter_p``), random
grayscale, Gaussian blur. Saturation, hue and grayscale act on 3-channel images only.
Presets (:func:`view_config`):

* ``"edge"``: today's behaviour: built-in sets get :func:`default_views` (digits/mnist:
  crop scale (0.5, 1), no flip; cifar10: SimCLR's (0.2, 1), flip 0.5, jitter 0.4/0.4/0.4/0.1
  with p 0.8, grayscale p 0.2, no blur); other data SimCLR's defaults fitted to its shape.
* ``"paper"``: CLAPP++ (arXiv 2601.21683) reference views: crop scale (0.25, 1), flip 0.5,
  jitter 0.8/0.8/0.8/0.2 with p 0.8, grayscale p 0.2, Gaussian blur always, kernel side
  floor(10% of the image side) made odd (none below 3 pixels), sigma uniform in [0.1, 2].

Fitting to the shape: a crop keeps at least ``MIN_CROP_PIXELS`` (32) pixels of area (so an
8x8 image is cropped to no less than half), and 1-, 2- or 4-channel data get no saturation,
hue or grayscale. Normalise with the training split's statistics: pass ``ds.mean, ds.std``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from numbers import Integral
from pathlib import Path

from edge.data.custom import load_path
from edge.data.dataset import Dataset, to_float
from edge.data.known import DATASETS, load_known
from edge.data.views import (
    MIN_CROP_PIXELS,
    PAPER,
    VIEW_PRESETS,
    ViewConfig,
    default_views,
    two_views,
    view_config,
)
from edge.errors import EdgeError

__all__ = ["DATASETS", "MIN_CROP_PIXELS", "PAPER", "VIEW_PRESETS", "Dataset", "ViewConfig",
           "default_views", "load", "resolve_data_dir", "to_float", "two_views", "view_config"]

_HOW = ("pass --data-dir DIR (data_dir=DIR in Python) or set EDGE_DATA=DIR, DIR being the "
        "folder that holds mnist.npz / cifar10.npz or the official files")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data dir as given (else $EDGE_DATA); missing, a file, or unset is an error."""
    if data_dir is not None and str(data_dir) != "":
        raw, src = str(data_dir), "--data-dir"
    elif os.environ.get("EDGE_DATA"):
        raw, src = os.environ["EDGE_DATA"], "$EDGE_DATA"
    else:
        raise EdgeError(f"no data directory given; {_HOW}")
    p = Path(raw).expanduser().absolute()
    if not p.exists():
        raise EdgeError(f"data dir {p} (from {src}) does not exist; {_HOW}")
    if not p.is_dir():
        raise EdgeError(f"data dir {p} (from {src}) is a file, not a folder; {_HOW}")
    return p


def load(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
         subset: int | None = None) -> Dataset:
    """Load a built-in data set by name, or the user's data from a path (see module docs)."""
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, Integral)
                               or subset <= 0):
        raise EdgeError(f"subset must be a positive number of images, got {subset!r}")
    if not isinstance(name_or_path, str | os.PathLike):
        raise EdgeError(f"data must be a data set name or a path, got {name_or_path!r}")
    given = data_dir is not None and str(data_dir) != ""
    if isinstance(name_or_path, str) and name_or_path in DATASETS:
        if name_or_path == "digits":
            if given:
                resolve_data_dir(data_dir)  # used as given: a wrong one is still an error
            ds = load_known("digits", None)
        else:
            ds = load_known(name_or_path, resolve_data_dir(data_dir))
    else:
        path = Path(name_or_path).expanduser()
        if given:
            resolve_data_dir(data_dir)
        if not path.exists() and isinstance(name_or_path, str) and os.sep not in name_or_path \
                and "/" not in name_or_path and not path.suffix:
            raise EdgeError(f"unknown data set {name_or_path!r}: not one of "
                            f"{', '.join(DATASETS)}, and no file or folder of that name")
        ds = load_path(path)
    if subset is not None:
        n = int(subset)
        unl = ds.x_unlabeled
        if n < len(ds.y_train) or (unl is not None and n < len(unl)):
            ds = replace(ds, x_train=ds.x_train[:n], y_train=ds.y_train[:n],
                         x_unlabeled=None if unl is None else unl[:n])
    return ds
