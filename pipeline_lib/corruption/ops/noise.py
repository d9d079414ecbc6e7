"""Noise corruptions: Gaussian, shot (Poisson), impulse (salt and pepper), speckle."""

from __future__ import annotations

import numpy as np
from skimage.util import random_noise

from .base import Rngs, corruption, draw


@corruption("gaussian_noise", [0.04, 0.06, 0.08, 0.09, 0.10], stochastic=True, monotone=True)
def gaussian_noise(x: np.ndarray, sigma: float, rngs: Rngs) -> np.ndarray:
    """x + N(0, sigma^2) per pixel and channel."""
    return x + sigma * draw(rngs, lambda r: r.normal(size=x.shape[1:])).astype(np.float32)


@corruption("shot_noise", [500, 250, 100, 75, 50], stochastic=True, monotone=True)
def shot_noise(x: np.ndarray, photons: float, rngs: Rngs) -> np.ndarray:
    """Poisson(x * lambda) / lambda: fewer photons (smaller lambda) is noisier."""
    assert rngs is not None
    return np.stack([r.poisson(xi * photons) for r, xi in zip(rngs, x, strict=True)]).astype(np.float32) / photons


@corruption("impulse_noise", [0.01, 0.02, 0.03, 0.05, 0.07], stochastic=True, monotone=True)
def impulse_noise(x: np.ndarray, amount: float, rngs: Rngs) -> np.ndarray:
    """scikit-image's salt-and-pepper noise: a fraction `amount` of values set to 0 or 1."""
    assert rngs is not None
    return np.stack([random_noise(xi, mode="s&p", amount=amount, rng=r)
                     for r, xi in zip(rngs, x, strict=True)]).astype(np.float32)


@corruption("speckle_noise", [0.06, 0.10, 0.12, 0.16, 0.20], stochastic=True, monotone=True)
def speckle_noise(x: np.ndarray, sigma: float, rngs: Rngs) -> np.ndarray:
    """Multiplicative noise x + x * N(0, sigma^2)."""
    return x + x * sigma * draw(rngs, lambda r: r.normal(size=x.shape[1:])).astype(np.float32)
