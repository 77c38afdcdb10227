"""The regions of a class raster: 4-connected pixels of one class, each with its own label.

The one labelling that both the raster clean-up (``geoseg.vector.cleanup``: sieving small regions into
their neighbours) and the polygonizer (``geoseg.vector.polygons``: one polygon per region) work from.
"""

from __future__ import annotations

import numpy as np


def label_regions(cls: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels int32, class of each label) for the 4-connected one-class regions of ``cls`` where
    ``valid``: labels run from 1 class by class (0 outside ``valid``), and ``region_class[i - 1]`` is
    the class of label ``i``."""
    from scipy import ndimage  # imported on first use: scipy is not needed to start the CLI

    labels = np.zeros(cls.shape, np.int32)
    classes = []
    four = ndimage.generate_binary_structure(2, 1)
    offset = 0
    for c in np.unique(cls[valid]).tolist():
        lab, n = ndimage.label(valid & (cls == c), structure=four, output=np.int32)
        if n:
            inside = lab > 0  # the regions of one class never overlap another's: add in place
            lab[inside] += offset
            labels += lab
            del inside
            classes.append(np.full(n, c, np.int64))
            offset += n
    return labels, (np.concatenate(classes) if classes else np.zeros(0, np.int64))
