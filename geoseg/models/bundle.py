"""The geoseg bundle: one ``.keras`` file that also carries geoseg's metadata.

A bundle is the zip that ``model.save("x.keras")`` writes, plus one extra zip entry,
``geoseg.json``, holding a :class:`BundleMeta` (classes, colours, band order, normalisation,
training GSD, tile size and overlap, architecture, versions). ``keras.saving.load_model`` ignores
the extra entry, so a bundle is still a plain Keras model file; ``model.save`` drops it, so
:func:`save_bundle` appends it after every save. The sha256 of the whole file identifies the model
in every output.

Nothing here imports Keras at module level: :func:`read_meta`, :func:`list_builtin`,
:func:`resolve_model` and :func:`file_sha256` work without it; :func:`save_bundle` and
:func:`load_bundle` import it when called.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import secrets
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import geoseg
from geoseg.errors import BundleError, InputError

if TYPE_CHECKING:
    import keras

__all__ = [
    "DEFAULT_MODEL",
    "FORMAT_VERSION",
    "META_ENTRY",
    "PRECISIONS",
    "Bundle",
    "BundleMeta",
    "ClassInfo",
    "builtin_dir",
    "cpu_has_bf16",
    "file_sha256",
    "list_builtin",
    "load_bundle",
    "read_meta",
    "resolve_model",
    "resolve_precision",
    "save_bundle",
]

#: The bundle format this geoseg writes and the newest it reads.
FORMAT_VERSION = 1
#: Name of the zip entry that holds the metadata.
META_ENTRY = "geoseg.json"
#: The built-in model used when none is named.
DEFAULT_MODEL = "buildings"
#: Values of ``load_bundle(precision=...)``; ``auto`` picks one for this machine (``resolve_precision``).
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")

# Entries every file written by keras' ``model.save`` has.
_KERAS_ENTRIES = ("config.json", "metadata.json")


# --- metadata --------------------------------------------------------------------------------------


def _fail(message: str) -> BundleError:
    return BundleError(f"invalid bundle metadata: {message}")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _as_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def _as_tuple(name: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _fail(f"{name} must be a list, got {value!r}")
    return tuple(value)


#: Per-class clean-up defaults (``geoseg.vector.cleanup``), optional: written only when set, so bundles
#: without them read as before, also in a geoseg that predates them.
CLEANUP_FIELDS = ("sieve_m2", "max_hole_m2", "simplify_m")


@dataclass(frozen=True)
class ClassInfo:
    """One output class: its name (also the GeoPackage layer name), RGB colour and default clean-up
    of its polygons: minimum polygon area in square metres (smaller polygons are dropped when
    vectorising), regions below ``sieve_m2`` merged into their neighbours and holes below
    ``max_hole_m2`` filled before polygonizing, edges simplified with a tolerance of ``simplify_m``
    metres (0: off). ``threshold`` is the class's decision threshold (``geoseg.tiling.blend.decision_bias``):
    with two classes a pixel takes this class where its probability is at least ``threshold``; 0.5 is
    the plain most-probable class."""

    name: str
    color: tuple[int, int, int]
    min_area_m2: float = 0.0
    sieve_m2: float = 0.0
    max_hole_m2: float = 0.0
    simplify_m: float = 0.0
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise _fail(f"class name must be a non-empty string, got {self.name!r}")
        color = _as_tuple(f"color of class {self.name!r}", self.color)
        if len(color) != 3 or any(
            isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 255 for c in color
        ):
            raise _fail(
                f"color of class {self.name!r} must be three whole numbers 0-255 (R, G, B), "
                f"got {self.color!r}"
            )
        object.__setattr__(self, "color", color)
        for key in ("min_area_m2", *CLEANUP_FIELDS):
            value = _as_float(f"{key} of class {self.name!r}", getattr(self, key))
            if value < 0:
                raise _fail(f"{key} of class {self.name!r} must be >= 0, got {value}")
            object.__setattr__(self, key, value)
        threshold = _as_float(f"threshold of class {self.name!r}", self.threshold)
        if not 0 < threshold < 1:
            raise _fail(f"threshold of class {self.name!r} must be between 0 and 1 (exclusive), got {threshold}")
        object.__setattr__(self, "threshold", threshold)

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "color": list(self.color), "min_area_m2": self.min_area_m2}
        d.update({k: getattr(self, k) for k in CLEANUP_FIELDS if getattr(self, k)})
        if self.threshold != 0.5:  # written only when set, like the clean-up fields
            d["threshold"] = self.threshold
        return d

    @classmethod
    def from_dict(cls, d: Any) -> ClassInfo:
        if not isinstance(d, dict):
            raise _fail(f"each class must be an object with name and color, got {d!r}")
        try:
            return cls(**d)
        except TypeError as exc:
            raise _fail(f"bad class entry {d!r}: {exc}") from None


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class BundleMeta:
    """Everything geoseg needs to know about a model besides its weights.

    Validated on construction (BundleError naming the bad field); lists are turned into tuples.
    """

    name: str
    classes: tuple[ClassInfo, ...]  # class id == index
    background: tuple[int, ...]  # class ids never vectorised, e.g. (0,)
    bands: tuple[str, ...]  # band order the model expects, e.g. ("red", "green", "blue")
    mean: tuple[float, ...]  # normalisation statistics (also inside the model's Normalize layer)
    std: tuple[float, ...]
    architecture: str  # "unet" | "segnet" | other
    arch_config: dict[str, Any]  # the builder's keyword arguments
    size_multiple: int  # tile sizes must be multiples of this
    tile_size: int = 512
    overlap: int = 128
    gsd: float | None = None  # training ground sample distance, metres/pixel
    gsd_range: tuple[float, float] | None = None
    # The training imagery's data type and its 2nd-98th percentile of pixel values (all bands): a
    # scene of another type (uint16 satellite data on a model trained on uint8 photos) is stretched
    # linearly so that its own 2nd-98th percentiles land on this range.
    dtype: str = ""
    value_range: tuple[float, float] | None = None
    # zooms of the working grid predict runs and merges by default (geoseg.scales), and how
    scales: tuple[float, ...] = (1.0,)
    scale_merge: str = "mean"
    description: str = ""
    format_version: int = FORMAT_VERSION
    geoseg_version: str = geoseg.__version__
    created: str = ""  # ISO-8601 UTC, filled by save_bundle when empty

    def __post_init__(self) -> None:
        self._check_strings_and_version()
        self._check_classes()
        self._check_bands()
        self._check_network_and_tiles()
        self._check_scale_and_values()

    def _check_strings_and_version(self) -> None:
        for name in ("name", "architecture", "description", "geoseg_version", "created"):
            if not isinstance(getattr(self, name), str):
                raise _fail(f"{name} must be a string, got {getattr(self, name)!r}")
        if not self.name.strip():
            raise _fail("name must not be empty")
        version = _as_int("format_version", self.format_version, minimum=1)
        if version > FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} was made by a newer geoseg (this one reads up to "
                f"{FORMAT_VERSION}); upgrade geoseg"
            )

    def _check_classes(self) -> None:
        classes = tuple(
            c if isinstance(c, ClassInfo) else ClassInfo.from_dict(c)
            for c in _as_tuple("classes", self.classes)
        )
        if not classes:
            raise _fail("classes must list at least one class")
        names = [c.name for c in classes]
        if len(set(names)) != len(names):
            raise _fail(f"class names must be unique, got {names}")
        object.__setattr__(self, "classes", classes)

        background = tuple(
            _as_int("background class id", b, minimum=0) for b in _as_tuple("background", self.background)
        )
        if any(b >= len(classes) for b in background):
            raise _fail(
                f"background class ids must be < {len(classes)} (the number of classes), "
                f"got {list(background)}"
            )
        object.__setattr__(self, "background", background)

    def _check_bands(self) -> None:
        set_ = object.__setattr__
        bands = _as_tuple("bands", self.bands)
        if not bands or any(not isinstance(b, str) or not b for b in bands):
            raise _fail(f"bands must be a non-empty list of band names, got {self.bands!r}")
        set_(self, "bands", bands)
        mean = tuple(_as_float("mean", v) for v in _as_tuple("mean", self.mean))
        std = tuple(_as_float("std", v) for v in _as_tuple("std", self.std))
        if len(mean) != len(bands) or len(std) != len(bands):
            raise _fail(
                f"mean and std need one value per band ({len(bands)} bands: {list(bands)}), "
                f"got mean={list(mean)} and std={list(std)}"
            )
        if any(s <= 0 for s in std):
            raise _fail(f"std must be > 0 for every band, got {list(std)}")
        set_(self, "mean", mean)
        set_(self, "std", std)

    def _check_network_and_tiles(self) -> None:
        if not isinstance(self.arch_config, dict):
            raise _fail(f"arch_config must be an object, got {self.arch_config!r}")
        try:  # keep it JSON-native (tuples -> lists) so that from_dict(to_dict(m)) == m
            object.__setattr__(self, "arch_config", json.loads(json.dumps(self.arch_config)))
        except (TypeError, ValueError) as exc:
            raise _fail(f"arch_config must be JSON-serialisable: {exc}") from None

        multiple = _as_int("size_multiple", self.size_multiple, minimum=1)
        tile = _as_int("tile_size", self.tile_size, minimum=1)
        overlap = _as_int("overlap", self.overlap, minimum=0)
        if tile % multiple:
            raise _fail(f"tile_size {tile} must be a multiple of size_multiple {multiple}")
        if 2 * overlap >= tile:
            raise _fail(f"overlap {overlap} must be less than half of tile_size {tile}")

    def _check_scale_and_values(self) -> None:
        set_ = object.__setattr__
        if self.gsd is not None:
            gsd = _as_float("gsd", self.gsd)
            if gsd <= 0:
                raise _fail(f"gsd must be > 0 metres per pixel, got {gsd}")
            set_(self, "gsd", gsd)
        if self.gsd_range is not None:
            rng = tuple(_as_float("gsd_range", v) for v in _as_tuple("gsd_range", self.gsd_range))
            if len(rng) != 2 or not 0 < rng[0] <= rng[1]:
                raise _fail(f"gsd_range must be [min, max] with 0 < min <= max, got {self.gsd_range!r}")
            set_(self, "gsd_range", rng)
        from geoseg.zooms import check_scales

        scales = tuple(_as_float("scales", v) for v in _as_tuple("scales", self.scales))
        try:
            check_scales(scales, self.scale_merge, what="scales")
        except InputError as exc:
            raise _fail(str(exc)) from None
        set_(self, "scales", scales)
        if not isinstance(self.dtype, str):
            raise _fail(f"dtype must be a string such as 'uint8', got {self.dtype!r}")
        if self.value_range is not None:
            vr = tuple(_as_float("value_range", v) for v in _as_tuple("value_range", self.value_range))
            if len(vr) != 2 or not vr[0] < vr[1]:
                raise _fail(f"value_range must be [low, high] with low < high, got {self.value_range!r}")
            set_(self, "value_range", vr)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def colors(self) -> tuple[tuple[int, int, int], ...]:
        return tuple(c.color for c in self.classes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); ``from_dict(to_dict())`` gives an equal object."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["classes"] = [c.to_dict() for c in self.classes]
        for key in ("background", "bands", "mean", "std", "scales"):
            d[key] = list(d[key])
        if self.gsd_range is not None:
            d["gsd_range"] = list(self.gsd_range)
        if self.value_range is not None:
            d["value_range"] = list(self.value_range)
        d["arch_config"] = dict(self.arch_config)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> BundleMeta:
        """Validate and build; BundleError names the bad field. Unknown keys are ignored."""
        if not isinstance(d, dict):
            raise _fail(f"expected a JSON object, got {type(d).__name__}")
        version = d.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} was made by a newer geoseg (this one reads up to "
                f"{FORMAT_VERSION}); upgrade geoseg"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - d.keys())
        if missing:
            raise _fail(f"missing field(s) {', '.join(missing)}")
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its file, metadata, sha256 (the model id) and the Keras model."""

    path: Path
    meta: BundleMeta
    sha256: str
    model: keras.Model = field(repr=False)
    precision: str = "float32"


