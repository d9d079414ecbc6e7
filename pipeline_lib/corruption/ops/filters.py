"""Filters and textures the corruptions share, batched over images.

Re-implementations of make_cifar_c.py's helpers (disk kernel, clipped zoom, plasma
fractal) and of the two pieces it took from outside Python: ImageMagick's motion blur
(through Wand) and the frost photographs shipped with the original repository.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage

from .base import Rngs, draw


def gaussian(x: np.ndarray, sigma: float, *, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian over the spatial axes of (N, H, W[, C]) images, all at once.

    scikit-image calls scipy's gaussian_filter with mode 'nearest' and truncate 4 by
    default; a zero sigma on the batch and channel axes keeps images and channels apart.
    """
    sigmas = (0.0, sigma, sigma) + (0.0,) * (x.ndim - 3)
    return ndimage.gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c.py's defocus kernel: a normalised aliased disk smoothed by OpenCV's 3x3
    (5x5 beyond radius 8) Gaussian, then cropped to its non-zero support (same result, cheaper)."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), (3, 3)
    else:
        grid, ksize = np.arange(-radius, radius + 1), (5, 5)
    xx, yy = np.meshgrid(grid, grid)
    disk = np.asarray(xx**2 + yy**2 <= radius**2, dtype=np.float32)
    disk /= disk.sum()
    kernel = cv2.GaussianBlur(disk, ksize=ksize, sigmaX=alias_blur)
    centre = kernel.shape[0] // 2
    rows, cols = np.nonzero(kernel)
    reach = int(max(np.abs(rows - centre).max(), np.abs(cols - centre).max()))
    return kernel[centre - reach: centre + reach + 1, centre - reach: centre + reach + 1]


def motion_blur(x: np.ndarray, radius: float, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """ImageMagick's MotionBlurImage (what CIFAR-C called through Wand), one angle per image.

    A one-sided line kernel: width = 2 * ceil(radius) + 1 taps, tap i weighted
    exp(-i^2 / (2 sigma^2)) (normalised) and placed i pixels along the angle, rounded
    the way ImageMagick rounds (ceil(v - 0.5)); pixels beyond the border repeat the edge
    (ImageMagick's default virtual-pixel method). x: (N, H, W, C) -> same shape.
    """
    n, h, w, _ = x.shape
    width = int(2 * math.ceil(radius) + 1)
    taps = np.arange(width)
    weights = np.exp(-(taps.astype(np.float64) ** 2) / (2.0 * max(sigma, 1e-12) ** 2))
    weights /= weights.sum()
    theta = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))[:, None]          # (N, 1)
    dx = np.ceil(taps[None, :] * np.cos(theta) - 0.5).astype(np.intp)              # (N, T) column offsets
    dy = np.ceil(taps[None, :] * np.sin(theta) - 0.5).astype(np.intp)              # (N, T) row offsets
    batch = np.arange(n)[:, None, None]
    out = np.zeros_like(x)
    for t in range(width):
        rows = np.clip(np.arange(h)[None, :] + dy[:, t:t + 1], 0, h - 1)             # (N, H)
        cols = np.clip(np.arange(w)[None, :] + dx[:, t:t + 1], 0, w - 1)             # (N, W)
        out += np.float32(weights[t]) * x[batch, rows[:, :, None], cols[:, None, :]]
    return out


def _zoom_matrix(size: int, factor: float) -> np.ndarray:
    """(size, size) linear map: crop the centre ceil(size / factor) pixels, zoom them by `factor`
    with scipy.ndimage.zoom's order-1 rule (corner-aligned: output o samples input
    o * (c - 1) / (out - 1), out = round(c * factor)), and trim the centre `size` pixels."""
    c = int(np.ceil(size / factor))
    top = (size - c) // 2
    out = int(round(c * factor))
    trim = (out - size) // 2
    src = np.arange(trim, trim + size) * ((c - 1) / (out - 1) if out > 1 else 0.0)
    lo = np.clip(np.floor(src).astype(np.intp), 0, c - 1)
    hi = np.minimum(lo + 1, c - 1)
    frac = src - lo
    matrix = np.zeros((size, size))
    np.add.at(matrix, (np.arange(size), top + lo), 1 - frac)
    np.add.at(matrix, (np.arange(size), top + hi), frac)
    return matrix


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """make_cifar_c.py's clipped_zoom of (N, H, W, C) images: zoom the centre by `factor`, crop to H x W.

    CIFAR-C calls scipy.ndimage.zoom (order 1) per image; bilinear zooming is separable,
    so it is done here as two small matrix products over the whole batch (same values
    to float precision, ~50x faster).
    """
    _, h, w, _ = x.shape
    rows = _zoom_matrix(h, factor).astype(x.dtype)
    cols = _zoom_matrix(w, factor).astype(x.dtype)
    planes = x.transpose(0, 3, 1, 2)                      # (N, C, H, W): batched BLAS matmuls
    return (rows @ planes @ cols.T).transpose(0, 2, 3, 1)


