"""Augmentations that make sharp drone chips look as satellites see them (used by ``training``).

Each function takes one chip ``x`` (H, W, bands) float32 in raw pixel units, the per-band value
range ``lo``/``hi`` of the training data and a numpy ``Generator``, and returns a new chip of the
same shape; geometric ones take the labels ``y`` (H, W) too and move them with the pixels.

- :func:`sensor_look`: the chip seen by a coarser sensor: blurred by a Gaussian point-spread
  function and sampled ``factor`` times coarser (so a 0.3 m chip looks like 0.3 x factor m imagery),
  with sensor noise and, on half the chips, JPEG compression at that coarse resolution, then brought
  back to the chip's grid (as predict brings coarse imagery to the model's GSD).
- :func:`haze`: a veil of scattered light: ``x (1 - a) + a * airlight``.
- :func:`off_nadir`: an oblique view: a shear and a compression along a random direction.
- :func:`pan_vegetation`: a panchromatic band in which vegetation is bright, as in WorldView pan
  (whose band reaches into the near infrared): luminance plus an excess-green vegetation score.
"""

from __future__ import annotations

import io
import math

import numpy as np

__all__ = ["haze", "off_nadir", "pan_vegetation", "sensor_look"]


def _resize(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Linear resampling of a (H, W, bands) chip to ``rows`` x ``cols`` (pixel areas aligned)."""
    from scipy.ndimage import zoom

    h, w = x.shape[:2]
    return zoom(x, (rows / h, cols / w, 1), order=1, mode="reflect", grid_mode=True)


def _jpeg(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, quality: int) -> np.ndarray:
    """JPEG-compress a chip at ``quality`` (8 bits, after scaling its value range to 0-255)."""
    from PIL import Image

    span = np.maximum(hi - lo, 1e-6)
    u8 = np.clip(np.round((x - lo) / span * 255.0), 0, 255).astype(np.uint8)
    bands = u8.shape[2]
    if bands in (1, 3):
        planes = [u8[..., 0] if bands == 1 else u8]
    else:
        planes = [u8[..., b] for b in range(bands)]
    out = []
    for plane in planes:
        buffer = io.BytesIO()
        Image.fromarray(plane).save(buffer, format="JPEG", quality=int(quality))
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32)
        out.append(decoded if decoded.ndim == 3 else decoded[..., None])
    return np.concatenate(out, axis=2) / 255.0 * span + lo


def sensor_look(x: np.ndarray, rng: np.random.Generator, *, max_factor: float, lo: np.ndarray,
                hi: np.ndarray) -> np.ndarray:
    """``x`` as a sensor ``factor`` times coarser would record it (factor log-uniform in
    [1.25, max_factor]): Gaussian PSF (sigma 0.5 x factor pixels), sampled down, noise of 0-2 % of
    the value range, JPEG (quality 30-90) on half the chips, sampled back up."""
    from scipy.ndimage import gaussian_filter

    h, w = x.shape[:2]
    factor = math.exp(rng.uniform(math.log(1.25), math.log(max(max_factor, 1.25))))
    sigma = 0.5 * factor
    soft = gaussian_filter(x, sigma=(sigma, sigma, 0), mode="reflect")
    small = _resize(soft, max(2, round(h / factor)), max(2, round(w / factor)))
    span = (hi - lo).astype(np.float32)
    small = small + rng.normal(0.0, 1.0, size=small.shape).astype(np.float32) * (rng.uniform(0, 0.02) * span)
    if rng.random() < 0.5:
        small = _jpeg(small, lo, hi, int(rng.integers(30, 91)))
    return _resize(small.astype(np.float32), h, w).astype(np.float32)


def haze(x: np.ndarray, rng: np.random.Generator, *, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Blend the chip with a bright, slightly bluish airlight: ``a`` in [0.05, 0.4]."""
    a = rng.uniform(0.05, 0.4)
    airlight = lo + (hi - lo) * rng.uniform(0.7, 1.0)
    if x.shape[2] == 3:  # scattering is stronger in blue
        airlight = airlight * np.array([0.95, 0.98, 1.0], np.float32)
    return (x * (1 - a) + a * airlight).astype(np.float32)


def off_nadir(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, *, max_shear: float,
              ignore: int) -> tuple[np.ndarray, np.ndarray]:
    """Shear by up to ``max_shear`` and compress by up to the same fraction along a random
    direction, about the chip's centre; pixels and labels move together (labels nearest, and
    ``ignore`` where the view leaves the chip)."""
    from scipy.ndimage import affine_transform

    h, w = y.shape
    theta = rng.uniform(0, math.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    shear = np.array([[1.0, rng.uniform(-max_shear, max_shear)], [0.0, 1.0 / (1.0 - rng.uniform(0, max_shear))]])
    matrix = rot @ shear @ rot.T  # output (row, col) -> input (row, col), about the centre
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = centre - matrix @ centre
    out = np.empty_like(x)
    for b in range(x.shape[2]):
        out[..., b] = affine_transform(x[..., b], matrix, offset=offset, order=1, mode="reflect")
    labels = affine_transform(y.astype(np.int32), matrix, offset=offset, order=0, mode="constant", cval=ignore)
    return out, labels.astype(y.dtype)


def pan_vegetation(x: np.ndarray, rng: np.random.Generator, *, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """An RGB chip turned into one panchromatic band, repeated to every band, in which vegetation is
    bright: luminance plus ``k`` (0.5-1.5) times the excess-green score ``max(0, 2g - r - b)``."""
    r, g, b = (x[..., i] for i in range(3))
    lum = 0.299 * r + 0.587 * g + 0.114 * b
    veg = np.maximum(0.0, 2 * g - r - b)
    pan = lum + rng.uniform(0.5, 1.5) * veg
    pan = np.minimum(pan, float(np.max(hi)))
    return np.repeat(pan[..., None], x.shape[2], axis=2).astype(np.float32)