# --- files -----------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_or_blank(path: str | os.PathLike[str]) -> str:
    """:func:`file_sha256` of a scene for the run metadata, or "" where there is no single file to
    hash (a VRT or a remote path)."""
    try:
        return file_sha256(path)
    except OSError:
        return ""


def release_keras() -> None:
    """Drop Keras' global state and collect garbage, so a model no longer referenced frees memory."""
    import gc

    import keras

    keras.backend.clear_session()
    gc.collect()


def _model_io(model: keras.Model) -> tuple[int | None, int | None]:
    """(input channels, output channels) of a single-input, single-output image model."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise BundleError(
            f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "a geoseg model takes one image batch (B, H, W, bands) and returns one logits batch "
            "(B, H, W, classes)"
        )
    return model.inputs[0].shape[-1], model.outputs[0].shape[-1]


def _normalize_stats(model: keras.Model) -> tuple[list[float], list[float]] | None:
    from geoseg.models.layers import Normalize

    for layer in model.layers:
        if isinstance(layer, Normalize):
            return (
                [float(v) for v in layer.mean.numpy()],
                [float(v) for v in layer.std.numpy()],
            )
    return None


def save_bundle(model: keras.Model, meta: BundleMeta, path: str | os.PathLike[str]) -> str:
    """Save ``model`` with ``meta`` as a bundle at ``path`` (must end in ``.keras``); return its sha256.

    Checks that the metadata fits the model (one band name per input channel, one class per output
    channel, the same statistics as the model's ``Normalize`` layer). Fills ``meta.created`` when
    empty. Writes to a temporary ``.keras`` file in the same folder and renames it into place, so
    ``path`` is never half-written. An existing file at ``path`` is replaced.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise InputError(f"a bundle file name must end in .keras, got {str(path)!r}; rename it")
    if not path.parent.is_dir():
        raise InputError(f"folder {str(path.parent)!r} does not exist; create it first")
    if not isinstance(meta, BundleMeta):
        raise InputError(f"meta must be a BundleMeta, got {type(meta).__name__}")

    in_ch, out_ch = _model_io(model)
    if in_ch != len(meta.bands):
        raise BundleError(
            f"the model takes {in_ch} input channels but the metadata names {len(meta.bands)} bands "
            f"{list(meta.bands)}; give one band name per input channel"
        )
    if out_ch != len(meta.classes):
        raise BundleError(
            f"the model returns {out_ch} classes but the metadata lists {len(meta.classes)} "
            f"{list(meta.class_names)}; give one ClassInfo per output channel"
        )
    stats = _normalize_stats(model)
    if stats is not None:
        mean, std = stats
        close = all(
            math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
            for a, b in zip(mean + std, list(meta.mean) + list(meta.std))
        )
        if not close:
            raise BundleError(
                f"the model's Normalize layer has mean={mean}, std={std} but the metadata says "
                f"mean={list(meta.mean)}, std={list(meta.std)}; make them the same"
            )
    if not meta.created:
        meta = dataclasses.replace(meta, created=_utc_now())
    payload = json.dumps(meta.to_dict(), indent=2, sort_keys=True)

    # A unique hidden name in the same folder (so the rename is atomic), still ending in .keras
    # (keras insists); created by model.save, so it gets the usual permissions.
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}.keras"
    try:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(META_ENTRY, payload)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file_sha256(path)


