"""Tests for edge.data's views: reproducibility, exact special cases, the "edge" preset's
unchanged random stream, the "paper" preset, batched blur, and fitting to the data's shape."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.data import (
    MIN_CROP_PIXELS,
    PAPER,
    VIEW_PRESETS,
    ViewConfig,
    default_views,
    load,
    to_float,
    two_views,
    view_config,
)
from edge.data.views import _blur, blur_size
from edge.errors import EdgeError

MEAN3, STD3 = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _batch(n: int = 16, c: int = 3, hw: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, hw, hw), generator=g, dtype=torch.uint8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_views_reproducible_and_distinct() -> None:
    x = _batch()
    for cfg in (ViewConfig(), PAPER):
        a1, b1 = two_views(x, _gen(0), cfg, MEAN3, STD3)
        a2, b2 = two_views(x, _gen(0), cfg, MEAN3, STD3)
        a3, _ = two_views(x, _gen(1), cfg, MEAN3, STD3)
        assert a1.shape == x.shape and a1.dtype == torch.float32 and b1.shape == x.shape
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
        assert not torch.allclose(a1, a3) and not torch.allclose(a1, b1)


@pytest.mark.parametrize(("c", "hw", "cfg", "want"), [
    (1, 8, default_views("digits"), (-28.054679369088262, -30.913757455302402,
                                     6.709628646960482)),
    (3, 32, default_views("cifar10"), (-2146.8015769387807, -2283.873144708147,
                                       -423.9606699294818)),
])
def test_edge_views_unchanged(c: int, hw: int, cfg: ViewConfig,
                              want: tuple[float, float, float]) -> None:
    """Checksums of the views the defaults gave before presets and blur existed (same
    generator): the random stream and the arithmetic are unchanged, so results keep
    their meaning. Two calls on one generator also pin the number of draws."""
    x = torch.randint(0, 256, (8, c, hw, hw), generator=_gen(1), dtype=torch.uint8)
    gen = _gen(5)
    a, b = two_views(x, gen, cfg, (0.5,) * c, (0.25,) * c)
    _, b2 = two_views(x, gen, cfg, (0.5,) * c, (0.25,) * c)
    w = torch.arange(a.numel()).reshape(a.shape).double() / a.numel()
    got = tuple(float((v.double() * w).sum()) for v in (a, b, b2))
    assert got == pytest.approx(want, abs=1e-3)


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
    assert cfg.flip_p == 0.0 and cfg.crop_scale == (0.5, 1.0) and cfg.blur_p == 0.0
    assert default_views("cifar10") == ViewConfig()
    assert view_config("edge", ds) == cfg and view_config("digits") == cfg
    assert view_config("edge", (3, 32, 32)) == ViewConfig()
    a, b = two_views(ds.x_train, _gen(0), cfg, ds.mean, ds.std)
    assert a.shape == (32, 1, 8, 8) and torch.isfinite(a).all() and not torch.equal(a, b)


def test_paper_preset() -> None:
    assert VIEW_PRESETS == ("edge", "paper")
    p = view_config("paper", (3, 96, 96))
    assert p == PAPER and p.crop_scale == (0.25, 1.0) and p.flip_p == 0.5
    assert (p.jitter_p, p.brightness, p.contrast, p.saturation, p.hue) == (0.8, 0.8, 0.8,
                                                                           0.8, 0.2)
    assert p.gray_p == 0.2 and p.blur_p == 1.0 and p.blur_sigma == (0.1, 2.0)
    assert blur_size(96, p.blur_kernel) == 9 and blur_size(64, 0.1) == 7
    assert blur_size(32, 0.1) == 3 and blur_size(28, 0.1) == 3 and blur_size(8, 0.1) == 1


def test_fit_to_shape() -> None:
    small = view_config("paper", (1, 8, 8))
    assert small.crop_scale == (MIN_CROP_PIXELS / 64, 1.0) == (0.5, 1.0)
    assert small.saturation == small.hue == small.gray_p == 0.0 and small.brightness == 0.8
    assert view_config("paper", (1, 28, 28)).crop_scale == (0.25, 1.0)
    assert view_config("edge", (1, 5, 5)).crop_scale == (1.0, 1.0)
    gray = view_config("edge", (1, 28, 28))  # not the built-in mnist (no name): generic
    assert gray.flip_p == 0.5 and gray.gray_p == 0.0 and gray.crop_scale == (0.2, 1.0)
    ds = load("digits")
    assert view_config("paper", ds) == small


def test_view_config_errors() -> None:
    with pytest.raises(EdgeError, match="unknown views preset 'simclr'"):
        view_config("simclr", (3, 8, 8))
    with pytest.raises(EdgeError, match="needs the data set"):
        view_config("paper")
    with pytest.raises(EdgeError, match="flip_p must be a probability"):
        ViewConfig(flip_p=1.5)
    with pytest.raises(EdgeError, match="crop_scale"):
        ViewConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(EdgeError, match="finite"):
        ViewConfig(blur_p=math.nan)
    custom = ViewConfig(flip_p=0.1)
    assert view_config(custom, (3, 8, 8)) is custom


def test_blur_matches_dense_gaussian() -> None:
    """Per-image sigma, separable grouped conv == a dense 2-D Gaussian with reflect padding."""
    img = torch.rand(3, 2, 11, 9, generator=_gen(0))
    sigma = torch.tensor([0.3, 1.0, 2.0])
    out = _blur(img, sigma, 5, 3)
    for i, s in enumerate(sigma.tolist()):
        def g(k: int, s: float = s) -> torch.Tensor:
            t = torch.arange(k) - (k - 1) / 2
            v = torch.exp(-0.5 * (t / s) ** 2)
            return v / v.sum()
        kern = (g(5)[:, None] * g(3)[None]).expand(2, 1, 5, 3)
        ref = F.conv2d(F.pad(img[i:i + 1], (1, 1, 2, 2), mode="reflect"), kern, groups=2)
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-6, rtol=0)
    assert out[0].sub(img[0]).abs().max() < out[2].sub(img[2]).abs().max()  # wider blurs more


def test_blur_only_view() -> None:
    """With every other op off, a blur-always view is the blurred image: smoother, same
    mean-ish, and a constant image is unchanged."""
    cfg = ViewConfig(crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=1.0)
    x = _batch(n=8, hw=40)
    a, _ = two_views(x, _gen(0), cfg, (0.0,) * 3, (1.0,) * 3)
    raw = x.float() / 255
    tv = lambda v: v.diff(dim=-1).abs().mean()  # noqa: E731
    assert tv(a) < 0.8 * tv(raw)
    flat = torch.full((2, 3, 40, 40), 77, dtype=torch.uint8)
    b, _ = two_views(flat, _gen(0), cfg, (0.0,) * 3, (1.0,) * 3)
    torch.testing.assert_close(b, flat.float() / 255, atol=1e-6, rtol=0)
    off, _ = two_views(x, _gen(0), ViewConfig(crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                                               gray_p=0.0, blur_p=0.0), (0.0,) * 3, (1.0,) * 3)
    torch.testing.assert_close(off, raw, atol=1e-5, rtol=0)


def test_view_errors() -> None:
    with pytest.raises(EdgeError, match="uint8"):
        two_views(_batch().float(), _gen(0), ViewConfig(), MEAN3, STD3)
    with pytest.raises(EdgeError, match="mean/std"):
        two_views(_batch(), _gen(0), ViewConfig(), (0.5,), (0.2,))
    with pytest.raises(EdgeError, match="ViewConfig"):
        two_views(_batch(), _gen(0), "paper", MEAN3, STD3)  # type: ignore[arg-type]
    with pytest.raises(EdgeError, match="uint8"):
        to_float(torch.zeros(1, 1, 2, 2), ((0.0,), (1.0,)))
    with pytest.raises(EdgeError, match="1..4"):
        two_views(_batch(c=5), _gen(0), ViewConfig(), (0.5,) * 5, (0.2,) * 5)


@given(st.integers(0, 2**32), st.sampled_from([1, 2, 3, 4]), st.integers(1, 40),
       st.sampled_from(["edge", "paper"]))
@settings(max_examples=30, deadline=None)
def test_views_stay_in_range(seed: int, c: int, hw: int, preset: str) -> None:
    """Every augmented pixel is a valid [0,1] intensity before normalisation."""
    cfg = view_config(preset, (c, hw, hw))
    a, b = two_views(_batch(n=4, c=c, hw=hw, seed=seed % 7), _gen(seed), cfg,
                     (0.0,) * c, (1.0,) * c)
    for v in (a, b):
        assert v.shape == (4, c, hw, hw) and torch.isfinite(v).all()
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0 + 1e-6


def test_to_float_matches_dataset_stats() -> None:
    ds = load("digits")
    z = to_float(ds.x_train, ds)
    assert z.dtype == torch.float32
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(z.std()) == pytest.approx(1.0, abs=1e-3)
    assert to_float(ds.x_train[0], ds).shape == (1, 8, 8)
