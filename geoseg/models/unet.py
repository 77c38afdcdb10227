"""U-Net (Ronneberger et al., 2015): an encoder-decoder with skip connections at every level.

``build_unet(bands=3, classes=2)`` gives a model that takes raw pixel values ``(B, H, W, bands)``
(float32; H and W multiples of ``size_multiple(depth)``) and returns float32 logits
``(B, H, W, classes)``.

``build_unet(..., encoder="efficientnet-lite0")`` builds the encoder half from EfficientNet-Lite0
(``geoseg.models.efficientnet``; ImageNet weights are loaded by the trainer, not here) and a
decoder with skips at strides 16, 8, 4 and 2 on its stride-32 features: each level upsamples 2x
(bilinear), concatenates the encoder's feature map of that stride and applies two 3x3
convolution-BN-ReLU layers of ``decoder_widths`` channels; a last level at full resolution has no
skip. H and W must be multiples of 32.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from geoseg.errors import InputError
from geoseg.models import size_multiple
from geoseg.models.layers import (
    Normalize,
    check_int,
    conv_bn_relu,
    logits_head,
    normalization_stats,
)

__all__ = ["DECODERS", "LITE0_DECODER", "build_unet", "size_multiple"]

#: ``"transpose"``: learned 2x2 transposed convolution; ``"upsample"``: bilinear upsampling then a
#: 3x3 convolution (fewer checkerboard artefacts, slightly slower).
DECODERS = ("transpose", "upsample")
#: Decoder widths of the EfficientNet-Lite0 U-Net at strides 16, 8, 4, 2 and 1 (3.66 M parameters).
LITE0_DECODER = (96, 64, 48, 32, 16)


def build_unet(
    *,
    bands: int,
    classes: int,
    width: int = 16,
    depth: int = 4,
    decoder: str = "transpose",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    encoder: str = "none",
    decoder_widths: Sequence[int] = LITE0_DECODER,
    name: str = "unet",
) -> keras.Model:
    """Build a U-Net.

    Args:
        bands: input channels.
        classes: output classes (>= 2; class 0 is usually background).
        width: channels of the first level; they double at every level down
            (width, 2*width, ..., width * 2**depth at the bottom).
        depth: number of 2x poolings; H and W must be multiples of ``2**depth``.
        decoder: ``"transpose"`` or ``"upsample"`` (see ``DECODERS``).
        mean, std: per-band normalisation statistics in raw pixel units (default 0 and 1), applied
            by the model's first layer (``Normalize``).
        encoder: ``"none"`` (the encoder above) or ``"efficientnet-lite0"`` (``width``, ``depth``
            and ``decoder`` then do not apply: the depth is 5).
        decoder_widths: with an encoder, the decoder's channels at strides 16, 8, 4, 2 and 1.
        name: the model's name.
    """
    from geoseg.models.efficientnet import ENCODERS

    if encoder not in ENCODERS:
        raise InputError(f"unknown U-Net encoder {encoder!r}; choose one of: {', '.join(ENCODERS)}")
    if encoder != "none":
        return _build_encoder_unet(bands=bands, classes=classes, mean=mean, std=std,
                                   decoder_widths=decoder_widths, name=name)
    check_int("bands", bands, minimum=1)
    check_int("classes", classes, minimum=2)
    check_int("width", width, minimum=1)
    check_int("depth", depth, minimum=1)
    if decoder not in DECODERS:
        raise InputError(f"unknown U-Net decoder {decoder!r}; choose one of: {', '.join(DECODERS)}")
    mean_list, std_list = normalization_stats(bands, mean, std)

    inputs = keras.Input((None, None, bands), dtype="float32", name="image")
    x = Normalize(mean_list, std_list, name="normalize")(inputs)

    skips = []
    for level in range(depth):
        filters = width * 2**level
        x = conv_bn_relu(x, filters, name=f"enc{level}_a")
        x = conv_bn_relu(x, filters, name=f"enc{level}_b")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)

    x = conv_bn_relu(x, width * 2**depth, name="bottom_a")
    x = conv_bn_relu(x, width * 2**depth, name="bottom_b")

    for level in reversed(range(depth)):
        filters = width * 2**level
        if decoder == "transpose":
            x = keras.layers.Conv2DTranspose(filters, 2, strides=2, name=f"dec{level}_up")(x)
        else:
            x = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"dec{level}_up")(x)
            x = conv_bn_relu(x, filters, name=f"dec{level}_upconv")
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = conv_bn_relu(x, filters, name=f"dec{level}_a")
        x = conv_bn_relu(x, filters, name=f"dec{level}_b")

    return keras.Model(inputs, logits_head(x, classes), name=name)


def _build_encoder_unet(*, bands: int, classes: int, mean: Sequence[float] | None, std: Sequence[float] | None,
                        decoder_widths: Sequence[int], name: str) -> keras.Model:
    """The EfficientNet-Lite0 U-Net (see the module docstring)."""
    from geoseg.models.efficientnet import lite0_features

    check_int("bands", bands, minimum=1)
    check_int("classes", classes, minimum=2)
    widths = [check_int("decoder width", w, minimum=1) for w in decoder_widths]
    if len(widths) != 5:
        raise InputError(f"decoder_widths needs 5 values (strides 16, 8, 4, 2, 1), got {list(decoder_widths)}")
    mean_list, std_list = normalization_stats(bands, mean, std)

    inputs = keras.Input((None, None, bands), dtype="float32", name="image")
    x = Normalize(mean_list, std_list, name="normalize")(inputs)
    taps = lite0_features(x)
    x = taps[32]
    for level, (stride, filters) in enumerate(zip((16, 8, 4, 2, 1), widths)):
        x = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"dec{level}_up")(x)
        if stride in taps:
            x = keras.layers.Concatenate(name=f"dec{level}_concat")([x, taps[stride]])
        x = conv_bn_relu(x, filters, name=f"dec{level}_a")
        x = conv_bn_relu(x, filters, name=f"dec{level}_b")
    return keras.Model(inputs, logits_head(x, classes), name=name)