def read_meta(path: str | os.PathLike[str]) -> BundleMeta:
    """Read a bundle's metadata without Keras. BundleError (naming the file) when it is not one."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"model file not found: {str(path)!r}; check the path")
    if not path.is_file():
        raise BundleError(f"{str(path)!r} is not a file; pass a .keras bundle file")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if not all(n in names for n in _KERAS_ENTRIES):
                raise BundleError(
                    f"{str(path)!r} is a zip file but not a .keras model file (no config.json / "
                    "metadata.json); save the model with geoseg.models.save_bundle"
                )
            if META_ENTRY not in names:
                raise BundleError(
                    f"not a geoseg bundle: {str(path)!r} is a Keras model without {META_ENTRY}; "
                    "save it with geoseg.models.save_bundle"
                )
            raw = zf.read(META_ENTRY)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as exc:
        raise BundleError(
            f"{str(path)!r} is not a .keras model file (not a readable zip: {exc}); it may be "
            "truncated or corrupted: copy or download it again"
        ) from None
    except OSError as exc:
        raise BundleError(f"cannot read model file {str(path)!r}: {exc}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"malformed {META_ENTRY} in {str(path)!r}: {exc}") from None
    try:
        return BundleMeta.from_dict(data)
    except BundleError as exc:
        raise BundleError(f"{str(path)!r}: {exc}") from None


# --- loading and precision -------------------------------------------------------------------------


def _with_precision(model: keras.Model, policy: str) -> keras.Model:
    """A copy of a functional/Sequential ``model`` whose layers compute in ``policy``, with the same
    weights; the ``Normalize`` layer, input layers and the output layer(s) stay float32.

    Saved configs carry each layer's dtype, so the global policy alone would not change them; this
    rewrites every layer config instead and never touches the global policy.
    """
    import keras

    from geoseg.models.layers import Normalize

    config = model.get_config()
    layers = config.get("layers")
    if not isinstance(layers, list):
        raise BundleError(
            f"precision {policy!r} needs a functional or Sequential model, but {model.name!r} is a "
            f"subclassed {type(model).__name__}; load it with precision='float32'"
        )
    if "output_layers" in config:
        outs = config["output_layers"]
        outs = [outs] if outs and isinstance(outs[0], str) else outs
        keep = {o[0] for o in outs}
    else:
        keep = {layers[-1]["config"]["name"]} if layers else set()

    changed = False
    for layer_config in layers:
        layer = model.get_layer(layer_config["config"].get("name", layer_config.get("name")))
        if isinstance(layer, (keras.layers.InputLayer, Normalize)):
            continue
        target = "float32" if layer.name in keep else policy
        if layer.dtype_policy.name != target:
            layer_config["config"]["dtype"] = target
            changed = True
    if not changed:
        return model
    rebuilt = type(model).from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def cpu_has_bf16(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 in hardware: the ``amx_bf16`` or ``avx512_bf16`` flag of
    Linux's ``/proc/cpuinfo`` (False where there is no such file)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"amx_bf16", "avx512_bf16"} & set(line.partition(":")[2].split()))
    except OSError:
        pass
    return False


def resolve_precision(precision: str, encoder: str = "none") -> str:
    """The precision ``precision`` stands for on this machine and model: ``auto`` is
    ``mixed_bfloat16`` only where it was measured faster than float32 (docs/performance.md): under
    TensorFlow with no GPU, on a CPU with bfloat16 instructions, for the plain U-Net and SegNet
    (``encoder="none"``; 1.3-1.6x the float32 throughput on an AMX CPU, the same held-back IoU).
    Models on the depthwise EfficientNet-Lite0 encoder ran slower in bfloat16 than in float32 on a
    CPU with ``avx512_bf16`` but no AMX, so ``auto`` keeps them in float32 on every CPU, as it does
    GPUs, the JAX and PyTorch backends and CPUs that would emulate bfloat16. Other values are
    returned as they are."""
    if precision != "auto":
        return precision
    import keras

    if encoder != "none" or keras.backend.backend() != "tensorflow" or not cpu_has_bf16():
        return "float32"
    import tensorflow as tf

    return "float32" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"


def load_bundle(path: str | os.PathLike[str], *, precision: str = "float32") -> Bundle:
    """Load a bundle: metadata, sha256 and the Keras model (not compiled).

    ``precision``: ``"float32"``, ``"mixed_bfloat16"`` (faster on CPUs with AMX), ``"mixed_float16"``
    (GPUs) or ``"auto"`` (:func:`resolve_precision`; ``Bundle.precision`` holds what it chose). Mixed
    precision computes every layer in 16 bits except the ``Normalize`` layer and the logits, which
    stay float32. The global Keras dtype policy is left as it was.
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    path = Path(path)
    meta = read_meta(path)
    sha256 = file_sha256(path)
    if path.suffix != ".keras":
        raise BundleError(f"Keras loads only files ending in .keras; rename {str(path)!r}")

    import keras

    import geoseg.models.layers  # noqa: F401  (registers the custom layers before loading)

    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
        if bad is not None:
            raise BundleError(
                f"{str(path)!r} is corrupted (zip entry {bad!r} fails its checksum); copy or "
                "download it again"
            )
        model = keras.saving.load_model(path, compile=False)
    except BundleError:
        raise
    except Exception as exc:  # keras/h5py/zip raise many types; give the user one line
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise BundleError(
            f"cannot load the model in {str(path)!r} ({type(exc).__name__}: {detail}); the file may "
            "be corrupted or need a newer geoseg/Keras"
        ) from exc

    in_ch, out_ch = _model_io(model)
    if in_ch != len(meta.bands) or out_ch != len(meta.classes):
        raise BundleError(
            f"{str(path)!r}: the model takes {in_ch} bands and returns {out_ch} classes but its "
            f"metadata names {len(meta.bands)} bands and {len(meta.classes)} classes; re-save it "
            "with geoseg.models.save_bundle"
        )
    precision = resolve_precision(precision, meta.arch_config.get("encoder", "none"))
    model = _with_precision(model, precision)
    return Bundle(path=path, meta=meta, sha256=sha256, model=model, precision=precision)


