"""How to run a model over a scene: ``PredictOptions``, checked once, and each setting resolved
against the model's own defaults (thresholds, minimum areas, clean-up, zooms)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from geoseg.tiling.blend import WINDOWS, resolve_thresholds
from geoseg.errors import InputError
from geoseg.models.bundle import PRECISIONS


#: ``--stretch``: map a scene's value range onto the training imagery's when their data types differ, or not.
STRETCHES = ("auto", "none")
#: ``--polygonize``: once the model is done, or strip by strip beside it.
POLYGONIZE = ("after", "live")


@dataclass(frozen=True)
class PredictOptions:
    """How to run a model over a scene. ``None`` means "the bundle's default"."""

    tile_size: int | None = None
    overlap: int | None = None
    batch_size: int = 2  # CPU: throughput flat from 1 to 8, memory +100 MiB per tile (benchmarks/batch_size.py)
    blend: str = "cosine"
    precision: str = "auto"  # bfloat16 where measured faster (bf16 CPUs, plain U-Net/SegNet), else float32 (bundle.resolve_precision)
    bands: tuple[int, ...] | None = None
    assume_crs: str | None = None
    min_area_m2: float | Mapping[str, float] | None = None  # one value, or {class: m²} over the model's
    prefetch: int = 2
    chunk_width: int = 8192  # scenes wider than this are blended in column chunks (bounds memory)
    gsd: str = "auto"  # "auto": resample when outside the model's GSD range; "native"; or metres
    force: bool = False  # let --gsd native run a scene more than GSD_FAR times outside the model's range
    stretch: str = "auto"  # "auto": match value ranges when the scene's dtype differs from the model's; "none"
    tta: str = "none"  # test-time augmentation: "none", "flips" (4 passes) or "d4" (8 passes)
    # zooms of the working grid run and merged (geoseg.inference.scales), e.g. (1.0, 2.0); None: the model's
    scales: tuple[float, ...] | None = None
    scale_merge: str | None = None  # "max" or "mean"; None: the model's
    # decision threshold: one value, or {class: probability} over the model's per-class thresholds
    threshold: float | Mapping[str, float] | None = None
    # clean-up (geoseg.vector.cleanup): one value, or {class: value} over the model's per-class defaults
    sieve_m2: float | Mapping[str, float] | None = None
    max_hole_m2: float | Mapping[str, float] | None = None
    simplify_m: float | Mapping[str, float] | None = None
    # "after": polygonize once the model is done; "live": a scene of one column chunk beside the model,
    # strip by strip. Live pays only where the model leaves a core free (a GPU, or fewer TensorFlow
    # threads than cores): 0.95 of model-alone throughput against 0.88 with TensorFlow on one of the
    # 2 cores; with TensorFlow on both it slowed the model and gave 0.81 against 0.85
    # (benchmarks/pipeline.py --polygonize, docs/performance.md).
    polygonize: str = "after"


#: Names a user may give an option under besides its field name (the command line's and the
#: manifests' spelling): ``min_area`` is ``min_area_m2``, ``sieve`` ``sieve_m2`` and so on.
ALIASES = {"min_area": "min_area_m2", "sieve": "sieve_m2", "max_hole": "max_hole_m2", "simplify": "simplify_m"}
_PER_CLASS = {"threshold": ("threshold", "P"), "min_area_m2": ("min-area", "M2"), "sieve_m2": ("sieve", "M2"),
              "max_hole_m2": ("max-hole", "M2"), "simplify_m": ("simplify", "M")}


def options_from(values: Mapping[str, object], *, where: str = "--") -> PredictOptions:
    """PredictOptions from option values as a user writes them: command-line strings, a batch
    manifest's ``[predict]`` table (TOML types) or Python values, under their field names or the
    command line's (``min-area``, ``sieve``; see ALIASES). Per-class values may be one number,
    ``"building=0.3,water=0.6"`` or a mapping; zooms ``"1,2"`` or a list; bands a list. ``None``
    leaves the default. Unknown names and bad values are an InputError naming the option as
    ``where`` + its name (``--threshold``, or ``[predict] threshold`` with ``where="[predict] "``)."""
    import dataclasses

    from geoseg.vector.cleanup import parse_per_class
    from geoseg.zooms import parse_scales

    fields = {f.name for f in dataclasses.fields(PredictOptions)}
    kw: dict[str, object] = {}
    for key, value in values.items():
        name = ALIASES.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if name not in fields:
            known = sorted((fields - set(ALIASES.values())) | set(ALIASES))
            raise InputError(f"{where if where.startswith('[') else 'predict '}option {key!r} is unknown; "
                             f"the options are {', '.join(known)}")
        if value is not None:
            kw[name] = value
    for name, (option, unit) in _PER_CLASS.items():
        value = kw.get(name)
        if isinstance(value, str):
            kw[name] = parse_per_class(value, where + option, unit)
        elif isinstance(value, Mapping):
            kw[name] = {str(k): float(v) for k, v in value.items()}
    if "scales" in kw:
        kw["scales"] = parse_scales(kw["scales"], where + "scales")
    if "bands" in kw:
        kw["bands"] = tuple(int(b) for b in kw["bands"])
    if "gsd" in kw:
        kw["gsd"] = str(kw["gsd"])
    try:
        options = PredictOptions(**kw)
    except TypeError as exc:
        raise InputError(f"{where.strip() or 'predict options'}: {exc}") from None
    check_options(options)
    return options


def as_options(options: PredictOptions | Mapping[str, object] | None, *, check: bool = True) -> PredictOptions:
    """The jobs' ``options`` argument: PredictOptions as they are (checked unless ``check=False``),
    a mapping of option values parsed (and checked) by :func:`options_from`, None the defaults."""
    if options is None:
        return PredictOptions()
    if isinstance(options, Mapping):
        return options_from(options, where="")
    if not isinstance(options, PredictOptions):
        raise InputError(f"options must be PredictOptions or a mapping of option values, got {type(options).__name__}")
    if check:
        check_options(options)
    return options


Progress = Callable[[int, int], None]  # (tiles done, tiles total)


TTA = {
    # (turns of 90°, flip left-right) applied to each tile; the logits are turned back and averaged
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, False), (2, True)),  # identity, left-right, 180°, up-down
    "d4": tuple((k, f) for k in range(4) for f in (False, True)),
}


def check_options(options: PredictOptions) -> None:
    if options.batch_size <= 0:
        raise InputError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.tile_size is not None and options.tile_size <= 0:
        raise InputError(f"--tile-size must be a positive number of pixels, got {options.tile_size}")
    if options.overlap is not None and options.overlap < 0:
        raise InputError(f"--overlap must be 0 or more pixels, got {options.overlap}")
    if options.precision not in PRECISIONS:
        raise InputError(f"--precision {options.precision!r} is not one of {', '.join(PRECISIONS)}")
    if options.blend not in WINDOWS:
        raise InputError(f"--blend {options.blend!r} is not one of {', '.join(WINDOWS)}")
    if options.stretch not in STRETCHES:
        raise InputError(f"--stretch {options.stretch!r} is not one of {', '.join(STRETCHES)}")
    if options.tta not in TTA:
        raise InputError(f"--tta {options.tta!r} is not one of {', '.join(TTA)}")
    if options.polygonize not in POLYGONIZE:
        raise InputError(f"--polygonize {options.polygonize!r} is not one of {', '.join(POLYGONIZE)}")
    from geoseg.zooms import MERGES, check_scales

    if options.scales is not None:
        check_scales(options.scales, options.scale_merge or "mean")
    elif options.scale_merge is not None and options.scale_merge not in MERGES:
        raise InputError(f"--scale-merge {options.scale_merge!r} is not one of {', '.join(MERGES)}")


def scales_for(options: PredictOptions, meta) -> tuple[tuple[float, ...], str]:
    """The zooms to run and how to merge them (``geoseg.inference.scales``): the options', else the model's."""
    return (options.scales or meta.scales, options.scale_merge or meta.scale_merge)


def thresholds(options: PredictOptions, meta) -> dict[str, float]:
    """Decision threshold per class: the model's values, replaced by ``--threshold`` (one number for
    every class but background, or some classes by name). InputError for unknown class names or values outside (0, 1)."""
    return resolve_thresholds(options.threshold, {c.name: c.threshold for c in meta.classes},
                              [meta.class_names[i] for i in meta.background])


def min_areas(options: PredictOptions, meta) -> dict[str, float]:
    """Minimum polygon area per class: the model's values, replaced by ``--min-area`` (one number for
    every class, or some classes by name). InputError for unknown class names or negative areas."""
    from geoseg.vector.cleanup import per_class

    return per_class(options.min_area_m2, {c.name: c.min_area_m2 for c in meta.classes}, "--min-area")


def cleanup_for(options: PredictOptions, meta):
    """The clean-up of the polygons (``geoseg.vector.cleanup.Cleanup``): the model's per-class defaults,
    replaced by ``--sieve``, ``--max-hole`` and ``--simplify`` (one value for every class, or some
    classes by name). InputError for unknown class names or negative values."""
    from geoseg.vector.cleanup import SETTINGS, Cleanup, per_class

    return Cleanup(**{key: per_class(getattr(options, key), {c.name: getattr(c, key) for c in meta.classes},
                                     option, unit) for key, (option, unit) in SETTINGS.items()})


def parse_min_area(text: str | None) -> float | dict[str, float] | None:
    """``"4"`` -> 4.0 (every class); ``"building=10,water=200"`` -> {class: m²}."""
    from geoseg.vector.cleanup import parse_per_class

    return parse_per_class(text, "--min-area")


def building_class(class_names) -> int:
    """The id of the class ``--regularize`` works on (``building``); InputError if there is none."""
    if "building" not in class_names:
        raise InputError(f"--regularize squares building outlines, but the classes are {', '.join(class_names)}; "
                         f"it needs a class named building")
    return list(class_names).index("building")
