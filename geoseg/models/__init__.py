"""Segmentation models and the bundle format that carries them with their metadata.

Importing this package does not import Keras: the bundle metadata (``read_meta``, ``list_builtin``,
``resolve_model``, ``file_sha256``) works without it, and Keras is imported only when a model is
built (``build_model``, ``geoseg.models.unet``, ``geoseg.models.segnet``) or loaded
(``load_bundle``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from geoseg.errors import InputError
from geoseg.models.bundle import (
    FORMAT_VERSION,
    PRECISIONS,
    Bundle,
    BundleMeta,
    ClassInfo,
    builtin_dir,
    cpu_has_bf16,
    file_sha256,
    list_builtin,
    load_bundle,
    read_meta,
    resolve_model,
    resolve_precision,
    save_bundle,
)

if TYPE_CHECKING:
    import keras

__all__ = [
    "ARCHITECTURES",
    "FORMAT_VERSION",
    "PRECISIONS",
    "Bundle",
    "BundleMeta",
    "ClassInfo",
    "build_model",
    "builtin_dir",
    "cpu_has_bf16",
    "file_sha256",
    "list_builtin",
    "load_bundle",
    "read_meta",
    "resolve_model",
    "resolve_precision",
    "save_bundle",
    "size_multiple",
]

#: architecture name -> "module:function" of its builder, imported only when used.
ARCHITECTURES: dict[str, str] = {
    "unet": "geoseg.models.unet:build_unet",
    "segnet": "geoseg.models.segnet:build_segnet",
}


def size_multiple(depth: int) -> int:
    """Tile height and width must be multiples of this for a model that pools ``depth`` times."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise InputError(f"depth must be a whole number >= 0, got {depth!r}")
    return 2**depth


def build_model(architecture: str, **kwargs: Any) -> keras.Model:
    """Build a model by architecture name, e.g. ``build_model("unet", bands=3, classes=2)``.

    The keyword arguments go to the builder unchanged (see ``build_unet`` / ``build_segnet``).
    Raises InputError for an unknown architecture, naming the known ones.
    """
    target = ARCHITECTURES.get(str(architecture).lower())
    if target is None:
        raise InputError(
            f"unknown architecture {architecture!r}; choose one of: {', '.join(ARCHITECTURES)}"
        )
    module_name, func_name = target.split(":")
    builder = getattr(importlib.import_module(module_name), func_name)
    return builder(**kwargs)