# --- built-in models -------------------------------------------------------------------------------


def builtin_dir() -> Path:
    """The folder holding the bundles shipped with geoseg (``geoseg/models/bundled``)."""
    return Path(__file__).resolve().parent / "bundled"


def _builtin_paths() -> dict[str, Path]:
    folder = builtin_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.keras")) if p.is_file()}


def list_builtin() -> list[dict[str, Any]]:
    """One dict per bundled model, sorted by name; ``name`` is the file name without ``.keras``
    (what ``--model NAME`` takes). No Keras needed."""
    rows = []
    for name, path in _builtin_paths().items():
        meta = read_meta(path)
        rows.append(
            {
                "name": name,
                "path": str(path),
                "sha256": file_sha256(path),
                "classes": list(meta.class_names),
                "thresholds": {c.name: c.threshold for c in meta.classes if c.threshold != 0.5},
                "bands": list(meta.bands),
                "gsd": meta.gsd,
                "gsd_range": list(meta.gsd_range) if meta.gsd_range else None,
                "architecture": meta.architecture,
                "encoder": meta.arch_config.get("encoder", "none"),
                "tile_size": meta.tile_size,
                "overlap": meta.overlap,
                "scales": list(meta.scales),
                "scale_merge": meta.scale_merge,
                "description": meta.description,
                "default": name == DEFAULT_MODEL,
            }
        )
    return rows


def resolve_model(name_or_path: str | os.PathLike[str] | None) -> Path:
    """The bundle file for ``--model``: ``None`` means the built-in ``buildings``; an existing file
    is used as is; otherwise a built-in name. BundleError names the value and lists the choices."""
    value = DEFAULT_MODEL if name_or_path is None else name_or_path
    path = Path(value)
    if path.is_file():
        return path
    builtins = _builtin_paths()
    if str(value) in builtins:
        return builtins[str(value)]
    if path.exists():
        raise BundleError(f"--model {str(value)!r} is a folder; pass a .keras bundle file")
    if builtins:
        choices = f"built-in models: {', '.join(builtins)}"
    else:
        choices = "no built-in models are bundled with this geoseg yet"
    if name_or_path is None:
        raise BundleError(
            f"no model given and the default built-in model {DEFAULT_MODEL!r} is missing "
            f"({choices}); pass --model NAME or --model PATH to a .keras bundle"
        )
    raise BundleError(
        f"unknown model {str(value)!r}: not an existing file nor a built-in name ({choices}); "
        "pass --model NAME or --model PATH to a .keras bundle"
    )
