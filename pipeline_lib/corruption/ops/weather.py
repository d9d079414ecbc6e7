"""Weather corruptions: snow, frost, fog, spatter."""

from __future__ import annotations

import cv2
import numpy as np

from . import filters
from .base import Rngs, colour, corruption, draw, grey

SNOW = [(0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)]


@corruption("snow", SNOW, stochastic=True, monotone=False,
            differs="the snowflake streaks use the NumPy re-implementation of ImageMagick's motion blur "
                    "(Wand in CIFAR-C); same kernel and angle range")
def snow(x: np.ndarray, c: tuple[float, ...], rngs: Rngs) -> np.ndarray:
    """Flakes: N(c0, c1) noise, zoomed by c2, thresholded at c3, streaked by a motion blur
    (radius c4, sigma c5, angle in [-135, -45)); the scene is whitened (blend c6) and both
    the flake layer and its 180-degree rotation are added."""
    loc, scale, zoom, threshold, radius, sigma, blend = c
    _, h, w, _ = x.shape
    flakes = draw(rngs, lambda r: r.normal(loc=loc, scale=scale, size=(h, w))).astype(np.float32)[..., None]
    flakes = filters.clipped_zoom(flakes, zoom)
    flakes[flakes < threshold] = 0
    # CIFAR-C passes the layer through an 8-bit greyscale PNG before and after ImageMagick.
    flakes = np.floor(np.clip(flakes, 0, 1) * 255) / 255
    angles = draw(rngs, lambda r: r.uniform(-135, -45))
    flakes = np.rint(filters.motion_blur(flakes, radius, sigma, angles) * 255) / 255
    x = blend * x + (1 - blend) * np.maximum(x, grey(x) * 1.5 + 0.5)
    return x + flakes + np.rot90(flakes, k=2, axes=(1, 2))


FROST_TINT = (0.84, 0.92, 1.0)  # pale blue-white, the hue of the frost photographs


@corruption("frost", [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
            stochastic=True, monotone=False,   # 3 -> 4 only lowers the image weight: darker, not more frosted
            differs="CIFAR-C blends crops of six frost photographs shipped with its code; these are replaced "
                    "by a procedural ice-crystal texture (patchy cover, crystal edges, needles) with the "
                    "same blend weights, so the look and the strength per severity are close, not identical")
def frost(x: np.ndarray, c: tuple[float, float], rngs: Rngs) -> np.ndarray:
    """c0 * x + c1 * frost layer."""
    _, h, w, channels = x.shape
    layer = filters.frost_texture(rngs, h, w)[..., None] * colour(FROST_TINT, channels)
    return c[0] * x + c[1] * layer


@corruption("fog", [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)], stochastic=True,
            monotone=True)
def fog(x: np.ndarray, c: tuple[float, float], rngs: Rngs) -> np.ndarray:
    """Add c0 * a plasma fractal (roughness decay c1), then rescale by max / (max + c0)."""
    _, h, w, _ = x.shape
    mapsize = 1 << max(1, (max(h, w) - 1).bit_length())   # the smallest power of two >= the image (32 for CIFAR)
    plasma = filters.plasma_fractal(rngs, mapsize, c[1])[:, :h, :w, None].astype(np.float32)
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + c[0] * plasma) * peak / (peak + c[0])


SPATTER = [(0.62, 0.1, 0.7, 0.7, 0.5, 0),
           (0.65, 0.1, 0.8, 0.7, 0.5, 0),
           (0.65, 0.3, 1, 0.69, 0.5, 0),
           (0.65, 0.1, 0.7, 0.69, 0.6, 1),
           (0.65, 0.1, 0.5, 0.68, 0.6, 1)]
WATER = (175 / 255, 238 / 255, 238 / 255)  # pale turquoise
MUD = (63 / 255, 42 / 255, 20 / 255)
RIPPLE = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float32)


def _water_mask(liquid: np.ndarray) -> np.ndarray:
    """CIFAR-C's water-drop shading of one (H, W) liquid layer in [0, 1], with OpenCV as there."""
    layer = np.clip(liquid * 255, 0, 255).astype(np.uint8)
    dist = cv2.distanceTransform(255 - cv2.Canny(layer, 50, 150), cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
    dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, RIPPLE), (3, 3)).astype(np.float32)
    mask = layer.astype(np.float32) * dist
    peak = mask.max()
    return mask / peak if peak > 0 else mask  # CIFAR-C divides by zero here (NaN) when no drop survives


@corruption("spatter", SPATTER, stochastic=True, monotone=False,
            differs="grey images get the luma of the water and mud colours")
def spatter(x: np.ndarray, c: tuple[float, ...], rngs: Rngs) -> np.ndarray:
    """Drops of water (severities 1-3) or mud (4-5) from thresholded, blurred N(c0, c1) noise."""
    loc, scale, sigma, threshold, strength, mud = c
    _, h, w, channels = x.shape
    liquid = filters.gaussian(draw(rngs, lambda r: r.normal(loc=loc, scale=scale, size=(h, w))), sigma)
    liquid[liquid < threshold] = 0
    if not mud:
        mask = np.stack([_water_mask(layer) for layer in liquid])[..., None] * strength
        return x + mask * colour(WATER, channels)
    mask = filters.gaussian((liquid > threshold).astype(np.float32), strength)[..., None]
    mask[mask < 0.8] = 0
    return x * (1 - mask) + colour(MUD, channels) * mask
