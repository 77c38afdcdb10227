"""Quick looks: a PNG of a class (or change) raster over its scene, with a legend and a scale bar.

``write_preview(png, scene, overlay, ...)`` reads both rasters shrunk to at most ``max_size``
pixels on the long side, strip by strip (each strip reads at most about 32 M source values), so a
32768 x 32768 scene costs the picture's memory, not the scene's. The scene is averaged and
stretched from its 2-98 % values per band (one band is shown gray); the overlay is read by nearest
neighbour, its classes drawn in their colours at half opacity with full-colour edges, its
background classes (and "no change") not at all, so the imagery shows. A legend names the classes
that appear; a scale bar gives metres (or kilometres) on the ground.

Used by ``geoseg predict --preview`` and ``geoseg change --preview``; the batch report
(``geoseg.report``) shows these pictures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Container, Sequence
from pathlib import Path

import numpy as np

from geoseg.errors import InputError, OutputError

__all__ = ["MAX_SIZE", "preview_shape", "write_preview"]

#: The long side of a preview, in pixels.
MAX_SIZE = 2048
#: Source values (rows x columns x bands) read per strip at most.
_STRIP_VALUES = 32 * 2**20
_FILL_ALPHA = 0.5
_NODATA_GRAY = 40


def preview_shape(height: int, width: int, max_size: int = MAX_SIZE) -> tuple[int, int]:
    """(rows, columns) of the preview of a ``height`` x ``width`` raster: shrunk by one factor so the
    long side is at most ``max_size``, never enlarged."""
    if max_size < 16:
        raise InputError(f"a preview needs at least 16 pixels on its long side, got {max_size}")
    factor = max(1.0, max(height, width) / max_size)
    return max(1, round(height / factor)), max(1, round(width / factor))


def _read_shrunk(ds, indexes: Sequence[int], window, out_rows: int, out_cols: int, resampling, *,
                 masks: bool = False) -> np.ndarray:
    """``ds`` bands (or with ``masks``, their validity masks) over ``window`` shrunk to out_rows x
    out_cols, read in strips of output rows, so at most about ``_STRIP_VALUES`` source values at once."""
    from rasterio.windows import Window

    rows_per_out = window.height / out_rows
    per_row = max(1.0, window.width * len(indexes) * rows_per_out)
    step = max(1, int(_STRIP_VALUES // per_row))
    out = np.zeros((len(indexes), out_rows, out_cols), np.uint8 if masks else np.float32)
    for r0 in range(0, out_rows, step):
        r1 = min(out_rows, r0 + step)
        src = Window(window.col_off, window.row_off + r0 * rows_per_out, window.width, (r1 - r0) * rows_per_out)
        shape = (len(indexes), r1 - r0, out_cols)
        if masks:
            out[:, r0:r1] = ds.read_masks(list(indexes), window=src, out_shape=shape, resampling=resampling,
                                          boundless=True)
        else:
            out[:, r0:r1] = ds.read(list(indexes), window=src, out_shape=shape, resampling=resampling,
                                    boundless=True, fill_value=0, out_dtype="float32")
    return out


def _stretch(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per band, 2-98 % of the valid values onto 0-255 (uint8, bands last)."""
    out = np.zeros(image.shape[1:] + (image.shape[0],), np.uint8)
    for b, band in enumerate(image):
        values = band[valid]
        if not values.size:
            continue
        lo, hi = np.percentile(values, [2, 98])
        hi = hi if hi > lo else lo + 1
        out[..., b] = np.clip((band - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)
    return out


def _scene_rgb(scene: str | os.PathLike, overlay_ds, bands: Sequence[int] | None, rows: int, cols: int) -> np.ndarray:
    """The scene under the overlay's extent, shrunk and stretched: (rows, cols, 3) uint8."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import from_bounds

    with rasterio.open(scene) as src:
        ds = src if src.crs == overlay_ds.crs or src.crs is None else WarpedVRT(src, crs=overlay_ds.crs)
        try:
            indexes = list(bands) if bands else [b for b in range(1, ds.count + 1)
                                                 if ds.colorinterp[b - 1].name != "alpha"][:3]
            window = from_bounds(*overlay_ds.bounds, transform=ds.transform)
            image = _read_shrunk(ds, indexes[:3], window, rows, cols, Resampling.average)
            valid = _read_shrunk(ds, indexes[:1], window, rows, cols, Resampling.nearest, masks=True)[0] > 0
        finally:
            if ds is not src:
                ds.close()
    rgb = _stretch(image, valid)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    elif rgb.shape[2] == 2:
        rgb = np.concatenate([rgb, rgb[..., :1]], axis=2)
    rgb[~valid] = _NODATA_GRAY
    return rgb


def _edges(ids: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another id."""
    edge = np.zeros(ids.shape, bool)
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    edge[:, 1:] |= ids[:, :-1] != ids[:, 1:]
    edge[1:, :] |= ids[:-1, :] != ids[1:, :]
    return edge


def _nice_length(metres: float) -> float:
    """The largest 1, 2 or 5 x 10^k not above ``metres``."""
    if metres <= 0:
        return 0.0
    k = 10 ** math.floor(math.log10(metres))
    return max(m * k for m in (1, 2, 5) if m * k <= metres)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _legend_and_scale(image, entries: Sequence[tuple[str, tuple[int, int, int]]], metres_per_px: float | None) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image, "RGBA")
    w, h = image.size
    size = max(12, min(24, w // 60))
    font = _font(size)
    if entries:
        pad, swatch = size // 2, size
        widths = [draw.textlength(name, font=font) for name, _ in entries]
        box_w = int(pad * 3 + swatch + max(widths))
        box_h = int(pad + len(entries) * (swatch + pad))
        draw.rectangle([pad, pad, pad + box_w, pad + box_h], fill=(255, 255, 255, 210), outline=(0, 0, 0, 255))
        y = 2 * pad
        for name, color in entries:
            draw.rectangle([2 * pad, y, 2 * pad + swatch, y + swatch], fill=tuple(color) + (255,), outline=(0, 0, 0, 255))
            draw.text((3 * pad + swatch, y - 1), name, fill=(0, 0, 0, 255), font=font)
            y += swatch + pad
    if metres_per_px and metres_per_px > 0:
        length_m = _nice_length(metres_per_px * w / 5)
        if length_m > 0:
            bar = max(1, int(round(length_m / metres_per_px)))
            label = f"{length_m / 1000:g} km" if length_m >= 1000 else f"{length_m:g} m"
            x1, y1 = w - size, h - size
            x0 = x1 - bar
            text_w = draw.textlength(label, font=font)
            draw.rectangle([x0 - size // 2, y1 - 2 * size - 4, x1 + size // 2, y1 + size // 2],
                           fill=(255, 255, 255, 210))
            draw.rectangle([x0, y1 - size // 3, x1, y1], fill=(0, 0, 0, 255))
            draw.text((x0 + (bar - text_w) / 2, y1 - 2 * size), label, fill=(0, 0, 0, 255), font=font)


def write_preview(png: str | os.PathLike, scene: str | os.PathLike, overlay: str | os.PathLike, *,
                  class_names: Sequence[str], colors: Sequence[tuple[int, int, int]], hidden: Container[int] = (0,),
                  nodata: int | None = 255, bands: Sequence[int] | None = None, gsd_m: float | None = None,
                  max_size: int = MAX_SIZE) -> dict:
    """Write the PNG ``png``: ``overlay`` (a raster of ids: classes or change codes, ``class_names``
    and ``colors`` by id) over the scene ``scene`` (its ``bands``, default the first three that are
    not alpha), ids in ``hidden`` left out. ``gsd_m``: metres per overlay pixel for the scale bar
    (default: from the overlay's grid, which must then be projected in metres or geographic).
    Returns the picture's size and the legend's entries."""
    import rasterio
    from PIL import Image
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    if len(class_names) != len(colors):
        raise InputError(f"{len(class_names)} class names but {len(colors)} colours for the preview")
    with rasterio.open(overlay) as ds:
        rows, cols = preview_shape(ds.height, ds.width, max_size)
        ids = _read_shrunk(ds, [1], Window(0, 0, ds.width, ds.height), rows, cols, Resampling.nearest)[0]
        ids = ids.astype(np.int32)
        rgb = _scene_rgb(scene, ds, bands, rows, cols)
        if gsd_m is None:
            from geoseg.io.scene import ground_sample_distance

            gsd_m = ground_sample_distance(ds.crs, ds.transform, ds.width, ds.height)
        metres_per_px = gsd_m * ds.width / cols if gsd_m else None
    out = rgb.astype(np.float32)
    entries = []
    edge = _edges(ids)
    for cid, (name, color) in enumerate(zip(class_names, colors)):
        if cid in hidden or cid == nodata:
            continue
        where = ids == cid
        if not where.any():
            continue
        entries.append((str(name), tuple(int(c) for c in color)))
        c = np.asarray(color, np.float32)
        out[where] = out[where] * (1 - _FILL_ALPHA) + c * _FILL_ALPHA
        out[where & edge] = c
    image = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")
    _legend_and_scale(image, entries, metres_per_px)
    path = Path(png)
    if path.suffix.lower() != ".png":
        raise InputError(f"--preview {png}: the quick look is a PNG; use a name ending in .png")
    try:
        image.save(path, format="PNG", optimize=True)
    except OSError as exc:
        raise OutputError(f"cannot write {png}: {exc}") from exc
    return {"png": str(path), "width": cols, "height": rows, "legend": [name for name, _ in entries],
            "metres_per_pixel": round(metres_per_px, 6) if metres_per_px else None}
