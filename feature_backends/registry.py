"""The one table of backends: name → "module:Class" (and optional preset conf), imported lazily.

Lazy imports keep optional dependencies optional: `recon run` with SIFT never imports kornia or romatch.
A dotted "package.module:Class" is accepted wherever a name is, so external backends need no registration.
Adding a backend is one file plus one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from .base import Backend
from .errors import ConfigError

KINDS = ("features", "matcher", "dense", "global")

# name: "module:Class" or ("module:Class", preset conf merged under the user's conf)
BACKENDS: dict[str, dict[str, str | tuple[str, dict[str, Any]]]] = {
    "features": {
        "sift": "feature_backends.sift:SIFT",
        "dedode": "feature_backends.dedode:DeDoDe",
        "dad": "feature_backends.dad:DaD",
        "disk": "feature_backends.disk:DISK",
        "aliked": "feature_backends.aliked:ALIKED",
        "gim-superpoint": "feature_backends.gim_lightglue:GIMSuperPoint",
        "superpoint": "feature_backends.superpoint:SuperPoint",
        "xfeat": "feature_backends.xfeat:XFeat",
    },
    "matcher": {
        "mnn": "feature_backends.nearest_neighbor:MutualNearestNeighbor",
        "dual-softmax": "feature_backends.dual_softmax:DualSoftmax",
        "lightglue": "feature_backends.lightglue:LightGlue",
        "gim-lightglue": "feature_backends.gim_lightglue:GIMLightGlue",
        "minima-lightglue": "feature_backends.minima_lightglue:MinimaLightGlue",
        "lighterglue": "feature_backends.xfeat:LighterGlue",
    },
    "dense": {
        "roma": "feature_backends.roma:RoMa",
        "roma-indoor": ("feature_backends.roma:RoMa", {"variant": "indoor"}),
        "tiny-roma": "feature_backends.roma:TinyRoMa",
        "minima-roma": ("feature_backends.roma:RoMa", {"variant": "minima"}),
        "gim-roma": "feature_backends.gim:GIMRoMa",
        "gim-dkm": "feature_backends.gim:GIMDKM",
        "xfeat-star": "feature_backends.xfeat:XFeatStar",
    },
    "global": {
        "vlad": "pairs.vlad:VLAD",
        "netvlad": "pairs.netvlad:NetVLAD",
        "cosplace": "pairs.cosplace:CosPlace",
    },
}


def _check_kind(kind: str) -> None:
    if kind not in BACKENDS:
        raise ConfigError(f"unknown backend kind '{kind}'; kinds: {', '.join(KINDS)}")


def names(kind: str) -> list[str]:
    _check_kind(kind)
    return sorted(BACKENDS[kind])


def resolve(kind: str, name: str) -> tuple[type[Backend], dict[str, Any]]:
    """The backend class for `name` and its preset conf."""
    _check_kind(kind)
    entry = BACKENDS[kind].get(name)
    if entry is None:
        if ":" not in name:
            raise ConfigError(f"unknown {kind} backend '{name}'; known: {', '.join(names(kind)) or 'none'}")
        entry = name  # an external "package.module:Class"
    target, preset = (entry, {}) if isinstance(entry, str) else entry
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"{kind} backend '{name}' needs a package that is not installed: {error}. "
            "Install recon's optional extras (see README)."
        ) from error
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"'{target}' is not a recon backend class")
    if cls.kind != kind:
        raise ConfigError(f"'{name}' is a {cls.kind} backend, not a {kind} backend")
    return cls, dict(preset)


def get_backend(kind: str, name: str, conf: Mapping[str, Any] | None = None, device: Any = None) -> Backend:
    cls, preset = resolve(kind, name)
    from .base import merge_conf

    merged = merge_conf(cls.full_default_conf(), preset) if preset else {}
    if conf:
        merged = merge_conf(cls.full_default_conf() if not merged else merged, conf)
    return cls(merged or None, device=device)
