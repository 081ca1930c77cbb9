"""Self-supervised views: SimCLR-style augmentations batched in torch, and named presets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from edge.data.dataset import Dataset, normalise
from edge.data.known import DATASETS, SHAPES
from edge.errors import EdgeError

VIEW_PRESETS: tuple[str, ...] = ("edge", "paper")
MIN_CROP_PIXELS = 32  # a crop keeps at least this many pixels of area (half an 8x8 digit)


@dataclass(frozen=True)
class ViewConfig:
    """Augmentation settings; the defaults are SimCLR's (Chen et al. 2020) without blur.

    ``blur_kernel`` is the Gaussian kernel's side as a fraction of the image side (floored,
    then made odd; a side under 3 pixels means no blur on that axis)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_kernel: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            vals = v if isinstance(v, tuple) else (v,)
            if not all(isinstance(a, int | float) and math.isfinite(a) for a in vals):
                raise EdgeError(f"ViewConfig: {f.name} must be finite numbers, got {v!r}")
        for k in ("flip_p", "jitter_p", "gray_p", "blur_p"):
            if not 0 <= getattr(self, k) <= 1:
                raise EdgeError(f"ViewConfig: {k} must be a probability in [0, 1], "
                                f"got {getattr(self, k)}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise EdgeError(f"ViewConfig: crop_scale must satisfy 0 < lo <= hi <= 1, "
                            f"got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise EdgeError(f"ViewConfig: crop_ratio must satisfy 0 < lo <= hi, "
                            f"got {self.crop_ratio}")
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            raise EdgeError("ViewConfig: brightness/contrast/saturation must be >= 0 and hue "
                            "in [0, 0.5]")
        if not 0 < self.blur_kernel <= 1 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise EdgeError(f"ViewConfig: blur_kernel must be in (0, 1] and blur_sigma "
                            f"0 < lo <= hi, got {self.blur_kernel}, {self.blur_sigma}")


PAPER = ViewConfig(crop_scale=(0.25, 1.0), flip_p=0.5, jitter_p=0.8, brightness=0.8,
                   contrast=0.8, saturation=0.8, hue=0.2, gray_p=0.2, blur_p=1.0,
                   blur_kernel=0.1, blur_sigma=(0.1, 2.0))


def default_views(name: str) -> ViewConfig:
    """Per-data-set presets: digits/MNIST keep more of the image (an 8x8 digit cropped to 20%
    is a couple of pixels) and are never mirrored (a mirrored 2 or 7 is not a digit)."""
    if name not in DATASETS:
        raise EdgeError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    if name == "cifar10":
        return ViewConfig()
    return ViewConfig(crop_scale=(0.5, 1.0), flip_p=0.0)


def view_config(preset: str | ViewConfig = "edge",
                data: Dataset | Sequence[int] | None = None) -> ViewConfig:
    """The views for ``preset`` fitted to ``data`` (a Dataset or its (C, H, W) shape).

    * a ViewConfig: returned as is.
    * a built-in data set name: :func:`default_views` of it.
    * ``"edge"``: for a built-in data set (by name, with its official shape) exactly
      :func:`default_views`; for other data SimCLR's defaults, fitted as below.
    * ``"paper"``: the CLAPP++ reference (arXiv 2601.21683) views, fitted as below.

    Fitting to the shape: the crop's lower area bound is raised so a crop keeps at least
    ``MIN_CROP_PIXELS`` pixels; for data without 3 channels saturation, hue and grayscale
    are off (they need colour; brightness and contrast still apply). The blur kernel follows
    the image side at view time.
    """
    if isinstance(preset, ViewConfig):
        return preset
    if preset in DATASETS:
        return default_views(preset)
    if preset not in VIEW_PRESETS:
        raise EdgeError(f"unknown views preset {preset!r}; choose one of: "
                        f"{', '.join(VIEW_PRESETS)} or a data set name ({', '.join(DATASETS)})")
    if data is None:
        raise EdgeError(f"views preset {preset!r} needs the data set (or its (C, H, W) shape)")
    shape = data.in_shape if isinstance(data, Dataset) else tuple(int(d) for d in data)
    if len(shape) != 3 or min(shape) < 1:
        raise EdgeError(f"view_config: want a (C, H, W) shape, got {shape}")
    if preset == "edge":
        name = data.name if isinstance(data, Dataset) else None
        if name in DATASETS and SHAPES[name] == shape:
            return default_views(name)
        return _fit(ViewConfig(), shape)
    return _fit(PAPER, shape)


