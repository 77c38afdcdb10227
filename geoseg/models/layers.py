"""Custom Keras layers shared by geoseg's architectures, written with ``keras.ops`` only.

Every layer here is registered under the ``geoseg`` package, so a saved ``.keras`` file loads under
TensorFlow, JAX and PyTorch once this module has been imported (``load_bundle`` does that).

- :class:`Normalize` turns raw pixel values into ``(x - mean) / std``, always in float32, with the
  statistics kept as non-trainable weights (the built-in ``Normalization`` layer exports to ONNX
  with extra required inputs; this one exports cleanly).
- :class:`MaskedMaxPool2D` / :class:`MaskedUnpool2D` are SegNet's "pooling indices", kept as a
  0/1 mask of the positions that held each window's maximum instead of the flat indices of
  ``tf.nn.max_pool_with_argmax`` (which is TensorFlow-only and makes a model that cannot load on
  the other backends).

Ties: when several values of a 2x2 window equal its maximum (common after ReLU, where a window of
zeros is all maxima, and more common in bfloat16), the mask is 1 at *every* tied position, so
unpooling copies the decoder value to all of them instead of to a single argmax position. For a
window of zeros this acts like nearest-neighbour upsampling, which is harmless; the model is
trained with the same rule, so training and inference agree. It does mean a mask can hold more than
one 1 per window, unlike ``max_pool_with_argmax``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from geoseg.errors import InputError

__all__ = [
    "MaskedMaxPool2D",
    "MaskedUnpool2D",
    "Normalize",
    "check_int",
    "conv_bn_relu",
    "logits_head",
    "normalization_stats",
    "upsample2x",
]


def upsample2x(x: Any) -> Any:
    """Repeat every pixel of a channels-last image batch into a 2x2 block (nearest upsampling)."""
    return ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)


def _half(n: int | None) -> int | None:
    return None if n is None else n // 2


@keras.saving.register_keras_serializable(package="geoseg")
class Normalize(keras.layers.Layer):
    """``(x - mean) / std`` per channel (channels last), computed in float32.

    Args:
        mean: one value per input band, in raw pixel units.
        std: one value per input band, all > 0.

    The statistics are stored as non-trainable weights named ``mean`` and ``std`` (so they travel
    with the model and show up in ONNX as constants). The layer's dtype policy is always float32,
    whatever the global policy or a ``dtype`` argument says: raw uint16 values do not survive
    bfloat16 (8 bits of mantissa).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], **kwargs: Any) -> None:
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        mean = [float(v) for v in mean]
        std = [float(v) for v in std]
        if not mean or len(mean) != len(std):
            raise InputError(
                f"Normalize needs one mean and one std per band, got mean={mean} and std={std}; "
                "pass two lists of the same, non-zero length"
            )
        if any(not s > 0 for s in std):
            raise InputError(f"Normalize std must be > 0 for every band, got std={std}")
        self.mean_values = mean
        self.std_values = std

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        channels = input_shape[-1]
        if channels is not None and channels != len(self.mean_values):
            raise InputError(
                f"Normalize was given statistics for {len(self.mean_values)} bands but its input "
                f"has {channels} channels; pass one mean and std per input band"
            )
        n = len(self.mean_values)
        self.mean = self.add_weight(
            name="mean",
            shape=(n,),
            initializer=keras.initializers.Constant(self.mean_values),
            trainable=False,
            dtype="float32",
        )
        self.std = self.add_weight(
            name="std",
            shape=(n,),
            initializer=keras.initializers.Constant(self.std_values),
            trainable=False,
            dtype="float32",
        )

    def call(self, inputs: Any) -> Any:
        x = ops.cast(inputs, "float32")
        return (x - self.mean) / self.std

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"mean": list(self.mean_values), "std": list(self.std_values)})
        return config


@keras.saving.register_keras_serializable(package="geoseg")
class MaskedMaxPool2D(keras.layers.Layer):
    """2x2 max pooling, stride 2, that also returns where the maxima were.

    Returns ``[pooled, mask]``: ``pooled`` is ``(B, H/2, W/2, C)`` and ``mask`` is ``(B, H, W, C)``
    with 1 where the input equals its window's maximum and 0 elsewhere (see the module docstring
    for ties). H and W must be even.
    """

    def call(self, inputs: Any) -> list[Any]:
        pooled = ops.max_pool(inputs, pool_size=2, strides=2, padding="valid")
        mask = ops.cast(ops.equal(inputs, upsample2x(pooled)), inputs.dtype)
        return [pooled, mask]

    def compute_output_shape(
        self, input_shape: tuple[int | None, ...]
    ) -> list[tuple[int | None, ...]]:
        b, h, w, c = input_shape
        return [(b, _half(h), _half(w), c), (b, h, w, c)]


@keras.saving.register_keras_serializable(package="geoseg")
class MaskedUnpool2D(keras.layers.Layer):
    """SegNet unpooling: ``[y, mask] -> upsample2x(y) * mask``.

    ``y`` is ``(B, H/2, W/2, C)``, ``mask`` is the ``(B, H, W, C)`` mask from the matching
    :class:`MaskedMaxPool2D`; each value of ``y`` lands on the position(s) of its window's maximum
    and zeros fill the rest.
    """

    def call(self, inputs: Sequence[Any]) -> Any:
        y, mask = inputs
        return upsample2x(y) * ops.cast(mask, y.dtype)

    def compute_output_shape(
        self, input_shape: Sequence[tuple[int | None, ...]]
    ) -> tuple[int | None, ...]:
        y_shape, mask_shape = input_shape
        return (y_shape[0], mask_shape[1], mask_shape[2], y_shape[3])


# --- building blocks shared by the builders ------------------------------------------------------


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """Return ``value`` if it is a whole number >= ``minimum``; InputError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def normalization_stats(
    bands: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[list[float], list[float]]:
    """Mean/std lists for ``bands`` channels: 0 and 1 when not given; InputError when they don't fit."""
    mean_list = [0.0] * bands if mean is None else [float(v) for v in mean]
    std_list = [1.0] * bands if std is None else [float(v) for v in std]
    if len(mean_list) != bands or len(std_list) != bands:
        raise InputError(
            f"mean and std need one value per band ({bands} bands), got mean={mean_list} and "
            f"std={std_list}; pass {bands} values each, or leave them out for 0 and 1"
        )
    if any(not s > 0 for s in std_list):
        raise InputError(f"std must be > 0 for every band, got std={std_list}")
    return mean_list, std_list


def conv_bn_relu(x: Any, filters: int, *, name: str) -> Any:
    """3x3 convolution (no bias) + batch normalisation + ReLU, layers named ``{name}_conv`` etc."""
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def logits_head(x: Any, classes: int) -> Any:
    """Final 1x1 convolution to ``classes`` logits, always float32 (also under mixed precision)."""
    return keras.layers.Conv2D(classes, 1, dtype="float32", name="logits")(x)
