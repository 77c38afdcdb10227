"""Models and bundles: builders, save/load round trips, cross-backend loading, errors, precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from geoseg.errors import BundleError, InputError
from geoseg.models import (
    FORMAT_VERSION,
    BundleMeta,
    ClassInfo,
    build_model,
    cpu_has_bf16,
    file_sha256,
    list_builtin,
    load_bundle,
    read_meta,
    resolve_model,
    resolve_precision,
    save_bundle,
    size_multiple,
)

keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # the bundles below are saved under TensorFlow
    pytest.skip("tests/models/test_models.py expects KERAS_BACKEND=tensorflow", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
BANDS = ("red", "green", "blue")
MEAN = (90.0, 100.0, 110.0)
STD = (40.0, 45.0, 50.0)
ARCHS = {
    "unet": dict(bands=3, classes=3, width=4, depth=2, mean=MEAN, std=STD),
    "unet_upsample": dict(bands=3, classes=3, width=4, depth=2, decoder="upsample", mean=MEAN, std=STD),
    "segnet": dict(bands=3, classes=3, width=4, depth=2, convs_per_stage=1, mean=MEAN, std=STD),
}


def make_meta(arch: str, config: dict, **overrides) -> BundleMeta:
    fields = dict(
        name=f"test-{arch}",
        classes=(
            ClassInfo("background", (0, 0, 0)),
            ClassInfo("building", (230, 30, 30), min_area_m2=10.0),
            ClassInfo("water", (30, 30, 230)),
        ),
        background=(0,),
        bands=BANDS,
        mean=MEAN,
        std=STD,
        architecture=arch,
        arch_config=config,
        size_multiple=size_multiple(config["depth"]),
        tile_size=64,
        overlap=16,
        gsd=0.3,
        gsd_range=(0.2, 0.5),
        description="tiny test model",
    )
    fields.update(overrides)
    return BundleMeta(**fields)


def predict(model, x: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x, training=False))


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, pixels):
    """Each architecture built (seeded), saved as a bundle; with its float32 outputs on ``pixels``."""
    folder = tmp_path_factory.mktemp("bundles")
    out = {}
    for key, config in ARCHS.items():
        keras.utils.set_random_seed(1)
        arch = key.split("_")[0]
        model = build_model(arch, **config)
        path = folder / f"{key}.keras"
        sha = save_bundle(model, make_meta(arch, config), path)
        out[key] = dict(model=model, path=path, sha=sha, config=config, y=predict(model, pixels))
    return out


def rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes | None]) -> None:
    """Copy a zip, replacing (bytes) or dropping (None) some entries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            if item.filename in replace:
                continue
            zout.writestr(item, zin.read(item.filename))
        for name, data in replace.items():
            if data is not None:
                zout.writestr(name, data)


# --- builders --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(ARCHS))
def test_output_shape_and_dtype(saved, key, pixels):
    y = saved[key]["y"]
    assert y.shape == (2, 32, 32, 3)
    assert y.dtype == np.float32
    assert np.isfinite(y).all()
    model = saved[key]["model"]
    assert model.inputs[0].shape == (None, None, None, 3)
    assert model.layers[1].__class__.__name__ == "Normalize"
    assert model.layers[-1].name == "logits" and model.layers[-1].dtype_policy.name == "float32"


def test_other_sizes_and_channel_widths():
    from geoseg.models.segnet import build_segnet
    from geoseg.models.unet import build_unet

    unet = build_unet(bands=2, classes=2, width=3, depth=3)
    assert predict(unet, np.zeros((1, 64, 24, 2), "float32")).shape == (1, 64, 24, 2)
    assert unet.get_layer("enc2_a_conv").filters == 12 and unet.get_layer("bottom_a_conv").filters == 24
    segnet = build_segnet(bands=1, classes=4, width=2, depth=3, convs_per_stage=2)
    assert predict(segnet, np.zeros((3, 16, 40, 1), "float32")).shape == (3, 16, 40, 4)
    assert segnet.get_layer("enc2_1_conv").filters == 8 and segnet.get_layer("dec0_1_conv").filters == 2
    assert size_multiple(4) == 16


