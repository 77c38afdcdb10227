"""A lying TIFF header is refused before any work: the first image's strip or tile table must cover
the size the header declares, and every block it points to must lie inside the file.

GDAL opens a TIFF whose ImageWidth/ImageLength were patched to 2,000,000 without complaint (it
reads the missing strips as empty) and a file cut short opens too: both fail, if at all, only deep
into a run. This module reads the header itself (classic TIFF and BigTIFF, either byte order), in
well under a second, holding at most one chunk of the block table at a time. Sparse blocks (offset
and byte count 0, as GDAL writes with SPARSE_OK) are legitimate and pass.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

import numpy as np

_TYPES = {1: ("B", 1), 3: ("H", 2), 4: ("I", 4), 16: ("Q", 8), 13: ("I", 4), 18: ("Q", 8)}  # BYTE SHORT LONG LONG8 IFD IFD8
_WIDTH, _LENGTH, _SAMPLES, _ROWS_PER_STRIP, _PLANAR = 256, 257, 277, 278, 284
_STRIP_OFFSETS, _STRIP_COUNTS, _TILE_WIDTH, _TILE_LENGTH, _TILE_OFFSETS, _TILE_COUNTS = 273, 279, 322, 323, 324, 325
_CHUNK = 1 << 20  # block-table entries read at a time


class HeaderError(ValueError):
    """The header contradicts the file: one line saying how."""


@dataclass(frozen=True)
class _Entry:
    type: int
    count: int
    inline: bytes  # the value field as stored (offset or the value itself)


def _entries(f, size: int) -> tuple[str, bool, dict[int, _Entry]] | None:
    head = f.read(16)
    if len(head) < 8 or head[:2] not in (b"II", b"MM"):
        return None
    e = "<" if head[:2] == b"II" else ">"
    magic = struct.unpack(e + "H", head[2:4])[0]
    if magic == 42:
        big, ifd = False, struct.unpack(e + "I", head[4:8])[0]
    elif magic == 43 and len(head) >= 16:
        big, ifd = True, struct.unpack(e + "Q", head[8:16])[0]
    else:
        return None
    if not 8 <= ifd < size:
        raise HeaderError(f"its first image directory lies at byte {ifd}, outside the {size}-byte file")
    f.seek(ifd)
    count_size, entry_size = (8, 20) if big else (2, 12)
    raw = f.read(count_size)
    if len(raw) < count_size:
        raise HeaderError("its image directory is cut off")
    n = struct.unpack(e + ("Q" if big else "H"), raw)[0]
    body = f.read(n * entry_size)
    if len(body) < n * entry_size:
        raise HeaderError("its image directory is cut off")
    entries = {}
    for i in range(n):
        chunk = body[i * entry_size:(i + 1) * entry_size]
        if big:
            tag, typ, count = struct.unpack(e + "HHQ", chunk[:12])
            inline = chunk[12:20]
        else:
            tag, typ, count = struct.unpack(e + "HHI", chunk[:8])
            inline = chunk[8:12]
        entries[tag] = _Entry(typ, count, inline)
    return e, big, entries


def _values(f, e: str, big: bool, entry: _Entry, size: int):
    """Yield the entry's values as int64 arrays, one chunk at a time."""
    if entry.type not in _TYPES:
        raise HeaderError(f"a block table has the unknown field type {entry.type}")
    code, width = _TYPES[entry.type]
    dtype = np.dtype(e + code)
    total = entry.count * width
    if total <= len(entry.inline):
        yield np.frombuffer(entry.inline[:total], dtype).astype(np.int64)
        return
    start = struct.unpack(e + ("Q" if big else "I"), entry.inline)[0]
    if start + total > size:
        raise HeaderError(f"its block table ({entry.count:,} entries at byte {start:,}) runs past the end of the "
                          f"{size:,}-byte file")
    for first in range(0, entry.count, _CHUNK):
        n = min(_CHUNK, entry.count - first)
        f.seek(start + first * width)  # each chunk seeks for itself: two tables are read side by side
        yield np.frombuffer(f.read(n * width), dtype).astype(np.int64)


def _scalar(f, e: str, big: bool, entries: dict[int, _Entry], tag: int, default: int, size: int) -> int:
    if tag not in entries:
        return default
    return int(next(_values(f, e, big, entries[tag], size))[0])


def check_tiff(path: str | os.PathLike) -> None:
    """Raise HeaderError when the first image's declared size is not backed by its block table, or a
    block lies past the end of the file. Files that are not TIFF pass unchecked."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        found = _entries(f, size)
        if found is None:
            return
        e, big, entries = found
        if _WIDTH not in entries or _LENGTH not in entries:
            return  # GDAL has already refused such a file
        width = _scalar(f, e, big, entries, _WIDTH, 0, size)
        height = _scalar(f, e, big, entries, _LENGTH, 0, size)
        samples = _scalar(f, e, big, entries, _SAMPLES, 1, size)
        planes = samples if _scalar(f, e, big, entries, _PLANAR, 1, size) == 2 else 1
        if _TILE_OFFSETS in entries:
            tw = _scalar(f, e, big, entries, _TILE_WIDTH, 0, size)
            tl = _scalar(f, e, big, entries, _TILE_LENGTH, 0, size)
            if tw <= 0 or tl <= 0:
                raise HeaderError(f"its tiles are {tw} x {tl} px")
            expected = math.ceil(width / tw) * math.ceil(height / tl) * planes
            offsets_tag, counts_tag, unit = _TILE_OFFSETS, _TILE_COUNTS, "tiles"
        elif _STRIP_OFFSETS in entries:
            rows = _scalar(f, e, big, entries, _ROWS_PER_STRIP, 2**32 - 1, size)
            rows = min(max(rows, 1), max(height, 1))
            expected = math.ceil(height / rows) * planes
            offsets_tag, counts_tag, unit = _STRIP_OFFSETS, _STRIP_COUNTS, "strips"
        else:
            return
        have = entries[offsets_tag].count
        if have < expected:
            raise HeaderError(f"its header declares {width:,} x {height:,} px in {expected:,} {unit} but holds the "
                              f"position of only {have:,}: the header was altered or damaged")
        if counts_tag not in entries:
            return
        if entries[counts_tag].count < have:
            raise HeaderError(f"it gives the byte counts of only {entries[counts_tag].count:,} of its {have:,} {unit}")
        index = 0
        chunks = zip(_values(f, e, big, entries[offsets_tag], size), _values(f, e, big, entries[counts_tag], size))
        for block_offsets, counts in chunks:
            counts = counts[: len(block_offsets)]
            ends = block_offsets + counts
            bad = np.flatnonzero(((block_offsets > 0) | (counts > 0)) & (ends > size))  # sparse blocks are 0 and 0
            if bad.size:
                k = index + int(bad[0])
                raise HeaderError(f"its {unit[:-1]} {k:,} ends at byte {int(ends[bad[0]]):,}, past the end of the "
                                  f"{size:,}-byte file: the file is truncated (copy or download it again)")
            index += len(block_offsets)
