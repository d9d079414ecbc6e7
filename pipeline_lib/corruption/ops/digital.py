"""Digital corruptions: brightness, contrast, saturate, elastic transform, pixelate, JPEG."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image
from skimage.color import hsv2rgb, rgb2hsv

from . import filters
from .base import Rngs, corruption, draw, per_image, to_uint8


@corruption("brightness", [0.05, 0.1, 0.15, 0.2, 0.3], stochastic=False, monotone=True)
def brightness(x: np.ndarray, delta: float, rngs: Rngs) -> np.ndarray:
    """HSV value + delta. For a grey image V is the pixel itself, so this is clip(x + delta)."""
    if x.shape[-1] == 1:
        return np.clip(x + delta, 0, 1)
    hsv = rgb2hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + delta, 0, 1)
    return hsv2rgb(hsv)


@corruption("contrast", [0.75, 0.5, 0.4, 0.3, 0.15], stochastic=False, monotone=True)
def contrast(x: np.ndarray, factor: float, rngs: Rngs) -> np.ndarray:
    """Pull every channel towards its own image mean: (x - mean) * factor + mean."""
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * factor + means


@corruption("saturate", [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)], stochastic=False,
            monotone=False, needs_colour=True,
            skip_reason="saturate rescales HSV saturation; a grey image has saturation 0 everywhere, "
                        "so it would return the image unchanged")
def saturate(x: np.ndarray, c: tuple[float, float], rngs: Rngs) -> np.ndarray:
    """HSV saturation * c0 + c1."""
    hsv = rgb2hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
    return hsv2rgb(hsv)


# (alpha, sigma, affine jitter) as fractions of the image size (CIFAR-C: of 32 pixels)
ELASTIC = [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)]


@corruption("elastic_transform", ELASTIC, stochastic=True, monotone=False)
def elastic_transform(x: np.ndarray, c: tuple[float, float, float], rngs: Rngs) -> np.ndarray:
    """A random affine warp (3 anchor points jittered by +-c2, OpenCV) then a smooth random
    displacement field (uniform noise blurred by sigma c1, scaled by alpha c0; SciPy), both
    bilinear. Parameters scale with the image size as in CIFAR-C (size * fraction)."""
    _, h, w, _ = x.shape
    alpha, sigma, jitter = (v * h for v in c)
    centre = np.float32([w, h]) // 2
    half = min(h, w) // 3
    anchors = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    moved = draw(rngs, lambda r: anchors + r.uniform(-jitter, jitter, size=anchors.shape).astype(np.float32))
    shift_x = draw(rngs, lambda r: r.uniform(-1, 1, size=(h, w)))
    shift_y = draw(rngs, lambda r: r.uniform(-1, 1, size=(h, w)))
    warped = np.empty_like(x)
    for i in range(len(x)):
        matrix = cv2.getAffineTransform(anchors, moved[i])
        warped[i] = cv2.warpAffine(x[i], matrix, (w, h), borderMode=cv2.BORDER_REFLECT_101).reshape(x.shape[1:])
    dx = filters.gaussian(shift_x, sigma, mode="reflect", truncate=3) * alpha    # (N, H, W)
    dy = filters.gaussian(shift_y, sigma, mode="reflect", truncate=3) * alpha
    grid_y, grid_x = np.mgrid[0:h, 0:w]
    return filters.bilinear_reflect(warped, grid_y + dy, grid_x + dx)


@corruption("pixelate", [0.95, 0.9, 0.85, 0.75, 0.65], stochastic=False, monotone=True)
def pixelate(x: np.ndarray, scale: float, rngs: Rngs) -> np.ndarray:
    """Box-downsample to int(size * scale) and box-upsample back (Pillow)."""
    _, h, w, _ = x.shape
    small = (int(w * scale), int(h * scale))

    def one(img: np.ndarray) -> np.ndarray:
        pil = _to_pil(img)
        return np.asarray(pil.resize(small, Image.BOX).resize((w, h), Image.BOX))

    return per_image(one, to_uint8(x)).astype(np.float32) / 255.0


@corruption("jpeg_compression", [80, 65, 58, 50, 40], stochastic=False, monotone=True)
def jpeg_compression(x: np.ndarray, quality: int, rngs: Rngs) -> np.ndarray:
    """Encode and decode as JPEG at `quality` (Pillow's defaults otherwise, as in CIFAR-C)."""

    def one(img: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        _to_pil(img).save(buf, "JPEG", quality=quality)
        return np.asarray(Image.open(buf))

    return per_image(one, to_uint8(x)).astype(np.float32) / 255.0


def _to_pil(img: np.ndarray) -> Image.Image:
    """(H, W, 1) or (H, W, 3) uint8 -> a Pillow 'L' or 'RGB' image."""
    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