def _fit(cfg: ViewConfig, shape: tuple[int, ...]) -> ViewConfig:
    c, h, w = shape
    lo = min(1.0, max(cfg.crop_scale[0], MIN_CROP_PIXELS / (h * w)))
    cfg = replace(cfg, crop_scale=(lo, max(lo, cfg.crop_scale[1])))
    if c != 3:
        cfg = replace(cfg, saturation=0.0, hue=0.0, gray_p=0.0)
    return cfg


def blur_size(side: int, frac: float) -> int:
    """Gaussian kernel side for an image side: floor(frac * side), made odd (1 = no blur)."""
    k = int(frac * side)
    return k + 1 - k % 2 if k >= 2 else 1


def two_views(x: torch.Tensor, gen: torch.Generator, views: ViewConfig,
              mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent augmented views of a uint8 batch, normalised float32, same shape.

    Every random number comes from ``gen`` in a fixed order, so the same generator state
    gives bit-identical views (on the same device and torch build).
    """
    if not isinstance(views, ViewConfig):
        raise EdgeError(f"two_views expects a ViewConfig (see view_config), got {views!r}")
    if x.dtype != torch.uint8 or x.ndim != 4 or not 1 <= x.shape[1] <= 4:
        raise EdgeError(f"two_views expects uint8 (N, 1..4, H, W), got "
                        f"{x.dtype}{tuple(x.shape)}")
    img = x.float() / 255.0
    return (normalise(_view(img, gen, views), mean, std, 1),
            normalise(_view(img, gen, views), mean, std, 1))


_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def _gray(img: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) -> (N,1,H,W) luma."""
    w = img.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (img * w).sum(1, keepdim=True)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, shape=()) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand((n, *shape), generator=gen, device=gen.device)


def _view(img: torch.Tensor, gen: torch.Generator, cfg: ViewConfig) -> torch.Tensor:
    """One view of a float [0,1] batch: crop+flip, colour jitter, grayscale, blur.

    Draws, always in this order and regardless of the config: 10 crop attempts (area scale,
    log aspect ratio), crop offsets, flip, jitter gate and its 4 factors, grayscale gate;
    then, only when ``blur_p > 0``, the blur gate and sigma (so configs without blur draw
    exactly what they drew before blur existed).
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
    if cfg.blur_p > 0:
        blur_gate = (_uniform(n, 0, 1, gen) < cfg.blur_p).to(dev)
        sigma = _uniform(n, *cfg.blur_sigma, gen).to(dev)
        kh, kw = blur_size(h, cfg.blur_kernel), blur_size(w, cfg.blur_kernel)
        if kh > 1 or kw > 1:
            out = torch.where(blur_gate.view(n, 1, 1, 1), _blur(out, sigma, kh, kw), out)
    return out


def _gauss(k: int, sigma: torch.Tensor) -> torch.Tensor:
    """(N,) sigmas -> (N, k) normalised 1-D Gaussian kernels (torchvision's formula)."""
    t = torch.arange(k, dtype=sigma.dtype, device=sigma.device) - (k - 1) / 2
    g = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    return g / g.sum(1, keepdim=True)


def _blur(img: torch.Tensor, sigma: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Separable per-image Gaussian blur with reflect padding, one grouped conv per axis."""
    n, c, h, w = img.shape
    x = img.reshape(1, n * c, h, w)
    if kh > 1:
        wt = _gauss(kh, sigma).repeat_interleave(c, 0).view(n * c, 1, kh, 1)
        x = F.conv2d(F.pad(x, (0, 0, kh // 2, kh // 2), mode="reflect"), wt, groups=n * c)
    if kw > 1:
        wt = _gauss(kw, sigma).repeat_interleave(c, 0).view(n * c, 1, 1, kw)
        x = F.conv2d(F.pad(x, (kw // 2, kw // 2, 0, 0), mode="reflect"), wt, groups=n * c)
    return x.view(n, c, h, w).clamp(0, 1)


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
