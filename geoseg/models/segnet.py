"""SegNet (Badrinarayanan et al., 2017): a VGG-style encoder and a mirror decoder that unpools with
the encoder's pooling masks (no skip connections).

The pooling "indices" are kept as 0/1 masks built with ``keras.ops`` (see
``geoseg.models.layers.MaskedMaxPool2D``), so the saved model loads on every Keras backend.
Input: raw pixel values ``(B, H, W, bands)`` (float32; H and W multiples of
``size_multiple(depth)``); output: float32 logits ``(B, H, W, classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from geoseg.models import size_multiple
from geoseg.models.layers import (
    MaskedMaxPool2D,
    MaskedUnpool2D,
    Normalize,
    check_int,
    conv_bn_relu,
    logits_head,
    normalization_stats,
)

__all__ = ["build_segnet", "size_multiple"]


def build_segnet(
    *,
    bands: int,
    classes: int,
    width: int = 16,
    depth: int = 4,
    convs_per_stage: int = 2,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    name: str = "segnet",
) -> keras.Model:
    """Build a SegNet.

    Args:
        bands: input channels.
        classes: output classes (>= 2; class 0 is usually background).
        width: channels of the first stage; they double at every stage (width, ..., width * 2**(depth-1)).
        depth: number of encoder stages, each ending in a 2x pooling; H and W must be multiples of
            ``2**depth``.
        convs_per_stage: 3x3 conv + batch norm + ReLU blocks per encoder and per decoder stage.
        mean, std: per-band normalisation statistics in raw pixel units (default 0 and 1), applied
            by the model's first layer (``Normalize``).
        name: the model's name.

    Decoder stage ``i`` unpools with encoder stage ``i``'s mask, then runs ``convs_per_stage``
    blocks, the last of which narrows to stage ``i-1``'s width so it fits the next mask.
    """
    check_int("bands", bands, minimum=1)
    check_int("classes", classes, minimum=2)
    check_int("width", width, minimum=1)
    check_int("depth", depth, minimum=1)
    check_int("convs_per_stage", convs_per_stage, minimum=1)
    mean_list, std_list = normalization_stats(bands, mean, std)

    inputs = keras.Input((None, None, bands), dtype="float32", name="image")
    x = Normalize(mean_list, std_list, name="normalize")(inputs)

    masks = []
    for stage in range(depth):
        filters = width * 2**stage
        for i in range(convs_per_stage):
            x = conv_bn_relu(x, filters, name=f"enc{stage}_{i}")
        x, mask = MaskedMaxPool2D(name=f"enc{stage}_pool")(x)
        masks.append(mask)

    for stage in reversed(range(depth)):
        filters = width * 2**stage
        x = MaskedUnpool2D(name=f"dec{stage}_unpool")([x, masks[stage]])
        for i in range(convs_per_stage):
            last = i == convs_per_stage - 1
            out = width * 2 ** max(stage - 1, 0) if last else filters
            x = conv_bn_relu(x, out, name=f"dec{stage}_{i}")

    return keras.Model(inputs, logits_head(x, classes), name=name)
