"""The dense matchers' stage: dense matches → per-image keypoints shared across pairs → hloc features.h5 + matches.h5.

SfM needs each 3D point observed at *one* keypoint per image, but a dense matcher answers per pair: the same
surface point gets a slightly different pixel in every pair, and tracks break. Two published remedies:
- **quantised** (`--matcher roma`; hloc's match_dense): sampled matches snapped to a grid, one keypoint per
  occupied cell, shared by all pairs of that image (recon.dense.quantised);
- **anchored** (`--matcher sift+roma`, `dad+roma`, …; image-matching-webui's DaD(RoMa)): keypoints detected once
  per image by a sparse backend (features.h5 written by the extraction stage), matched through the pair's warp,
  with track consistency and keypoint propagation (recon.dense.anchored).

`match_dense(conf, pairs_path, image_dir, features_path, matches_path, options)`: `conf` names the dense backend
(and, anchored, its detector: "sift+roma") with the backend's own keys; `options` (DenseOptions) holds the
stage's keys of both modes. For compatibility, stage keys given inside `conf` (`--matcher-conf cell_size=8`)
are moved to the options.

Why our own code: hloc's match_dense needs hloc and a LoFTR-style matcher interface; romatch's match_keypoints
is a dense (N0 x N1) `cdist` (1.6 GB for two 20k-keypoint images) with the radius in normalised units (so pixels
differ between axes and images); here the search is scipy's cKDTree in pixels.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feature_backends import registry
from feature_backends.errors import ConfigError
from pairs.io import read_pairs

from ..options import option
from .anchored import match_anchored
from .quantised import match_quantised

logger = logging.getLogger(__name__)

ANCHOR_SEPARATOR = "+"


@dataclass
class DenseOptions:
    # Quantised mode
    cell_size: int = option(4, help="quantised: px; samples of different pairs in one cell become one keypoint")
    max_error: int = option(2, help="quantised: px; sub-bin size that fixes the keypoint position inside its cell")
    max_keypoints: int | None = option(16384, help="quantised: keypoints per image, highest total certainty first")
    # Anchored mode
    radius: float = option(3.0, help="anchored: px in image 1, how far a warped keypoint may land from its match")
    cycle: bool = option(True, help="anchored: with a symmetric warp, the match must map back to the same keypoint")
    exclusive: bool = option(False, help="anchored: refuse a match when a second keypoint lies within radius")
    consistent: bool = option(True, help="anchored: refuse matches that would give a track two keypoints in one image")
    propagate: bool = option(True, help="anchored: add a keypoint where a warped keypoint has none within radius")

    QUANTISED = ("cell_size", "max_error", "max_keypoints")
    ANCHORED = ("radius", "cycle", "exclusive", "consistent", "propagate")

    def mode_settings(self, anchored: bool) -> dict[str, Any]:
        return {key: getattr(self, key) for key in (self.ANCHORED if anchored else self.QUANTISED)}


def parse_matcher_name(name: str) -> tuple[str | None, str]:
    """'sift+roma' → ('sift', 'roma'); 'roma' → (None, 'roma')."""
    anchor, separator, dense = name.rpartition(ANCHOR_SEPARATOR)
    if not separator:
        return None, name
    if not anchor or not dense:
        raise ConfigError(f"'{name}': an anchored dense matcher is written FEATURES+DENSE, e.g. sift+roma")
    return anchor, dense


def is_dense_matcher(name: str) -> bool:
    """Whether `recon run --matcher NAME` selects this stage (a dense backend, optionally with anchors)."""
    _, dense = parse_matcher_name(name)
    if dense in registry.BACKENDS["dense"]:
        return True
    if ":" in dense:  # an external "package.module:Class"
        try:
            registry.resolve("dense", dense)
        except ConfigError:
            return False
        return True
    return False


def _stage_keys(backend_conf: dict[str, Any], options: DenseOptions, anchored: bool) -> DenseOptions:
    """Stage keys found in the backend conf (the documented `--matcher-conf cell_size=8`) moved to the options;
    a key of the other mode is an error."""
    own, other = (DenseOptions.ANCHORED, DenseOptions.QUANTISED) if anchored else (DenseOptions.QUANTISED,
                                                                                   DenseOptions.ANCHORED)
    moved = {}
    for key in list(backend_conf):
        if key in own:
            moved[key] = backend_conf.pop(key)
        elif key in other:
            mode = "anchored" if anchored else "quantised"
            raise ConfigError(f"'{key}' is a setting of the other dense keypoint mode, not of the {mode} mode")
    return dataclasses.replace(options, **moved)


def match_dense(
    conf: Mapping[str, Any] | str,
    pairs_path: str | Path,
    image_dir: str | Path,
    features_path: str | Path,
    matches_path: str | Path,
    options: DenseOptions | None = None,
    device: Any = None,
    mask_dir: str | Path | None = None,
    executor=None,
) -> Path:
    """Match every pair of `pairs_path` with a dense matcher; write keypoints and matches in hloc's layout.

    Quantised mode writes features.h5 itself; anchored mode (`"sift+roma"`) reads the detector's keypoints from
    features.h5, which the extraction stage wrote with that detector (recon.extract), and refuses other ones.
    With `mask_dir` (recon.extract's convention), quantised mode drops every sampled match with an end on a masked
    pixel; anchored mode matches the extraction stage's keypoints, which that stage already masked.
    `executor` (recon.executor): with Ray, both modes run the network on workers (pairs sharded by first image);
    what depends on the order of the pairs (anchored mode's anchoring, track check and propagation) and the
    writes stay here.
    """
    name, backend_conf = registry.split_conf(conf)
    anchor, dense_name = parse_matcher_name(name)
    options = _stage_keys(backend_conf, options or DenseOptions(), anchored=anchor is not None)
    image_dir = Path(image_dir)
    pairs = read_pairs(pairs_path)
    distributed = executor is not None and executor.executor != "local"
    # With Ray workers, the driver's model only records the configuration: keep it on CPU.
    model = registry.get_backend("dense", dense_name, backend_conf, device="cpu" if distributed else device)
    if anchor is None:
        match_quantised(model, dense_name, pairs, image_dir, features_path, matches_path, mask_dir=mask_dir,
                        executor=executor, remote=(dense_name, backend_conf, device), **options.mode_settings(False))
    else:
        require_warp(dense_name)
        check_anchors(features_path, anchor)
        match_anchored(model, dense_name, pairs, image_dir, features_path, matches_path, executor=executor,
                       remote=(dense_name, backend_conf, device), **options.mode_settings(True))
    return Path(matches_path)


def require_warp(dense_name: str) -> None:
    """Anchored mode maps keypoints through a dense warp; a backend that predicts matches only (LoFTR) is refused
    before any work."""
    cls, _ = registry.resolve("dense", dense_name)
    if not cls.has_warp:
        raise ConfigError(f"anchored mode needs a dense warp, but '{dense_name}' predicts matches, not a warp; use "
                          f"--matcher {dense_name} alone (quantised keypoints)")


def check_anchors(features_path: str | Path, anchor: str) -> None:
    """Anchored mode matches the keypoints of `anchor`; features.h5 must hold that detector's."""
    from feature_backends.store import read_stored_conf

    record = read_stored_conf(features_path) if Path(features_path).is_file() else None
    if record is None:
        raise ConfigError(f"'{features_path}' holds no features; anchored matching needs the '{anchor}' keypoints "
                          f"first (recon extract … --features {anchor})")
    if record.get("backend") != anchor:
        raise ConfigError(f"'{features_path}' holds '{record.get('backend')}' keypoints, but the matcher anchors on "
                          f"'{anchor}'; extract with --features {anchor}, or name the matcher "
                          f"{record.get('backend')}+…")