def test_normalize_layer_uses_statistics():
    from geoseg.models.layers import Normalize

    layer = Normalize([10.0, 20.0], [2.0, 4.0])
    x = np.array([[[[12.0, 28.0]]]], "float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), [[[[1.0, 2.0]]]])
    assert [w.name for w in layer.weights] == ["mean", "std"] and not layer.trainable_weights
    again = Normalize.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()
    assert Normalize([0.0], [1.0], dtype="mixed_bfloat16").dtype_policy.name == "float32"
    with pytest.raises(InputError, match="std must be > 0"):
        Normalize([0.0], [0.0])


def test_builder_errors():
    with pytest.raises(InputError, match="unknown architecture 'deeplab'.*unet, segnet"):
        build_model("deeplab", bands=3, classes=2)
    with pytest.raises(InputError, match="decoder 'bicubic'"):
        build_model("unet", bands=3, classes=2, decoder="bicubic")
    with pytest.raises(InputError, match="one value per band"):
        build_model("segnet", bands=3, classes=2, mean=[1, 2])
    with pytest.raises(InputError, match="classes must be a whole number >= 2, got 1"):
        build_model("unet", bands=3, classes=1)


# --- SegNet pooling masks --------------------------------------------------------------------------


def test_unpool_puts_values_at_argmax_positions():
    from geoseg.models.layers import MaskedMaxPool2D, MaskedUnpool2D

    x = np.array(
        [[1, 5, 0, 2],
         [3, 2, 7, 1],
         [0, 0, 4, 9],
         [8, 1, 3, 2]], "float32",
    ).reshape(1, 4, 4, 1)  # fmt: skip
    pooled, mask = MaskedMaxPool2D()(x)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(pooled)[0, :, :, 0], [[5, 7], [8, 9]])
    y = np.array([[10, 20], [30, 40]], "float32").reshape(1, 2, 2, 1)
    up = keras.ops.convert_to_numpy(MaskedUnpool2D()([y, mask]))[0, :, :, 0]
    expected = np.zeros((4, 4), "float32")
    expected[0, 1], expected[1, 2], expected[3, 0], expected[2, 3] = 10, 20, 30, 40
    np.testing.assert_array_equal(up, expected)


def test_unpool_ties_go_to_every_maximum():
    """Documented behaviour: tied maxima all receive the value (a window of zeros acts like
    nearest-neighbour upsampling)."""
    from geoseg.models.layers import MaskedMaxPool2D, MaskedUnpool2D

    x = np.array([[3, 3], [1, 3]], "float32").reshape(1, 2, 2, 1)
    _, mask = MaskedMaxPool2D()(x)
    up = MaskedUnpool2D()([np.full((1, 1, 1, 1), 5.0, "float32"), mask])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(up)[0, :, :, 0], [[5, 5], [0, 5]])


# --- bundles ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(ARCHS))
def test_bundle_round_trip(saved, key, pixels):
    item = saved[key]
    bundle = load_bundle(item["path"])
    np.testing.assert_allclose(predict(bundle.model, pixels), item["y"], atol=1e-5, rtol=0)
    assert bundle.sha256 == item["sha"] == file_sha256(item["path"])
    arch = key.split("_")[0]
    expected = make_meta(arch, item["config"])
    assert bundle.meta == read_meta(item["path"])
    assert bundle.meta.created.endswith("Z")
    assert bundle.meta == BundleMeta(**{**expected.__dict__, "created": bundle.meta.created})
    assert bundle.meta.class_names == ("background", "building", "water")
    assert bundle.meta.colors[1] == (230, 30, 30)
    assert build_model(arch, **bundle.meta.arch_config).count_params() == item["model"].count_params()


def test_meta_dict_round_trip():
    meta = make_meta("unet", ARCHS["unet"], created="2026-01-01T00:00:00Z")
    d = meta.to_dict()
    assert BundleMeta.from_dict(json.loads(json.dumps(d))) == meta
    assert d["format_version"] == FORMAT_VERSION
    assert BundleMeta.from_dict({**d, "added_in_a_later_minor_release": 1}) == meta


@pytest.mark.parametrize(
    "change, message",
    [
        ({"classes": [{"name": "bg", "color": [0, 0, 300]}]}, "color of class 'bg'"),
        ({"std": [1, 0, 1]}, "std must be > 0"),
        ({"mean": [1, 2]}, "one value per band"),
        ({"background": [7]}, "background class ids"),
        ({"tile_size": 65}, "multiple of size_multiple"),
        ({"gsd": -1}, "gsd must be > 0"),
        ({"name": None}, "name must be a string"),
    ],
)
def test_meta_validation(change, message):
    d = make_meta("unet", ARCHS["unet"]).to_dict()
    with pytest.raises(BundleError, match=message):
        BundleMeta.from_dict({**d, **change})
    d.pop("bands")
    with pytest.raises(BundleError, match="missing field.*bands"):
        BundleMeta.from_dict(d)


