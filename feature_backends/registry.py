"""The one table of backends: name → "module:Class" (and optional preset conf), imported lazily.

Lazy imports keep optional dependencies optional: `recon run` with SIFT never imports kornia or romatch.
A dotted "package.module:Class" is accepted wherever a name is, so external backends need no registration.
Adding a backend is one file plus one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from .base import Backend, deep_update, merge_conf
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
        "loma": "feature_backends.loma:LoMaFeatures",
        "omniglue": "feature_backends.omniglue:OmniGlueFeatures",
        "superpoint": "feature_backends.superpoint:SuperPoint",
        "xfeat": "feature_backends.xfeat:XFeat",
    },
    "matcher": {
        "mnn": "feature_backends.nearest_neighbor:MutualNearestNeighbor",
        "dual-softmax": "feature_backends.dual_softmax:DualSoftmax",
        "lightglue": "feature_backends.lightglue:LightGlue",
        "gim-lightglue": "feature_backends.gim_lightglue:GIMLightGlue",
        "loma": "feature_backends.loma:LoMaMatcher",
        "omniglue": "feature_backends.omniglue:OmniGlueMatcher",
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
        "loftr": "feature_backends.loftr:LoFTRMatcher",
        "loftr-indoor": ("feature_backends.loftr:LoFTRMatcher", {"variant": "indoor", "resize_max": 640}),
        "loftr-indoor-new": ("feature_backends.loftr:LoFTRMatcher", {"variant": "indoor_new", "resize_max": 640}),
        "minima-loftr": ("feature_backends.loftr:LoFTRMatcher",
                         {"variant": "minima", "resize_max": 640, "resize_force": True}),
        "gim-loftr": "feature_backends.gim_loftr:GIMLoFTR",
        "imd": "unavailable",  # see UNAVAILABLE
        "romav2": "feature_backends.romav2:RoMaV2",
        "xfeat-star": "feature_backends.xfeat:XFeatStar",
    },
    "global": {
        "vlad": "feature_backends.vlad:VLAD",
        "netvlad": "feature_backends.netvlad:NetVLAD",
        "cosplace": "feature_backends.cosplace:CosPlace",
    },
}

# Published methods recon cannot offer, and why: listed with the others, and naming one answers with the reason.
UNAVAILABLE: dict[str, str] = {
    "imd": "IMD (ICCV 2025, diffusion features) has no public code or weights (none could be found), so recon "
           "cannot run it; use loftr, roma or gim-roma instead",
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
    if name in UNAVAILABLE:
        raise ConfigError(f"{kind} backend '{name}' is not available: {UNAVAILABLE[name]}")
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


def split_conf(conf: Mapping[str, Any] | str) -> tuple[str, dict[str, Any]]:
    """`{"name": ..., **rest}` or hloc's `{"model": {...}, "preprocessing": {...}}` → (name, backend conf).

    Every preprocessing key is passed on, so one the backend does not know is an error naming it (hloc's
    `interpolation`, for example, has no counterpart here)."""
    if isinstance(conf, str):
        return conf, {}
    conf = dict(conf)
    if "model" in conf:
        model = dict(conf.pop("model"))
        preprocessing = dict(conf.pop("preprocessing", {}) or {})
        conf.pop("output", None)
        conf = {**model, **preprocessing, **conf}
    if "name" not in conf:
        raise ConfigError("a stage configuration needs a backend 'name'")
    name = conf.pop("name")
    return name, conf


def _overrides(preset: Mapping[str, Any], conf: Mapping[str, Any] | None) -> dict[str, Any]:
    """The user's conf deep-merged over the registry preset: what the backend merges over its defaults."""
    return deep_update(preset, conf or {})


def get_backend(kind: str, name: str, conf: Mapping[str, Any] | None = None, device: Any = None) -> Backend:
    """Build a backend: its defaults, the registry preset on top, the user's conf on top of that; the backend's
    constructor merges and checks them once."""
    cls, preset = resolve(kind, name)
    return cls(_overrides(preset, conf) or None, device=device)


def preflight(kind: str, name: str, conf: Mapping[str, Any] | None = None) -> list[str]:
    """Check a backend's configuration and find (or fetch) every weight file it will load, without building it:
    what a run does for all its backends before the first stage. Returns the files' paths."""
    from .weights import resolve_weights

    cls, preset = resolve(kind, name)
    merged = merge_conf(cls.full_default_conf(), _overrides(preset, conf), where=f"{cls.__name__}.")
    return [str(resolve_weights(weight, explicit)) for weight, explicit in cls.required_weights(merged)]