def bilinear_reflect(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample (N, H, W, C) images at float (N, H, W) positions, bilinearly, reflecting at the border.

    scipy.ndimage.map_coordinates(order=1, mode='reflect') on each image (the border
    reflected as d c b a | a b c d), as a batched gather.
    """
    n, h, w, c = x.shape

    def reflect(i: np.ndarray, size: int) -> np.ndarray:
        if i.min() < -size or i.max() >= 2 * size:   # far outside: fold the period first (rare)
            i = np.mod(i, 2 * size)
        return np.where(i < 0, -1 - i, np.where(i >= size, 2 * size - 1 - i, i))

    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = (rows - r0).astype(x.dtype)[..., None], (cols - c0).astype(x.dtype)[..., None]
    r0, c0 = r0.astype(np.intp), c0.astype(np.intp)
    base = (np.arange(n) * (h * w))[:, None, None]
    ra, rb = base + reflect(r0, h) * w, base + reflect(r0 + 1, h) * w
    ca, cb = reflect(c0, w), reflect(c0 + 1, w)
    flat = x.reshape(n * h * w, c)           # gather rows of a flat pixel table: faster than 3-D fancy indexing
    top = flat[ra + ca] * (1 - fc) + flat[ra + cb] * fc
    bottom = flat[rb + ca] * (1 - fc) + flat[rb + cb] * fc
    return top * (1 - fr) + bottom * fr


def plasma_fractal(rngs: Rngs, mapsize: int, wibble_decay: float) -> np.ndarray:
    """Diamond-square height maps, one per generator: (N, mapsize, mapsize) in [0, 1].

    make_cifar_c.py's algorithm, including its quirk that the random offset at each
    level is wibble * U(-wibble, wibble); `mapsize` must be a power of two.
    """
    if mapsize < 2 or mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two >= 2, got {mapsize}")
    n = len(rngs) if rngs is not None else 0
    maps = np.zeros((n, mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * draw(rngs, lambda r: r.uniform(-wibble, wibble, total.shape[1:]))

    while step >= 2:
        half = step // 2
        corners = maps[:, 0::step, 0::step]
        squares = corners + np.roll(corners, -1, axis=1)
        squares = squares + np.roll(squares, -1, axis=2)
        maps[:, half::step, half::step] = wibbled_mean(squares)
        centres, corners = maps[:, half::step, half::step], maps[:, 0::step, 0::step]
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        maps[:, 0::step, half::step] = wibbled_mean(left)
        top = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        maps[:, half::step, 0::step] = wibbled_mean(top)
        step, wibble = half, wibble / wibble_decay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


NEEDLE_DENSITY = 0.025   # fraction of pixels that seed a needle crystal


def frost_texture(rngs: Rngs, h: int, w: int) -> np.ndarray:
    """Procedural ice crystals, (N, H, W) in [0, 1]: the stand-in for CIFAR-C's frost photographs.

    CIFAR-C blends a random 32x32 crop of one of six frost photos (downscaled 5x). Those
    photos are not shipped here, so each image gets a texture with the same ingredients:
    a milky, patchy frost cover (smooth noise through a sigmoid), a network of thin
    bright crystal edges (zero crossings of band-passed noise) and needle crystals
    growing both ways from sparse seeds along the three axes of hexagonal ice (60 degrees
    apart, one random orientation per image), drawn with the motion-blur line kernel.
    """
    cover = gaussian(draw(rngs, lambda r: r.normal(size=(h, w))), 3.0, mode="wrap")
    cover = 1.0 / (1.0 + np.exp(-2.0 * cover / cover.std(axis=(1, 2), keepdims=True)))
    band = gaussian(draw(rngs, lambda r: r.normal(size=(h, w))), 1.0, mode="wrap")
    edges = np.exp(-((band / (0.3 * band.std(axis=(1, 2), keepdims=True))) ** 2))
    seeds = draw(rngs, lambda r: r.random((h, w)))      # u < NEEDLE_DENSITY: a seed; which third of it: its axis
    angle = draw(rngs, lambda r: r.uniform(0.0, 60.0))
    third = NEEDLE_DENSITY / 3
    needles = np.zeros((len(seeds), h, w, 1), dtype=np.float32)
    for axis in range(3):
        mask = ((seeds >= axis * third) & (seeds < (axis + 1) * third)).astype(np.float32)[..., None]
        for direction in (0.0, 180.0):
            needles += motion_blur(mask, radius=3, sigma=2, angles_deg=angle + 60.0 * axis + direction)
    needles = np.minimum(needles[..., 0] * 2.5, 1.0)
    # weights chosen by eye against the frost photographs' look: mean intensity ~0.4, full range used
    return np.clip(0.7 * cover + 0.35 * edges * cover + 0.5 * needles, 0.0, 1.0)