def test_save_checks_meta_against_model(saved, tmp_path):
    model = saved["unet"]["model"]
    meta = make_meta("unet", ARCHS["unet"])
    with pytest.raises(BundleError, match="4 bands"):
        save_bundle(model, make_meta("unet", ARCHS["unet"], bands=BANDS + ("nir",),
                                     mean=MEAN + (1.0,), std=STD + (1.0,)), tmp_path / "a.keras")
    with pytest.raises(BundleError, match="returns 3 classes"):
        save_bundle(model, make_meta("unet", ARCHS["unet"], classes=meta.classes[:2]), tmp_path / "b.keras")
    with pytest.raises(BundleError, match="Normalize layer"):
        save_bundle(model, make_meta("unet", ARCHS["unet"], mean=(0.0, 0.0, 0.0)), tmp_path / "c.keras")
    with pytest.raises(InputError, match=r"must end in \.keras"):
        save_bundle(model, meta, tmp_path / "d.h5")
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_failed_save_leaves_nothing(saved, tmp_path, monkeypatch):
    model = saved["unet"]["model"]
    (tmp_path / "old.keras").write_bytes(b"previous")

    def broken_save(path, *args, **kwargs):
        Path(path).write_bytes(b"half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(model, make_meta("unet", ARCHS["unet"]), tmp_path / "old.keras")
    assert [p.name for p in tmp_path.iterdir()] == ["old.keras"]
    assert (tmp_path / "old.keras").read_bytes() == b"previous"


def test_not_a_zip(tmp_path):
    path = tmp_path / "model.keras"
    path.write_text("hello")
    with pytest.raises(BundleError, match="not a .keras model file"):
        read_meta(path)
    with pytest.raises(BundleError, match="model file not found"):
        read_meta(tmp_path / "missing.keras")


def test_zip_that_is_not_keras(tmp_path):
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(BundleError, match="not a .keras model file"):
        read_meta(path)


def test_keras_file_without_geoseg_json(saved, tmp_path):
    path = tmp_path / "plain.keras"
    saved["unet"]["model"].save(path)
    with pytest.raises(BundleError, match="not a geoseg bundle.*save it with geoseg.models.save_bundle"):
        read_meta(path)
    with pytest.raises(BundleError, match="not a geoseg bundle"):
        load_bundle(path)


def test_newer_format_version(saved, tmp_path):
    src = saved["unet"]["path"]
    d = read_meta(src).to_dict()
    d["format_version"] = FORMAT_VERSION + 1
    path = tmp_path / "newer.keras"
    rewrite_zip(src, path, {"geoseg.json": json.dumps(d).encode()})
    with pytest.raises(BundleError, match="newer geoseg.*upgrade geoseg"):
        read_meta(path)


def test_malformed_json(saved, tmp_path):
    path = tmp_path / "bad.keras"
    rewrite_zip(saved["unet"]["path"], path, {"geoseg.json": b"{not json"})
    with pytest.raises(BundleError, match="malformed geoseg.json"):
        read_meta(path)


def test_truncated_file(saved, tmp_path):
    data = saved["unet"]["path"].read_bytes()
    path = tmp_path / "truncated.keras"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or corrupted"):
        load_bundle(path)


def test_corrupted_member(saved, tmp_path):
    src = saved["unet"]["path"]
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo("model.weights.h5")
    data = bytearray(src.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    data[start : start + 16] = bytes(255 - b for b in data[start : start + 16])
    path = tmp_path / "corrupted.keras"
    path.write_bytes(bytes(data))
    read_meta(path)  # the metadata is intact
    with pytest.raises(BundleError, match="corrupted") as err:
        load_bundle(path)
    assert "\n" not in str(err.value) and "corrupted.keras" in str(err.value)


def test_resolve_model(saved, tmp_path):
    path = saved["unet"]["path"]
    assert resolve_model(str(path)) == path
    with pytest.raises(BundleError, match="unknown model 'no-such-model'.*--model"):
        resolve_model("no-such-model")
    names = [row["name"] for row in list_builtin()]
    if "buildings" in names:
        assert resolve_model(None).name == "buildings.keras"
    else:
        with pytest.raises(BundleError, match="default built-in model 'buildings' is missing"):
            resolve_model(None)
    with pytest.raises(InputError, match="unknown precision 'fp8'"):
        load_bundle(path, precision="fp8")


# --- precision -------------------------------------------------------------------------------------


def test_mixed_bfloat16(saved, pixels):
    item = saved["unet"]
    bundle = load_bundle(item["path"], precision="mixed_bfloat16")
    policies = {layer.name: layer.dtype_policy.name for layer in bundle.model.layers}
    assert policies["normalize"] == "float32" and policies["logits"] == "float32"
    assert policies["enc0_a_conv"] == "mixed_bfloat16" and policies["dec0_up"] == "mixed_bfloat16"
    y = predict(bundle.model, pixels)
    assert y.dtype == np.float32
    agreement = (y.argmax(-1) == item["y"].argmax(-1)).mean()
    assert agreement >= 0.99, agreement
    assert keras.config.dtype_policy().name == "float32"
    # and back: a float32 load of the same file is unaffected
    again = load_bundle(item["path"])
    assert {layer.dtype_policy.name for layer in again.model.layers} == {"float32"}


def test_mixed_float16_segnet(saved, pixels):
    bundle = load_bundle(saved["segnet"]["path"], precision="mixed_float16")
    assert bundle.model.get_layer("enc0_pool").dtype_policy.name == "mixed_float16"
    y = predict(bundle.model, pixels)
    assert y.dtype == np.float32
    assert (y.argmax(-1) == saved["segnet"]["y"].argmax(-1)).mean() >= 0.99
    assert keras.config.dtype_policy().name == "float32"


def test_cpu_has_bf16_reads_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16\n")
    assert cpu_has_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_int8\n")
    assert not cpu_has_bf16(info)
    assert not cpu_has_bf16(tmp_path / "no-such-file")  # not Linux


@pytest.mark.parametrize("has_bf16, expected", [(True, "mixed_bfloat16"), (False, "float32")])
def test_auto_precision_follows_the_cpu(saved, monkeypatch, has_bf16, expected):
    import geoseg.models.bundle as bundle_module

    monkeypatch.setattr(bundle_module, "cpu_has_bf16", lambda *a: has_bf16)
    assert resolve_precision("auto") == expected  # TensorFlow on a machine without a GPU
    for named in ("float32", "mixed_bfloat16", "mixed_float16"):
        assert resolve_precision(named) == named  # a named precision is never second-guessed
    bundle = load_bundle(saved["unet"]["path"], precision="auto")
    assert bundle.precision == expected  # what ran, for the run metadata
    assert bundle.model.get_layer("enc0_a_conv").dtype_policy.name == expected
    # the depthwise EfficientNet-Lite0 encoder measured slower in bfloat16: float32 on every CPU
    assert resolve_precision("auto", "efficientnet-lite0") == "float32"
    assert resolve_precision("mixed_bfloat16", "efficientnet-lite0") == "mixed_bfloat16"
    assert bundle.model.get_layer("logits").dtype_policy.name == "float32"


# --- no keras at import; other backends ------------------------------------------------------------


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bundle_metadata_without_keras(saved):
    result = run_python(
        f"""
        import sys
        import geoseg.models, geoseg.models.bundle
        from geoseg.models import read_meta, list_builtin, resolve_model, file_sha256
        meta = read_meta({str(saved["unet"]["path"])!r})
        list_builtin(); resolve_model({str(saved["unet"]["path"])!r})
        file_sha256({str(saved["unet"]["path"])!r})
        assert meta.class_names == ("background", "building", "water"), meta
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "tensorflow", "torch", "jax"))
        assert not loaded, loaded
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_other_backends_load_tensorflow_bundles(saved, pixels, tmp_path, backend):
    if run_python(f"import {backend}").returncode != 0:
        pytest.skip(f"{backend} is not installed in {sys.executable}, so KERAS_BACKEND={backend} cannot run")
    np.save(tmp_path / "x.npy", pixels)
    keys = list(ARCHS)
    result = run_python(
        f"""
        import numpy as np, keras
        from pathlib import Path
        from geoseg.models import load_bundle
        assert keras.backend.backend() == {backend!r}
        x = np.load({str(tmp_path / "x.npy")!r})
        for key, path in {[(k, str(saved[k]["path"])) for k in keys]!r}:
            model = load_bundle(path).model
            y = keras.ops.convert_to_numpy(model(x, training=False))
            np.save(Path({str(tmp_path)!r}) / f"{{key}}.npy", y)
        """,
        KERAS_BACKEND=backend,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for key in keys:
        y = np.load(tmp_path / f"{key}.npy")
        np.testing.assert_allclose(y, saved[key]["y"], atol=1e-4, rtol=0, err_msg=f"{key} on {backend}")
