"""EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant for mobile CPUs) as a U-Net encoder.

Built from Keras 3 layers only, so it runs under TensorFlow, JAX and PyTorch. The layer names are
those of the ImageNet weights that ``geoseg.models.pretrained`` rebuilds (``stem_conv``,
``block3_dwconv``, ``block3_dw_bn``, ...), and :func:`load_imagenet` sets them by name.

Architecture: a 3x3 stride-2 stem (32 channels), 16 MBConv blocks in 7 stages, every convolution
without bias and followed by batch normalisation (epsilon 1e-3) and ReLU6 (none after the
projection), no squeeze-and-excitation; a residual add where a block keeps its stride and width.
Keras' ``padding="same"`` is TensorFlow's SAME padding, which the weights were trained with.

:func:`lite0_features` returns the feature maps a U-Net decoder taps: strides 2, 4, 8, 16 and 32
with 16, 24, 40, 112 and 320 channels (block0, block2, block4, block10 and block15). Input height
and width must be multiples of 32. The weights expect RGB in 0-255 mapped by ``(x - 127) / 128``
(the model's ``Normalize`` layer does that).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from geoseg.errors import InputError

__all__ = ["ENCODERS", "ENCODER_WEIGHTS", "LITE0_STAGES", "TAPS", "classifier", "lite0_features", "load_imagenet"]

#: Encoders a U-Net can be built on (``build_unet(encoder=...)``); "none" is geoseg's own encoder.
ENCODERS = ("none", "efficientnet-lite0")
#: Where an encoder's weights start: its ImageNet weights (``geoseg.models.pretrained``) or random.
ENCODER_WEIGHTS = ("imagenet", "random")
#: (expand ratio, depthwise kernel, stride of the first block, output channels, repeats) per stage.
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
#: output stride -> the block whose output the decoder taps there.
TAPS = {2: 0, 4: 2, 8: 4, 16: 10, 32: 15}
_EPS = 1e-3
_MOMENTUM = 0.99


def _conv_bn(x: Any, filters: int, kernel: int, stride: int, name: str, *, bn: str, act: bool,
             depthwise: bool = False) -> Any:
    import keras

    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
    x = keras.layers.BatchNormalization(epsilon=_EPS, momentum=_MOMENTUM, name=bn)(x)
    if act:
        x = keras.layers.ReLU(max_value=6.0, name=f"{bn}_relu6")(x)
    return x


def lite0_features(x: Any) -> dict[int, Any]:
    """Apply the EfficientNet-Lite0 encoder to the (normalised) tensor ``x``; return its feature
    maps by output stride (see ``TAPS``)."""
    import keras

    x = _conv_bn(x, 32, 3, 2, "stem_conv", bn="stem_bn", act=True)
    taps: dict[int, Any] = {}
    block, channels = 0, 32
    for expand, kernel, first_stride, out, repeats in LITE0_STAGES:
        for r in range(repeats):
            stride = first_stride if r == 0 else 1
            inputs = x
            if expand != 1:
                x = _conv_bn(x, channels * expand, 1, 1, f"block{block}_expand_conv", bn=f"block{block}_expand_bn",
                             act=True)
            x = _conv_bn(x, 0, kernel, stride, f"block{block}_dwconv", bn=f"block{block}_dw_bn", act=True,
                         depthwise=True)
            x = _conv_bn(x, out, 1, 1, f"block{block}_project_conv", bn=f"block{block}_project_bn", act=False)
            if stride == 1 and channels == out:
                x = keras.layers.Add(name=f"block{block}_add")([x, inputs])
            channels = out
            for s, b in TAPS.items():
                if b == block:
                    taps[s] = x
            block += 1
    return taps


def classifier(*, name: str = "efficientnet_lite0") -> Any:
    """The whole ImageNet classifier (encoder, 1280-channel head, average pool, 1000 logits) on
    inputs already normalised by ``(x - 127) / 128``: the check that the converted weights are
    right (a photo of a cat is classed as a cat). Load it with :func:`load_imagenet`."""
    import keras

    inputs = keras.Input((None, None, 3), name="image")
    x = lite0_features(inputs)[32]
    x = _conv_bn(x, 1280, 1, 1, "head_conv", bn="head_bn", act=True)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(1000, name="fc")(x), name=name)


def _stem_kernel(kernel: np.ndarray, bands: int) -> np.ndarray:
    """The RGB stem kernel (3, 3, 3, 32) adapted to ``bands`` input channels so that an image whose
    bands are all equal (a gray image) gives the response of that gray image repeated to RGB: fewer
    bands share the sum of the RGB filters; more bands keep the RGB filters for the first three and
    give the others their mean, all scaled by 3 / bands."""
    if bands == 3:
        return kernel
    total = kernel.sum(axis=2, keepdims=True)
    if bands < 3:
        return (total.repeat(bands, axis=2) / bands).astype(kernel.dtype)
    extra = (total / 3).repeat(bands - 3, axis=2)
    return ((3.0 / bands) * np.concatenate([kernel, extra], axis=2)).astype(kernel.dtype)


def load_imagenet(model: Any, weights: Mapping[str, np.ndarray]) -> int:
    """Set every layer of ``model`` whose name has ImageNet weights (``geoseg.models.pretrained``);
    return how many layers were set. InputError when a shape does not fit."""
    import keras

    count = 0
    for layer in model.layers:
        prefix = f"{layer.name}/"
        if isinstance(layer, keras.layers.BatchNormalization) and f"{prefix}gamma" in weights:
            values = [weights[prefix + k] for k in ("gamma", "beta", "moving_mean", "moving_variance")]
        elif isinstance(layer, keras.layers.Dense) and f"{prefix}kernel" in weights:
            values = [weights[prefix + "kernel"], weights[prefix + "bias"]]
        elif f"{prefix}kernel" in weights and isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            kernel = weights[prefix + "kernel"]
            if layer.name == "stem_conv":
                kernel = _stem_kernel(kernel, int(layer.kernel.shape[2]))
            values = [kernel]
        else:
            continue
        shapes = [tuple(w.shape) for w in layer.get_weights()]
        if shapes != [tuple(v.shape) for v in values]:
            raise InputError(f"ImageNet weights of layer {layer.name} have shapes {[v.shape for v in values]}, "
                             f"the layer {shapes}; the model is not an EfficientNet-Lite0")
        layer.set_weights(values)
        count += 1
    return count
