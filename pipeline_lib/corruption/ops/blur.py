"""Blur corruptions: Gaussian, defocus, glass, motion, zoom."""

from __future__ import annotations

import cv2
import numpy as np

from . import filters
from .base import Rngs, corruption, draw, per_image, to_uint8


@corruption("gaussian_blur", [0.4, 0.6, 0.7, 0.8, 1.0], stochastic=False, monotone=True)
def gaussian_blur(x: np.ndarray, sigma: float, rngs: Rngs) -> np.ndarray:
    return filters.gaussian(x, sigma)


@corruption("defocus_blur", [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
            stochastic=False, monotone=True)
def defocus_blur(x: np.ndarray, c: tuple[float, float], rngs: Rngs) -> np.ndarray:
    """Correlation with an anti-aliased disk of radius c[0] (OpenCV filter2D, reflect-101 border)."""
    kernel = filters.disk_kernel(radius=c[0], alias_blur=c[1])
    return per_image(lambda img: cv2.filter2D(img, -1, kernel), x)


@corruption("glass_blur", [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
            stochastic=True, monotone=False)
def glass_blur(x: np.ndarray, c: tuple[float, int, int], rngs: Rngs) -> np.ndarray:
    """Blur (sigma c[0]), quantise, locally shuffle pixels c[2] times, blur again.

    The shuffle visits rows and columns from the far edge inwards and swaps each pixel
    with a neighbour offset by randint(-delta, delta) (numpy's exclusive upper bound,
    as in CIFAR-C: the neighbour is always up or left for delta = 1). The visit order
    is sequential within an image, so the loop runs over positions, vectorised over images.
    """
    sigma, delta, iterations = c
    n, h, w, _ = x.shape
    img = to_uint8(filters.gaussian(x, sigma))
    rows, cols = range(h - delta, delta, -1), range(w - delta, delta, -1)
    offsets = draw(rngs, lambda r: r.integers(-delta, delta, size=(iterations, len(rows), len(cols), 2)))
    batch = np.arange(n)
    for it in range(iterations):
        for a, row in enumerate(rows):
            for b, col in enumerate(cols):
                dx, dy = offsets[:, it, a, b, 0], offsets[:, it, a, b, 1]
                src = img[batch, row, col].copy()
                img[batch, row, col] = img[batch, row + dy, col + dx]
                img[batch, row + dy, col + dx] = src
    return filters.gaussian(img.astype(np.float32) / 255.0, sigma)


@corruption("motion_blur", [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)], stochastic=True, monotone=True,
            differs="ImageMagick's motion blur (via Wand) re-implemented in NumPy: same kernel, "
                    "float arithmetic instead of ImageMagick's 8-bit PNG round trip")
def motion_blur(x: np.ndarray, c: tuple[float, float], rngs: Rngs) -> np.ndarray:
    """Directional blur (radius c[0], sigma c[1]) at a random angle in [-45, 45) degrees."""
    angles = draw(rngs, lambda r: r.uniform(-45, 45))
    return filters.motion_blur(x, c[0], c[1], angles)


@corruption("zoom_blur", [1.06, 1.11, 1.16, 1.21, 1.26], stochastic=False, monotone=True)
def zoom_blur(x: np.ndarray, max_factor: float, rngs: Rngs) -> np.ndarray:
    """Average of the image and its centre zooms by 1, 1.01, ... < max_factor.

    The factors come from np.arange(1, max_factor, 0.01) as in CIFAR-C, float
    endpoint included: 7, 12, 16, 21 and 26 zooms for severities 1..5.
    """
    factors = np.arange(1, max_factor, 0.01)
    out = np.zeros_like(x)
    for factor in factors:
        out += filters.clipped_zoom(x, factor)
    return (x + out) / (len(factors) + 1)
