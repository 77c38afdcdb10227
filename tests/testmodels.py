"""Models whose logits are a one-hot of an input band: predict must reproduce that band exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geoseg.models.bundle import Bundle, BundleMeta, ClassInfo

COLORS = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


def test_meta(name: str, *, classes: int, bands: int, mean=None, std=None, **kw) -> BundleMeta:
    """Metadata for a test model: classes background, class1, ...; bands b0, b1, ..."""
    kw.setdefault("architecture", name)
    kw.setdefault("arch_config", {"bands": bands, "classes": classes})
    kw.setdefault("size_multiple", 1)
    return BundleMeta(
        name=name,
        classes=tuple(ClassInfo(name=("background" if i == 0 else f"class{i}"), color=COLORS[i]) for i in range(classes)),
        background=(0,),
        bands=tuple(f"b{i}" for i in range(bands)),
        mean=tuple(mean) if mean is not None else (0.0,) * bands,
        std=tuple(std) if std is not None else (1.0,) * bands,
        **kw,
    )


test_meta.__test__ = False  # a helper, not a test


def onehot_meta(classes: int = 4, bands: int = 1, *, tile_size: int = 64, overlap: int = 16, gsd=None,
                gsd_range=None) -> BundleMeta:
    return test_meta("onehot", classes=classes, bands=bands, tile_size=tile_size, overlap=overlap, gsd=gsd,
                     gsd_range=gsd_range)


class NumpyOneHot:
    """Stands in for a Keras model (same ``predict_on_batch``), in plain numpy: fast for property tests."""

    def __init__(self, classes: int, band: int = 0) -> None:
        self.classes, self.band, self.calls, self.shapes = classes, band, 0, set()

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.shapes.add(x.shape)
        ids = np.clip(np.rint(x[..., self.band]), 0, self.classes - 1).astype(int)
        return np.eye(self.classes, dtype=np.float32)[ids] * 4.0


def numpy_bundle(classes: int = 4, bands: int = 1, **kw) -> Bundle:
    return Bundle(path=Path("onehot.keras"), meta=onehot_meta(classes, bands, **kw), sha256="0" * 64,
                  model=NumpyOneHot(classes))


def keras_onehot_bundle(path: Path, classes: int = 4, bands: int = 1) -> Path:
    """Save a real Keras bundle whose logits are a one-hot of band 0 (a registered custom layer)."""
    import keras
    from keras import ops

    from geoseg.models.bundle import save_bundle

    @keras.saving.register_keras_serializable(package="geoseg_tests")
    class OneHotBand(keras.layers.Layer):
        def __init__(self, classes: int, band: int = 0, **kwargs):
            super().__init__(**kwargs)
            self.classes, self.band = classes, band

        def call(self, x):
            ids = ops.cast(ops.round(x[..., self.band]), "int32")
            ids = ops.clip(ids, 0, self.classes - 1)
            return ops.one_hot(ids, self.classes) * 4.0

        def get_config(self):
            return {**super().get_config(), "classes": self.classes, "band": self.band}

    inp = keras.Input((None, None, bands), dtype="float32")
    model = keras.Model(inp, OneHotBand(classes, dtype="float32")(inp), name="onehot")
    save_bundle(model, onehot_meta(classes, bands), path)
    return path


def blocky_labels(h: int, w: int, classes: int, rng: np.random.Generator, block: int = 7) -> np.ndarray:
    """Class ids in random rectangles (few polygons, every class present, odd sizes)."""
    small = rng.integers(0, classes, size=(-(-h // block), -(-w // block)))
    return np.kron(small, np.ones((block, block), dtype=int))[:h, :w]


def random_unet_bundle(path: Path, *, bands: int = 3, classes: int = 4, width: int = 8, depth: int = 3,
                       mean=None, std=None, seed: int = 0) -> Path:
    """A fully convolutional U-Net with random (seeded) weights, saved as a bundle."""
    import keras

    from geoseg.models.bundle import save_bundle
    from geoseg.models.unet import build_unet

    keras.utils.set_random_seed(seed)
    mean = list(mean) if mean is not None else [0.0] * bands
    std = list(std) if std is not None else [1.0] * bands
    model = build_unet(bands=bands, classes=classes, width=width, depth=depth, mean=mean, std=std)
    meta = test_meta("random-unet", classes=classes, bands=bands, mean=mean, std=std, architecture="unet",
                     arch_config={"bands": bands, "classes": classes, "width": width, "depth": depth},
                     size_multiple=2**depth, tile_size=256, overlap=64)
    save_bundle(model, meta, path)
    return path


def small_cnn_bundle(path: Path, *, bands: int = 3, classes: int = 3, mean=None, std=None, seed: int = 0) -> Path:
    """A two-layer fully convolutional model (5x5 conv, 1x1 logits) with seeded random weights.

    Its class boundaries follow the input smoothly, so on a smooth scene it gives few polygons:
    useful where a benchmark should measure the pipeline rather than the polygon count.
    """
    import keras

    from geoseg.models.bundle import save_bundle
    from geoseg.models.layers import Normalize

    keras.utils.set_random_seed(seed)
    mean = list(mean) if mean is not None else [0.0] * bands
    std = list(std) if std is not None else [1.0] * bands
    inp = keras.Input((None, None, bands), dtype="float32")
    x = Normalize(mean, std)(inp)
    x = keras.layers.Conv2D(8, 5, padding="same", activation="relu")(x)
    out = keras.layers.Conv2D(classes, 1, dtype="float32")(x)
    model = keras.Model(inp, out, name="small-cnn")
    meta = test_meta("small-cnn", classes=classes, bands=bands, mean=mean, std=std, architecture="cnn",
                     tile_size=512, overlap=128)
    save_bundle(model, meta, path)
    return path
