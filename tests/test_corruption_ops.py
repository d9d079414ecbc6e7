"""Every CIFAR-C corruption on grey 28x28 and RGB 32x32 batches: shape, dtype, validity, change,
seeding, chunk independence and growth with severity where the parameter table is monotone."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline_lib.corruption.config import ALL, SEVERITIES
from pipeline_lib.corruption.generate import applicable, corrupt, generate
from pipeline_lib.corruption.ops import CORRUPTIONS
from pipeline_lib.corruption.ops.filters import bilinear_reflect, clipped_zoom, plasma_fractal

KINDS = {"grey28": (1, 28), "rgb32": (3, 32)}


def scene_batch(n: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (N, H, W, C) piecewise-smooth scenes, like photographs at this size: a shaded
    background, 3-5 ellipses or rectangles of random colour, faint fine texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.empty((n, size, size, channels))
    for i in range(n):
        tilt = rng.uniform(-0.2, 0.2, 2)
        img[i] = (0.35 + tilt[0] * yy + tilt[1] * xx)[..., None] * rng.uniform(0.6, 1.0, channels)
        for _ in range(rng.integers(3, 6)):
            cy, cx = rng.uniform(0.15, 0.85, 2)
            ry, rx = rng.uniform(0.08, 0.3, 2)
            if rng.random() < 0.5:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            img[i][mask] = rng.uniform(0.1, 0.85, channels)
    img += 0.03 * ndimage.gaussian_filter(rng.standard_normal(img.shape), (0, 0.7, 0.7, 0))
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def batches() -> dict[str, np.ndarray]:
    return {kind: scene_batch(24, c, s, seed=1) for kind, (c, s) in KINDS.items()}


def cases() -> list[tuple[str, str]]:
    return [(name, kind) for name in ALL for kind in KINDS if applicable(name, KINDS[kind][0]) is None]


def test_all_nineteen_registered_and_only_saturate_needs_colour() -> None:
    assert sorted(CORRUPTIONS.names()) == sorted(ALL)
    assert [m for m in ALL if applicable(m, 1)] == ["saturate"]
    assert "saturation 0" in applicable("saturate", 1)
    assert all(applicable(m, 3) is None for m in ALL)


@pytest.mark.parametrize(("name", "kind"), cases())
def test_shape_dtype_validity_and_change(name: str, kind: str, batches: dict[str, np.ndarray]) -> None:
    x = batches[kind]
    op = CORRUPTIONS.get(name)
    for s in SEVERITIES:
        raw = op.apply(x.astype(np.float32) / 255, op.table[s - 1],
                       [np.random.default_rng(i) for i in range(len(x))] if op.stochastic else None)
        assert raw.shape == x.shape and np.isfinite(raw).all(), f"{name} s{s}: raw output shape/NaN"
        assert raw.min() > -1.0 and raw.max() < 2.0, f"{name} s{s}: raw output far outside [0, 1]"
        out = corrupt(x, name, s, seed=0)
        assert out.shape == x.shape and out.dtype == np.uint8
        assert (out != x).any(), f"{name} severity {s} left every image unchanged"
    changed = (corrupt(x, name, 5, seed=0) != x).reshape(len(x), -1).any(axis=1)
    assert changed.mean() > 0.5, f"{name} severity 5 changed only {changed.sum()} of {len(x)} images"


@pytest.mark.parametrize(("name", "kind"), cases())
def test_seeded_and_independent_of_chunking(name: str, kind: str, batches: dict[str, np.ndarray]) -> None:
    x = batches[kind][:10]
    whole = corrupt(x, name, 3, seed=7)
    np.testing.assert_array_equal(whole, corrupt(x, name, 3, seed=7))
    np.testing.assert_array_equal(whole[4:9], corrupt(x[4:9], name, 3, seed=7, indices=range(4, 9)))
    if CORRUPTIONS.get(name).stochastic:
        assert (corrupt(x, name, 3, seed=8) != whole).any(), f"{name}: the seed changes nothing"
        assert (corrupt(x[4:9], name, 3, seed=7) != whole[4:9]).any(), f"{name}: image index not in the seed"


MONOTONE = [(name, kind) for name, kind in cases() if CORRUPTIONS.get(name).monotone]


@pytest.mark.parametrize(("name", "kind"), MONOTONE)
def test_distortion_grows_with_severity(name: str, kind: str, batches: dict[str, np.ndarray]) -> None:
    """Mean absolute change from the clean image: never falls by more than 5% of the severity-5
    value from one severity to the next (two table rows can be nearly equal, e.g. motion
    blur (6, 2) -> (8, 2), and random draws differ per severity), and severity 5 clearly exceeds 1."""
    x = batches[kind]
    dist = [np.abs(corrupt(x, name, s, seed=0).astype(np.float64) - x).mean() for s in SEVERITIES]
    for s in range(1, len(SEVERITIES)):
        assert dist[s] >= dist[s - 1] - 0.05 * dist[-1], f"{name}: distortion per severity {np.round(dist, 2)}"
    assert dist[-1] > 1.15 * dist[0], f"{name}: distortion per severity {np.round(dist, 2)}"


def test_monotone_flags_follow_the_tables() -> None:
    flagged = {m for m in ALL if CORRUPTIONS.get(m).monotone}
    # non-monotone tables: a parameter moves against severity somewhere
    assert flagged.isdisjoint({"glass_blur", "snow", "frost", "elastic_transform", "spatter", "saturate"})
    assert {"gaussian_noise", "shot_noise", "contrast", "jpeg_compression", "fog", "zoom_blur"} <= flagged


def test_bad_input_is_rejected_before_work(batches: dict[str, np.ndarray]) -> None:
    x = batches["grey28"]
    with pytest.raises(ValueError, match="uint8"):
        corrupt(x.astype(np.float32), "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "fog", 6)
    with pytest.raises(KeyError, match="unknown corruption"):
        corrupt(x, "rain", 1)
    with pytest.raises(ValueError, match="saturation"):
        corrupt(x, "saturate", 1)


def test_generate_layout_and_skips(batches: dict[str, np.ndarray]) -> None:
    x = batches["grey28"][:6]
    made = generate(x, ["contrast", "saturate", "fog"], seed=3, progress=False)
    assert list(made.arrays) == ["contrast", "fog"] and list(made.skipped) == ["saturate"]
    for name, arr in made.arrays.items():
        assert arr.shape == (5 * 6, 28, 28, 1)
        for s in SEVERITIES:   # severity s in rows [(s-1) n, s n)
            np.testing.assert_array_equal(arr[(s - 1) * 6: s * 6], corrupt(x, name, s, seed=3))
    again = generate(x, ["fog"], seed=3, chunk=4, progress=False)   # other chunking, same bytes
    np.testing.assert_array_equal(again.arrays["fog"], made.arrays["fog"])


def test_batched_helpers_match_scipy_per_image() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 28, 30, 2)).astype(np.float32)
    for factor in (1.0, 1.07, 1.25):
        zoomed = clipped_zoom(x, factor)
        for i in range(3):
            h, w = 28, 30
            ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
            top, left = (h - ch) // 2, (w - cw) // 2
            z = ndimage.zoom(x[i, top:top + ch, left:left + cw], (factor, factor, 1), order=1)
            th, tw = (z.shape[0] - h) // 2, (z.shape[1] - w) // 2
            np.testing.assert_allclose(zoomed[i], z[th:th + h, tw:tw + w], atol=1e-5)
    rows = rng.uniform(-4, 31, (3, 28, 30))
    cols = rng.uniform(-4, 33, (3, 28, 30))
    sampled = bilinear_reflect(x, rows, cols)
    for i in range(3):
        for c in range(2):
            ref = ndimage.map_coordinates(x[i, :, :, c], [rows[i], cols[i]], order=1, mode="reflect")
            np.testing.assert_allclose(sampled[i, :, :, c], ref, atol=1e-5)


def test_plasma_fractal_is_normalised_and_seeded() -> None:
    maps = plasma_fractal([np.random.default_rng(i) for i in (0, 1, 0)], 32, 2.0)
    assert maps.shape == (3, 32, 32)
    assert np.allclose(maps.min(axis=(1, 2)), 0) and np.allclose(maps.max(axis=(1, 2)), 1)
    np.testing.assert_array_equal(maps[0], maps[2])
    assert not np.array_equal(maps[0], maps[1])
    with pytest.raises(ValueError, match="power of two"):
        plasma_fractal([np.random.default_rng(0)], 28, 2.0)
