"""Image folders decoded with Pillow: the ImageFolder layout and Tiny ImageNet's layout."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edge.errors import EdgeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GRAY = {"1", "L", "LA"}
_RGB = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr"}


def is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()


def subdirs(d: Path) -> list[Path]:
    """Visible subdirectories of ``d``, sorted by name."""
    return sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def images_in(d: Path) -> list[Path]:
    """Image files directly in ``d`` (not recursive), sorted by name."""
    return sorted((p for p in d.iterdir() if is_image(p)), key=lambda p: p.name)


def interleave(per_class: Sequence[Sequence[Path]]) -> tuple[list[Path], np.ndarray]:
    """Files and labels in round-robin class order (class 0's first image, class 1's first,
    ...), so the first N images of a split are as balanced as the classes allow."""
    files, labels = [], []
    for i in range(max(len(f) for f in per_class)):
        for c, f in enumerate(per_class):
            if i < len(f):
                files.append(f[i])
                labels.append(c)
    return files, np.asarray(labels, dtype=np.int64)


def stamp(files: Sequence[Path]) -> tuple:
    """Cache key part: every file's name, size and modification time."""
    out = []
    for p in files:
        st = p.stat()
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(out)


def decode_all(splits: dict[str, list[Path]]) -> dict[str, np.ndarray]:
    """Decode every split's files to one uint8 (N, C, H, W) array each.

    Grayscale images (modes 1, L, LA) give 1 channel if every image of every split is
    grayscale; otherwise all images are RGB (gray ones repeated to 3 channels). Alpha is
    dropped. All images must have one size.
    """
    decoded = {}
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for k, files in splits.items():
            decoded[k] = list(pool.map(_decode, files))
    first_k = next(k for k in splits if splits[k])
    ref_path, ref = splits[first_k][0], decoded[first_k][0]
    h, w = ref.shape[:2]
    colour = any(a.ndim == 3 for arrs in decoded.values() for a in arrs)
    c = 3 if colour else 1
    out = {}
    for k, arrs in decoded.items():
        x = np.empty((len(arrs), c, h, w), dtype=np.uint8)
        for i, (p, a) in enumerate(zip(splits[k], arrs, strict=True)):
            if a.shape[:2] != (h, w):
                raise EdgeError(f"{p}: image is {a.shape[1]}x{a.shape[0]} but {ref_path} is "
                                f"{w}x{h}; all images must have one size")
            x[i] = a.transpose(2, 0, 1) if a.ndim == 3 else a[None]
        out[k] = x
    return out


def _decode(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in _GRAY:
                return np.asarray(im.convert("L"))
            if im.mode in _RGB:
                return np.asarray(im.convert("RGB"))
            raise EdgeError(f"{path}: image mode {im.mode} is not supported (want 8-bit "
                            "grayscale or RGB)")
    except EdgeError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise EdgeError(f"{path}: cannot decode image: {e}") from None


# ----------------------------------------------------------------------------- ImageFolder


def image_folder_files(root: Path) -> tuple[tuple[str, ...], dict[str, list[Path]],
                                            dict[str, np.ndarray]]:
    """``root/{train,test}/<class>/*.png|jpg|jpeg`` -> (classes, files, labels) per split."""
    classes: tuple[str, ...] = ()
    files, labels = {}, {}
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            raise EdgeError(f"{d}: missing; an image folder needs train/<class>/ and "
                            "test/<class>/ subfolders")
        dirs = subdirs(d)
        names = tuple(p.name for p in dirs)
        if not dirs:
            raise EdgeError(f"{d}: holds no class folders; want {split}/<class>/*.png|jpg|jpeg")
        if split == "train":
            classes = names
        elif names != classes:
            lack, extra = sorted(set(classes) - set(names)), sorted(set(names) - set(classes))
            raise EdgeError(f"{d}: class folders differ from train/: missing {lack}, "
                            f"extra {extra}; both splits need the same classes")
        per_class = [images_in(p) for p in dirs]
        for p, f in zip(dirs, per_class, strict=True):
            if not f:
                raise EdgeError(f"{p}: holds no {'/'.join(IMAGE_SUFFIXES)} images")
        files[f"x_{split}"], labels[f"y_{split}"] = interleave(per_class)
    return classes, files, labels


# ----------------------------------------------------------------------------- Tiny ImageNet


def is_tiny_imagenet(root: Path) -> bool:
    return (root / "wnids.txt").is_file() and (root / "val" / "val_annotations.txt").is_file()


def tiny_imagenet_files(root: Path) -> tuple[tuple[str, ...], dict[str, list[Path]],
                                             dict[str, np.ndarray]]:
    """``wnids.txt``, ``train/<wnid>/images/*``, ``val/images`` + ``val_annotations.txt``
    (the val split serves as test) -> (classes, files, labels) per split."""
    listed = [s for s in (root / "wnids.txt").read_text().split() if s]
    if not listed or len(set(listed)) != len(listed):
        raise EdgeError(f"{root / 'wnids.txt'}: want one distinct wnid per line, got "
                        f"{len(listed)} lines, {len(set(listed))} distinct")
    wnids = tuple(sorted(listed))
    train = root / "train"
    if not train.is_dir():
        raise EdgeError(f"{train}: missing; want train/<wnid>/images/*.JPEG")
    extra = sorted({p.name for p in subdirs(train)} - set(wnids))
    if extra:
        raise EdgeError(f"{train}: folders {extra[:3]} are not in wnids.txt")
    per_class = []
    for w in wnids:
        d = train / w / "images"
        f = images_in(d) if d.is_dir() else []
        if not f:
            raise EdgeError(f"{d}: holds no images for wnid {w} listed in wnids.txt")
        per_class.append(f)
    files, labels = {}, {}
    files["x_train"], labels["y_train"] = interleave(per_class)
    ann = root / "val" / "val_annotations.txt"
    index = {w: i for i, w in enumerate(wnids)}
    val_files, val_labels, seen = [], [], set()
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise EdgeError(f"{ann}: line {n}: want 'file<TAB>wnid...' with a wnid from "
                            f"wnids.txt, got {line[:60]!r}")
        p = root / "val" / "images" / parts[0]
        if parts[0] in seen or not p.is_file():
            why = "is listed twice" if parts[0] in seen else "does not exist"
            raise EdgeError(f"{ann}: line {n}: image {p} {why}")
        seen.add(parts[0])
        val_files.append(p)
        val_labels.append(index[parts[1]])
    if not val_files:
        raise EdgeError(f"{ann}: lists no images; the val split is empty")
    order = sorted(range(len(val_files)), key=lambda i: val_files[i].name)
    files["x_test"] = [val_files[i] for i in order]
    labels["y_test"] = np.asarray([val_labels[i] for i in order], dtype=np.int64)
    return wnids, files, labels
