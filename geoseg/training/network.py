"""The network a run trains: built from the config, or taken (with its weights) from the bundle
it fine-tunes (``--init-from``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geoseg.errors import InputError
from geoseg.training.config import TrainConfig


def build_network(cfg: TrainConfig, bands: int, classes: int, mean: Sequence[float], std: Sequence[float], precision: str):
    import keras

    from geoseg.models import build_model

    kwargs = arch_config(cfg, bands, classes)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        return build_model(cfg.arch, **kwargs, mean=list(mean), std=list(std))
    finally:
        keras.config.set_dtype_policy(previous)


def _init_meta(init_from: str):
    """The metadata of the ``--init-from`` bundle; InputError when there is no such model."""
    from geoseg.errors import BundleError
    from geoseg.models import read_meta, resolve_model

    try:
        path = resolve_model(init_from)
    except BundleError:
        raise InputError(f"--init-from {init_from}: no such model file nor built-in model; give a .keras bundle "
                         f"written by geoseg train or a name that `geoseg models` lists") from None
    return path, read_meta(path)


def architecture_of(init_from: str) -> dict[str, Any]:
    """The training options that rebuild the ``--init-from`` bundle's network: ``arch`` and
    ``encoder``, and ``width`` and ``depth`` for geoseg's own encoder. The CLI fills in those a
    fine-tuning run leaves unset, so ``--init-from buildings`` needs no architecture options."""
    _, meta = _init_meta(init_from)
    encoder = meta.arch_config.get("encoder", "none")
    found: dict[str, Any] = {"arch": meta.architecture, "encoder": encoder}
    if encoder == "none":
        found.update(width=meta.arch_config.get("width"), depth=meta.arch_config.get("depth"))
    return {k: v for k, v in found.items() if v is not None}


def starting_bundle(cfg: TrainConfig, class_names: Sequence[str]):
    """The metadata of ``cfg.init_from`` (None without it), checked against the run's architecture
    and classes before any data is read. InputError says what differs and how to match it."""
    if not cfg.init_from:
        return None
    path, meta = _init_meta(cfg.init_from)
    wanted = {"arch": cfg.arch, "encoder": cfg.encoder}
    has = {"arch": meta.architecture, "encoder": meta.arch_config.get("encoder", "none")}
    if cfg.encoder == "none" and has["encoder"] == "none":
        wanted.update(width=cfg.width, depth=cfg.depth)
        has.update(width=meta.arch_config.get("width"), depth=meta.arch_config.get("depth"))
    differ = [f"--{k} {has[k]} (not {wanted[k]})" for k in wanted if has[k] != wanted[k]]
    if tuple(meta.class_names) != tuple(class_names):
        differ.append(f"--classes {','.join(meta.class_names)} (not {','.join(class_names)})")
    if differ:
        raise InputError(f"--init-from {path.name} is a different model; fine-tuning it needs {', '.join(differ)}")
    return meta


def load_start_weights(model, cfg: TrainConfig) -> None:
    """Give ``model`` the weights of the ``--init-from`` bundle (same architecture, checked)."""
    from geoseg.models import load_bundle, resolve_model

    weights = load_bundle(resolve_model(cfg.init_from)).model.get_weights()
    if [w.shape for w in weights] != [tuple(v.shape) for v in model.weights]:
        raise InputError(f"--init-from {Path(cfg.init_from).name}: its weights do not fit a {arch_text(cfg)}; "
                         f"it was written by another version of geoseg")
    model.set_weights(weights)


def arch_text(cfg: TrainConfig) -> str:
    if cfg.encoder != "none":
        return f"{cfg.arch} on {cfg.encoder}"
    return f"{cfg.arch} (width {cfg.width}, depth {cfg.depth})"


def arch_config(cfg: TrainConfig, bands: int, classes: int) -> dict[str, Any]:
    if cfg.encoder != "none":
        from geoseg.models.unet import LITE0_DECODER

        return {"bands": bands, "classes": classes, "encoder": cfg.encoder, "decoder_widths": list(LITE0_DECODER)}
    return {"bands": bands, "classes": classes, "width": cfg.width, "depth": cfg.depth}


def size_multiple_of(cfg: TrainConfig) -> int:
    """Chip and tile sizes must be multiples of this: 32 on an encoder, else 2**depth."""
    from geoseg.models import size_multiple

    if cfg.encoder != "none":
        return 32
    depth = cfg.depth
    return size_multiple(depth) if isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0 else 1
