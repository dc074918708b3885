"""The dense matchers' stage: dense warps → per-image keypoints shared across pairs → hloc features.h5 + matches.h5.

SfM needs each 3D point observed at *one* keypoint per image, but a dense matcher answers per pair: the same
surface point gets a slightly different pixel in every pair, and tracks break. Two published remedies:

1. **Quantised** (`--matcher roma`; hloc's match_dense, used there for LoFTR): per pair, sample matches; snap
   each to a grid of `cell_size` px; every occupied cell of an image becomes one keypoint, shared by all pairs of
   that image. The keypoint sits at the `max_error`-px sub-bin with the largest accumulated certainty (the
   certainty-weighted mean of the samples in that sub-bin); its score is the cell's total certainty. Within a
   pair, many-to-one conflicts keep only the match that wins on both sides (summed certainty).
   Streaming and resume: pass 1 runs the network pair by pair and stores only the sampled matches
   (`keypoints0/keypoints1/scores` in the pair's group, as hloc does), never a warp, so memory does not grow
   with the number of pairs and a killed run restarts at the first unmatched pair. Pass 2 reads them back pair
   by pair to accumulate the sub-bins of each image (bounded by the image area / max_error²); pass 3 writes
   features.h5 and each pair's `matches0`. Keypoint ids are cells in raster order, so they do not depend on
   the order pairs were matched in, and a resumed run equals an uninterrupted one.
2. **Anchored** (`--matcher sift+roma`, `dad+roma`, ...; image-matching-webui's DaD(RoMa)): keypoints are
   detected once per image by any sparse backend of the registry and written to features.h5 by the normal
   extraction stage; per pair, image 0's keypoints are mapped through the dense warp, and a match is the
   nearest keypoint of image 1 within `radius` px that maps back (backward warp of a symmetric matcher: cycle
   consistency) or is mutually nearest (one-directional matchers, as romatch's match_keypoints) and whose
   certainty exceeds the backend's `min_certainty`. A keypoint is the same object in every pair, but the
   pairwise rule is not transitive (a->b, b->c, a->c' with c' a few pixels from c), so a union-find over the
   matches so far refuses any match that would give a track two keypoints of one image (`consistent`); on the
   generated plane scene this is what removes the last 5 % of observations that shared an image with another
   observation of their 3D point. Memory holds one warp at a time.
   **Propagation** (`propagate`, image-matching-webui's keypoint propagation): a detector does not fire at every
   view of a point (SIFT on the plane scene: a detected keypoint within 3 px in 7.25 of the 9.79 frames where the
   point is visible), so a track stops where the detector missed. With propagation, a keypoint whose warped
   position has no keypoint of the other image within `radius` (certainty above the threshold, and mapping back
   to itself with a symmetric warp and `cycle`) gives that image a new keypoint at the warped position, matched
   to its source; later pairs use it as a detected one, so the track continues through it. A proposal is refused
   if the source's track already has a keypoint in that image (the same union-find), or if a keypoint added
   earlier in the pair lies within `radius` (one keypoint, not two, per spot). Added keypoints are appended
   after the detected ones in features.h5 (detected ones keep their indices; `keypoints.attrs['detected']`
   counts them) with zero descriptors and score 0: they were not detected, and nothing downstream (COLMAP's
   import, the dense stage) reads their descriptors. Resume: added keypoints are kept in memory and published
   to features.h5 before every publication of matches.h5, so no stored match refers to an unstored keypoint;
   a restarted run keeps the appended keypoints up to the highest index a stored match refers to and drops the
   rest (those of pairs whose matches were lost), which is exactly the state after the last stored pair. At
   the end, matches0 of pairs written before their image 0 gained keypoints are padded with -1 to hloc's one
   entry per keypoint.

Why our own code: hloc's match_dense needs hloc and a LoFTR-style matcher interface; romatch's match_keypoints
is a dense (N0 x N1) `cdist` (1.6 GB for two 20k-keypoint images) with the radius in normalised units (so pixels
differ between axes and images); here the search is scipy's cKDTree in pixels.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial import cKDTree
from tqdm import tqdm

from feature_backends import registry
from feature_backends.errors import ConfigError, ImageReadError
from feature_backends.images import image_size, read_image
from feature_backends.store import FeatureReader, FeatureWriter, MatchReader, MatchWriter, read_stored_conf
from pairs.io import read_pairs

from .memo import ByteBudgetCache
from .stages import extract, pending_pairs, split_conf

logger = logging.getLogger(__name__)

ANCHOR_SEPARATOR = "+"
QUANTISED_DEFAULTS: dict[str, Any] = {
    "cell_size": 4,  # px: samples of different pairs in one cell become one keypoint
    "max_error": 2,  # px: sub-bin size that fixes the keypoint position inside its cell
    "max_keypoints": 16384,  # per image, highest total certainty first (None: all cells)
}
ANCHORED_DEFAULTS: dict[str, Any] = {
    "radius": 3.0,  # px in image 1: how far a warped keypoint may land from its match
    "cycle": True,  # with a symmetric warp, require the match to map back to the same keypoint
    "exclusive": False,  # refuse a match when a second keypoint lies within `radius` of the warped position
    "consistent": True,  # refuse matches that would give a track two keypoints in one image
    "propagate": True,  # add a keypoint where a warped keypoint has none within `radius` (module docstring)
}


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


def _split_stage_conf(conf: dict[str, Any], defaults: Mapping[str, Any], other: Mapping[str, Any],
                      mode: str) -> dict[str, Any]:
    stage = dict(defaults)
    for key in list(conf):
        if key in defaults:
            stage[key] = conf.pop(key)
        elif key in other:
            raise ConfigError(f"'{key}' is a setting of the other dense keypoint mode, not of the {mode} mode")
    return stage


def match_dense(
    conf: Mapping[str, Any] | str,
    pairs_path: str | Path,
    image_dir: str | Path,
    features_path: str | Path,
    matches_path: str | Path,
    features: str = "sift",
    feature_conf: Mapping[str, Any] | None = None,
    device: Any = None,
) -> tuple[Path, Path]:
    """Match every pair of `pairs_path` with a dense matcher; write keypoints and matches in hloc's layout.

    `conf` = {"name": "roma" | "sift+roma" | ..., **backend conf, **stage conf}. Stage keys: quantised mode
    cell_size, max_error, max_keypoints; anchored mode radius, cycle, exclusive, consistent, propagate. In
    anchored mode `feature_conf`
    configures the anchor detector and is only accepted when `features` names that same detector.
    """
    name, backend_conf = split_conf(conf)
    anchor, dense_name = parse_matcher_name(name)
    image_dir = Path(image_dir)
    pairs = read_pairs(pairs_path)
    if anchor is None:
        stage = _split_stage_conf(backend_conf, QUANTISED_DEFAULTS, ANCHORED_DEFAULTS, "quantised")
        model = registry.get_backend("dense", dense_name, backend_conf, device=device)
        match_quantised(model, dense_name, pairs, image_dir, features_path, matches_path, **stage)
    else:
        stage = _split_stage_conf(backend_conf, ANCHORED_DEFAULTS, QUANTISED_DEFAULTS, "anchored")
        _require_warp(registry.resolve("dense", dense_name)[0], name, dense_name)  # before any extraction
        if feature_conf and features != anchor:
            raise ConfigError(
                f"the feature configuration given is for '{features}', but '{name}' anchors on '{anchor}'; "
                f"pass --features {anchor} with it, or drop it"
            )
        anchor_conf = dict(feature_conf or {}) if features == anchor else {}
        names = sorted({n for pair in pairs for n in pair})
        extract({"name": anchor, **anchor_conf}, image_dir, features_path, names, device=device)
        model = registry.get_backend("dense", dense_name, backend_conf, device=device)
        match_anchored(model, dense_name, pairs, image_dir, features_path, matches_path, **stage)
    return Path(features_path), Path(matches_path)


def _require_warp(backend, name: str, dense_name: str) -> None:
    """Anchored mode maps keypoints through a dense warp; matchers that answer with matches only (LoFTR) have none."""
    if not hasattr(backend, "warp_images"):
        raise ConfigError(
            f"'{name}': anchored mode needs a dense warp to map keypoints through, and '{dense_name}' predicts "
            f"matches, not a warp; use it in quantised mode (--matcher {dense_name})"
        )


# Per-image encodings (e.g. RoMa's encoder features, ~0.5 GB per image at 560/864 in float32) kept for the
# pairs that revisit an image; the two images of the current pair are always kept whatever their size.
ENCODED_CACHE_BYTES = 2 << 30


def encoded_images(model, image_dir: Path, max_bytes: int = ENCODED_CACHE_BYTES) -> ByteBudgetCache:
    """Image name → the backend's per-image encoding (`WarpMatcher.encode`; the decoded image for others)."""
    encode = getattr(model, "encode", lambda image: {"image": image})
    return ByteBudgetCache(lambda name: encode(read_image(Path(image_dir) / name)), max_bytes=max_bytes)


def grouped_by_first_image(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Pairs reordered so that those sharing their first image are consecutive (first appearance order): with
    an LRU cache of encodings, the first image of a group is encoded once for all its partners."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for pair in pairs:
        groups.setdefault(pair[0], []).append(pair)
    return [pair for group in groups.values() for pair in group]


def _warp(model, encoded: ByteBudgetCache, name0: str, name1: str):
    if hasattr(model, "warp_encoded"):
        return model.warp_encoded(encoded[name0], encoded[name1])
    return model.warp_images(encoded[name0]["image"], encoded[name1]["image"])


def _sampled_matches(model, encoded: ByteBudgetCache, name0: str, name1: str) -> dict[str, np.ndarray]:
    if hasattr(model, "match_encoded"):
        return model.match_encoded(encoded[name0], encoded[name1])
    return model.match_images(encoded[name0]["image"], encoded[name1]["image"])


# --------------------------------------------------------------------------------------------------------------
# Anchored mode


def _positions(keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keypoint positions and the first keypoint at each. SIFT returns one keypoint per dominant
    orientation at the same position (a third of them on textured images): as anchors they are one point, and
    searching them separately would leave the choice between them to the tie-breaking of the search."""
    positions, first = np.unique(np.asarray(keypoints, np.float32), axis=0, return_index=True)
    return positions, first


def _nearest(positions: np.ndarray, queries: np.ndarray, radius: float, exclusive: bool):
    """Index of the nearest position within `radius` of each query (len(positions) = none). With `exclusive`,
    a query with a second position within `radius` gets none: which of two close keypoints is nearest then
    depends on sub-pixel noise that differs from pair to pair, so the pairs of a track would disagree."""
    if exclusive:
        distance, index = cKDTree(positions).query(queries, k=2, distance_upper_bound=radius)
        return np.where(np.isfinite(distance[:, 0]) & ~np.isfinite(distance[:, 1]), index[:, 0], len(positions))
    _, index = cKDTree(positions).query(queries, distance_upper_bound=radius)
    return index


@dataclass
class _Proposals:
    """Keypoints a pair proposes to add to one of its images (propagation): for each, the keypoint of the other
    image it comes from (`source`, an index into that image's keypoints), its position in this image and the
    certainty of the warp there (the smaller of the two directions when the cycle was checked)."""

    source: np.ndarray
    points: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls) -> _Proposals:
        return cls(np.zeros(0, np.int64), np.zeros((0, 2), np.float32), np.zeros(0, np.float32))


def _inside(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Points on the image (hloc convention: pixel centres at integers, the image covers [-0.5, size - 0.5))."""
    return (points >= -0.5).all(axis=1) & (points[:, 0] < size[0] - 0.5) & (points[:, 1] < size[1] - 0.5)


def _proposals(positions_from, first_from, projected, certainty, positions_to, size_to, back, radius, min_certainty,
               exclusive) -> _Proposals:
    """Keypoints of one image whose warped position has no keypoint of the other image within `radius` (so no
    match is possible there) become proposals at that position; `back` maps the positions back for the cycle
    check (None: no check)."""
    free = certainty > min_certainty
    if len(positions_to):
        free &= ~np.isfinite(cKDTree(positions_to).query(projected, distance_upper_bound=radius)[0])
    free &= _inside(projected, size_to)
    index = np.flatnonzero(free)
    points, scores = projected[index], certainty[index]
    if back is not None and len(index):
        returned, certainty_back = back(points)
        keep = (certainty_back > min_certainty) & (_nearest(positions_from, returned, radius, exclusive) == index)
        index, points, scores = index[keep], points[keep], np.minimum(scores, certainty_back)[keep]
    return _Proposals(first_from[index].astype(np.int64), points.astype(np.float32), scores.astype(np.float32))


def anchor_matches(warp, keypoints0: np.ndarray, keypoints1: np.ndarray, radius: float, min_certainty: float,
                   cycle: bool = True, exclusive: bool = False, propagate: bool = False):
    """matches0 (N0,) (-1 = none) and scores (N0,) from a dense warp between two keypoint sets.

    Keypoints at one position count as one; the match goes to the first of them in each image. With `propagate`,
    also the keypoints each image could gain (`_Proposals` for image 1, then for image 0): a keypoint whose warped
    position has no keypoint of the other image within `radius`, whose certainty passes and which (symmetric warp
    with `cycle`) maps back to itself. Image 0 gains keypoints only from a symmetric warp."""
    n0 = len(keypoints0)
    matches0, scores0 = np.full(n0, -1, np.int32), np.zeros(n0, np.float32)
    proposals = (_Proposals.empty(), _Proposals.empty())
    if n0 == 0 and len(keypoints1) == 0:
        return (matches0, scores0, *proposals) if propagate else (matches0, scores0)
    positions0, first0 = _positions(keypoints0)
    positions1, first1 = _positions(keypoints1)
    projected0, certainty0 = warp.transfer(positions0)
    check_cycle = cycle and warp.symmetric
    if warp.symmetric and (check_cycle or propagate):
        projected1, certainty1 = warp.transfer_back(positions1)
    if propagate:
        to1 = _proposals(positions0, first0, projected0, certainty0, positions1, warp.size1,
                         warp.transfer_back if check_cycle else None, radius, min_certainty, exclusive)
        to0 = _Proposals.empty()
        if warp.symmetric:
            to0 = _proposals(positions1, first1, projected1, certainty1, positions0, warp.size0,
                             warp.transfer if check_cycle else None, radius, min_certainty, exclusive)
        proposals = (to1, to0)
    if n0 == 0 or len(keypoints1) == 0:
        return (matches0, scores0, *proposals) if propagate else (matches0, scores0)
    nearest1 = _nearest(positions1, projected0, radius, exclusive)
    valid0 = (nearest1 < len(positions1)) & (certainty0 > min_certainty)
    candidate = np.flatnonzero(valid0)
    chosen = partner = np.zeros(0, np.int64)
    scores = np.zeros(0, np.float32)
    if check_cycle:
        nearest0 = _nearest(positions0, projected1, radius, exclusive)
        valid1 = (nearest0 < len(positions0)) & (certainty1 > min_certainty)
        back = nearest1[candidate]
        keep = valid1[back] & (nearest0[back] == candidate)
        chosen, partner = candidate[keep], back[keep]
        scores = np.minimum(certainty0[chosen], certainty1[partner])
    elif len(candidate):
        # One direction only: keypoint 1 accepts the nearest of the warped keypoints 0 (mutual nearest).
        nearest_warped = _nearest(projected0[candidate], positions1, radius, exclusive)
        back = nearest1[candidate]
        owner = np.full(len(positions1) + 1, -1)
        found = nearest_warped < len(candidate)
        owner[:-1][found] = candidate[nearest_warped[found]]
        keep = owner[back] == candidate
        chosen, partner = candidate[keep], back[keep]
        scores = certainty0[chosen]
    matches0[first0[chosen]] = first1[partner]
    scores0[first0[chosen]] = scores
    return (matches0, scores0, *proposals) if propagate else (matches0, scores0)


class _Tracks:
    """Union-find over the keypoints matched so far, refusing any match that would join two keypoints of one
    image into one track. Pairwise rules (nearest within a radius, cycle check) are not transitive: a->b, b->c
    and a->c' with c != c' happens wherever two keypoints of an image are a few pixels apart, and COLMAP then
    builds one track with two observations in that image. Matches are taken pair by pair in the order of the
    pairs file, best score first inside a pair, so a resumed run decides exactly as an uninterrupted one."""

    def __init__(self):
        self.parent: dict[tuple[int, int], tuple[int, int]] = {}
        self.images: dict[tuple[int, int], set[int]] = {}

    def _root(self, node):
        parent = self.parent.setdefault(node, node)
        if parent == node:
            self.images.setdefault(node, {node[0]})
            return node
        root = self._root(parent)
        self.parent[node] = root
        return root

    def add(self, image0: int, image1: int, matches0: np.ndarray, scores0: np.ndarray) -> np.ndarray:
        """Drop (set to -1) the matches that would make a track inconsistent; union the others."""
        matches0 = matches0.copy()
        matched = np.flatnonzero(matches0 >= 0)
        for index in matched[np.argsort(-scores0[matched], kind="stable")]:
            root0, root1 = self._root((image0, int(index))), self._root((image1, int(matches0[index])))
            if root0 == root1:
                continue
            images0, images1 = self.images[root0], self.images[root1]
            if not images0.isdisjoint(images1):
                matches0[index] = -1
                continue
            if len(images0) < len(images1):
                root0, root1, images0, images1 = root1, root0, images1, images0
            self.parent[root1] = root0
            images0 |= images1
            del self.images[root1]
        return matches0

    def attach(self, node: tuple[int, int], new: tuple[int, int]) -> bool:
        """Put a keypoint that is in no track yet (`new`, just proposed) into `node`'s track, unless that track
        already has a keypoint in the new one's image."""
        root = self._root(node)
        if new[0] in self.images[root]:
            return False
        self.parent[new] = root
        self.images[root].add(new[0])
        return True


def _propagate(tracks: _Tracks | None, image_ids: tuple[int, int], counts: tuple[int, int], matches0: np.ndarray,
               scores0: np.ndarray, proposals: tuple[_Proposals, _Proposals], radius: float):
    """Accept proposals after the pair's matches (best certainty first, proposals into image 1 first on ties):
    one is refused if its source keypoint is matched in this pair, if a keypoint accepted before it in this pair
    lies within `radius` of its position, or if its source's track already has a keypoint in its image. Returns
    matches0 / scores0 extended to the keypoints image 0 gains, and the positions each image gains (appended
    after its `counts` keypoints, in this order)."""
    to1, to0 = proposals
    matched0 = matches0 >= 0
    matched1 = set(matches0[matched0].tolist())
    order = np.argsort(-np.concatenate([to1.scores, to0.scores]), kind="stable")
    added: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])  # image 0, image 1
    sources: tuple[list[int], list[int]] = ([], [])  # keypoint of the other image each added one matches
    scores: tuple[list[float], list[float]] = ([], [])
    cells: tuple[dict, dict] = ({}, {})
    for k in order:
        target, proposal, k = (1, to1, k) if k < len(to1.scores) else (0, to0, k - len(to1.scores))
        source, point = int(proposal.source[k]), proposal.points[k]
        if (matched0[source] if target == 1 else source in matched1):
            continue
        cx, cy = (int(v) for v in np.floor(point / radius))
        near = [p for dx in (-1, 0, 1) for dy in (-1, 0, 1) for p in cells[target].get((cx + dx, cy + dy), ())]
        if any(np.hypot(*(point - p)) <= radius for p in near):
            continue
        new_index = counts[target] + len(added[target])
        if tracks is not None and not tracks.attach((image_ids[1 - target], source), (image_ids[target], new_index)):
            continue
        cells[target].setdefault((cx, cy), []).append(point)
        added[target].append(point)
        sources[target].append(source)
        scores[target].append(float(proposal.scores[k]))
        if target == 1:
            matched0[source] = True
        else:
            matched1.add(source)
    matches0 = np.concatenate([matches0, np.asarray(sources[0], np.int32)]).astype(np.int32)
    scores0 = np.concatenate([scores0, np.asarray(scores[0], np.float32)]).astype(np.float32)
    if added[1]:
        matches0[np.asarray(sources[1])] = counts[1] + np.arange(len(added[1]))
        scores0[np.asarray(sources[1])] = scores[1]
    gained = tuple(np.asarray(points, np.float32).reshape(-1, 2) for points in added)
    return matches0, scores0, gained[0], gained[1]


class _AnchorKeypoints:
    """Each image's keypoints during the anchored stage: those stored in features.h5 when the stage started (after
    dropping appended keypoints no stored match refers to) followed by those propagation added in this run. The
    added ones stay in memory (8 bytes each) and are written to features.h5 by `flush`, which the match writer
    calls before every publication, so matches never reach disk before the keypoints they refer to."""

    def __init__(self, reader: FeatureReader, stored: Mapping[str, int]):
        self.stored = dict(stored)
        self.cache = ByteBudgetCache(lambda name: reader.read_keypoints(name)[:self.stored[name]], max_bytes=256 << 20)
        self.added: dict[str, np.ndarray] = {}
        self.pending: dict[str, list[np.ndarray]] = {}
        self.writer: FeatureWriter | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        stored = self.cache[name]
        return np.concatenate([stored, self.added[name]]) if name in self.added else stored

    def count(self, name: str) -> int:
        return self.stored[name] + len(self.added.get(name, ()))

    def add(self, name: str, points: np.ndarray) -> None:
        if len(points):
            self.added[name] = np.concatenate([self.added.get(name, np.zeros((0, 2), np.float32)), points])
            self.pending.setdefault(name, []).append(points)

    def flush(self) -> None:
        if self.writer is None:
            return
        for name, parts in self.pending.items():
            self.writer.append_keypoints(name, np.concatenate(parts))
        self.pending.clear()
        self.writer.publish()


def _stored_keypoints(features_path, matches_path, pairs, image_ids, tracks: _Tracks | None):
    """Keypoints to keep per image at the start of the anchored stage (detected ones, and appended ones up to the
    highest index a stored match refers to: propagation appends in pair order and every added keypoint is
    matched by the pair that added it, so this drops exactly those of pairs whose matches were lost), and the
    tracks of the stored matches rebuilt."""
    with FeatureReader(features_path) as features:
        counts = {name: features.keypoint_counts(name) for name in image_ids if name in features}
    keep = {name: detected for name, (_, detected) in counts.items()}
    if Path(matches_path).is_file() and (tracks is not None or any(t > d for t, d in counts.values())):
        with MatchReader(matches_path) as done:
            for name0, name1 in pairs:
                if not done.has(name0, name1) or name0 not in keep or name1 not in keep:
                    continue
                found, _ = done.read(name0, name1)
                if not len(found):
                    continue
                keep[name0] = max(keep[name0], int(found[:, 0].max()) + 1)
                keep[name1] = max(keep[name1], int(found[:, 1].max()) + 1)
                if tracks is not None:
                    matches0 = np.full(int(found[:, 0].max()) + 1, -1, np.int64)
                    matches0[found[:, 0]] = found[:, 1]
                    tracks.add(image_ids[name0], image_ids[name1], matches0, np.ones(len(matches0)))
    return keep, {name: keep[name] for name, (total, _) in counts.items() if total > keep[name]}


def match_anchored(model, name: str, pairs: Sequence[tuple[str, str]], image_dir: Path, features_path, matches_path,
                   radius: float, cycle: bool, exclusive: bool = False, consistent: bool = True,
                   propagate: bool = True) -> Path:
    _require_warp(model, name, name)
    min_certainty = float(model.conf.get("min_certainty", 0.0))
    record = {"backend": name, "conf": model.conf.to_dict(), "mode": "anchored",
              "anchors": read_stored_conf(features_path), "radius": radius, "cycle": cycle,
              "exclusive": exclusive, "consistent": consistent, "propagate": propagate}
    encoded = encoded_images(model, image_dir)
    pairs = grouped_by_first_image(pairs)  # also the order in which tracks take their matches, resumed or not
    image_ids = {image: i for i, image in enumerate(sorted({n for pair in pairs for n in pair}))}
    tracks = _Tracks() if consistent else None
    stored, truncate = _stored_keypoints(features_path, matches_path, pairs, image_ids, tracks)
    with contextlib.ExitStack() as stack:
        features = stack.enter_context(FeatureReader(features_path))
        keypoints = _AnchorKeypoints(features, stored)
        if propagate or truncate:
            # conf=None: the extraction stage's record stays; opened before (so closed after) the match writer.
            keypoints.writer = stack.enter_context(FeatureWriter(features_path, conf=None))
            for image_name, count in truncate.items():
                keypoints.writer.truncate_keypoints(image_name, count)
        writer = stack.enter_context(MatchWriter(matches_path, conf=record, before_publish=keypoints.flush))
        todo = pending_pairs(writer, pairs, matches_path)
        skipped = []
        for name0, name1 in tqdm(todo, desc=f"match {name} (anchored)", unit="pair"):
            if name0 not in features or name1 not in features:
                skipped.append((name0, name1))  # an image the extraction stage could not read
                continue
            try:
                warp = _warp(model, encoded, name0, name1)
            except ImageReadError as error:
                logger.warning("Skipping pair (%s, %s): %s", name0, name1, error)
                skipped.append((name0, name1))
                continue
            result = anchor_matches(warp, keypoints[name0], keypoints[name1], radius, min_certainty, cycle, exclusive,
                                    propagate)
            del warp
            matches0, scores0 = result[:2]
            ids = (image_ids[name0], image_ids[name1])
            if tracks is not None:
                matches0 = tracks.add(*ids, matches0, scores0)
                scores0 = np.where(matches0 >= 0, scores0, 0).astype(np.float32)
            if propagate:
                counts = (keypoints.count(name0), keypoints.count(name1))
                matches0, scores0, gained0, gained1 = _propagate(tracks, ids, counts, matches0, scores0, result[2:],
                                                                 radius)
                keypoints.add(name0, gained0)
                keypoints.add(name1, gained1)
            writer.write(name0, name1, {"matches0": matches0, "matching_scores0": scores0})
        if propagate:
            # hloc's matches0 has one entry per keypoint of image 0: pairs written before image 0 gained keypoints
            # are padded with -1 once every image has all of its keypoints.
            for name0, name1 in pairs:
                if name0 not in features or name1 not in features or not writer.has(name0, name1):
                    continue
                raw, reversed_ = writer.read_raw(name0, name1)
                first = name1 if reversed_ else name0
                missing = keypoints.count(first) - len(raw["matches0"])
                if missing > 0:
                    writer.write(*((name1, name0) if reversed_ else (name0, name1)),
                                 {**raw, "matches0": np.r_[raw["matches0"], np.full(missing, -1, np.int32)],
                                  "matching_scores0": np.r_[raw["matching_scores0"], np.zeros(missing, np.float32)]})
    if skipped:
        logger.warning("%d pairs with unreadable images were skipped", len(skipped))
    return Path(matches_path)


# --------------------------------------------------------------------------------------------------------------
# Quantised mode


@dataclass
class _SubBins:
    """Accumulated certainty per sub-bin of one image (sparse, merged lazily)."""

    keys: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)  # columns: certainty, certainty*x, certainty*y
    pending: int = 0
    reduced: int = 0

    def add(self, keys: np.ndarray, points: np.ndarray, scores: np.ndarray) -> None:
        scores = scores.astype(np.float64)
        self.keys.append(keys)
        self.weights.append(np.stack([scores, scores * points[:, 0], scores * points[:, 1]], axis=1))
        self.pending += len(keys)
        if self.pending > max(4096, 2 * self.reduced):
            self.reduce()

    def reduce(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self.keys) != 1 or self.pending:
            keys = np.concatenate(self.keys) if self.keys else np.zeros(0, np.int64)
            weights = np.concatenate(self.weights) if self.weights else np.zeros((0, 3))
            unique, inverse = np.unique(keys, return_inverse=True)
            summed = np.zeros((len(unique), 3))
            np.add.at(summed, inverse, weights)
            self.keys, self.weights, self.reduced, self.pending = [unique], [summed], len(unique), 0
        return self.keys[0], self.weights[0]


@dataclass(frozen=True)
class _Grid:
    """Cell and sub-bin indices of pixels of one image (hloc convention, so pixel i covers [i-0.5, i+0.5))."""

    width: int
    height: int
    cell_size: int
    max_error: int

    @property
    def bins_x(self) -> int:
        return self.width // self.max_error + 2

    @property
    def cells_x(self) -> int:
        return self.width // self.cell_size + 2

    def sub_bins(self, points: np.ndarray) -> np.ndarray:
        index = np.floor((points.astype(np.float64) + 0.5) / self.max_error).astype(np.int64).clip(min=0)
        return index[:, 1] * self.bins_x + index[:, 0]

    def cells_of_bins(self, keys: np.ndarray) -> np.ndarray:
        ratio = self.cell_size // self.max_error
        by, bx = np.divmod(keys, self.bins_x)
        return (by // ratio) * self.cells_x + bx // ratio

    def cells(self, points: np.ndarray) -> np.ndarray:
        return self.cells_of_bins(self.sub_bins(points))


def _finalise_keypoints(bins: _SubBins, grid: _Grid, max_keypoints: int | None):
    """Cells → keypoints: (cell keys sorted, positions (N,2), scores (N,))."""
    keys, weights = bins.reduce()
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
    cells = grid.cells_of_bins(keys)
    order = np.lexsort((-weights[:, 0], cells))  # by cell, heaviest sub-bin first
    cells, weights = cells[order], weights[order]
    first = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
    cell_keys = cells[first]
    best = weights[first]
    positions = (best[:, 1:] / np.maximum(best[:, :1], 1e-12)).astype(np.float32)
    cell_scores = np.add.reduceat(weights[:, 0], first).astype(np.float32)
    if max_keypoints is not None and len(cell_keys) > max_keypoints:
        keep = np.sort(np.argsort(-cell_scores, kind="stable")[:max_keypoints])
        cell_keys, positions, cell_scores = cell_keys[keep], positions[keep], cell_scores[keep]
    return cell_keys, positions, cell_scores


def _pair_matches(ids0: np.ndarray, ids1: np.ndarray, scores: np.ndarray, n0: int):
    """Samples snapped to keypoint ids → one-to-one matches0 / matching_scores0 (winner on both sides)."""
    matches0, scores0 = np.full(n0, -1, np.int32), np.zeros(n0, np.float32)
    valid = (ids0 >= 0) & (ids1 >= 0)
    if not valid.any():
        return matches0, scores0
    ids0, ids1, scores = ids0[valid], ids1[valid], scores[valid].astype(np.float64)
    pair_keys, inverse = np.unique(ids0.astype(np.int64) * (ids1.max() + 1) + ids1, return_inverse=True)
    votes = np.bincount(inverse, weights=scores)
    best_score = np.zeros(len(pair_keys))
    np.maximum.at(best_score, inverse, scores)
    id0, id1 = np.divmod(pair_keys, ids1.max() + 1)
    # Keep a candidate only if no other candidate of the same id0 or id1 has more votes (ties: lower index).
    order = np.lexsort((id1, id0, -votes))
    _, first0 = np.unique(id0[order], return_index=True)
    _, first1 = np.unique(id1[order], return_index=True)
    winner0 = np.zeros(len(order), bool)
    winner1 = np.zeros(len(order), bool)
    winner0[order[first0]] = True
    winner1[order[first1]] = True
    keep = winner0 & winner1
    matches0[id0[keep]] = id1[keep]
    scores0[id0[keep]] = best_score[keep]
    return matches0, scores0


def _lookup_ids(cell_keys: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Index of each cell in the sorted `cell_keys`, or -1 (a cell dropped by max_keypoints)."""
    if len(cell_keys) == 0:
        return np.full(len(cells), -1, np.int64)
    position = np.minimum(np.searchsorted(cell_keys, cells), len(cell_keys) - 1)
    return np.where(cell_keys[position] == cells, position, -1)


def _quantised_outputs_complete(features_path, matches_path, feature_record, names, pairs) -> bool:
    """Whether a previous run already wrote keypoints for `names` and matches0 for `pairs` with this config."""
    if not Path(features_path).is_file():
        return False
    if read_stored_conf(features_path) != json.loads(json.dumps(feature_record, sort_keys=True, default=str)):
        return False
    with FeatureReader(features_path) as features, MatchReader(matches_path) as matches:
        if any(name not in features for name in names):
            return False
        return all("matches0" in matches.read_raw(*pair)[0] for pair in pairs)


def match_quantised(model, name: str, pairs: Sequence[tuple[str, str]], image_dir: Path, features_path,
                    matches_path, cell_size: int, max_error: int, max_keypoints: int | None) -> Path:
    cell_size, max_error = int(cell_size), int(max_error)
    if max_error < 1 or cell_size < max_error or cell_size % max_error:
        raise ConfigError(f"cell_size ({cell_size}) must be a multiple of max_error ({max_error}) >= 1")
    record = {"backend": name, "conf": model.conf.to_dict(), "mode": "quantised"}
    encoded = encoded_images(model, image_dir)
    failed: set[tuple[str, str]] = set()
    # Pass 1: the network, pair by pair; only sampled matches are kept (on disk).
    with MatchWriter(matches_path, conf=record) as writer:
        todo = pending_pairs(writer, grouped_by_first_image(pairs), matches_path)
        for name0, name1 in tqdm(todo, desc=f"match {name}", unit="pair"):
            try:
                sampled = _sampled_matches(model, encoded, name0, name1)
            except ImageReadError as error:
                logger.warning("Skipping pair (%s, %s): %s", name0, name1, error)
                failed.add((name0, name1))
                continue
            writer.write(name0, name1, {k: sampled[k] for k in ("keypoints0", "keypoints1", "scores")})
    pairs = [pair for pair in pairs if pair not in failed]
    names = sorted({n for pair in pairs for n in pair})
    feature_record = {**record, "cell_size": cell_size, "max_error": max_error, "max_keypoints": max_keypoints}
    if not todo and _quantised_outputs_complete(features_path, matches_path, feature_record, names, pairs):
        logger.info("Dense keypoints and matches are up to date in %s and %s", features_path, matches_path)
        return Path(matches_path)
    grids = {}
    for image_name in names:
        width, height = image_size(image_dir / image_name)
        grids[image_name] = _Grid(width, height, cell_size, max_error)

    # Pass 2: accumulate every image's sub-bins over all its pairs.
    bins = {image_name: _SubBins() for image_name in names}
    with MatchReader(matches_path) as reader:
        for name0, name1 in tqdm(pairs, desc="quantise", unit="pair"):
            raw, reversed_ = reader.read_raw(name0, name1)
            points0, points1 = (raw["keypoints1"], raw["keypoints0"]) if reversed_ else (raw["keypoints0"],
                                                                                        raw["keypoints1"])
            bins[name0].add(grids[name0].sub_bins(points0), points0, raw["scores"])
            bins[name1].add(grids[name1].sub_bins(points1), points1, raw["scores"])
    cell_keys = {}
    with FeatureWriter(features_path, conf=feature_record) as writer:
        for image_name in names:
            keys, positions, scores = _finalise_keypoints(bins.pop(image_name), grids[image_name], max_keypoints)
            cell_keys[image_name] = keys
            grid = grids[image_name]
            writer.write(image_name, {"keypoints": positions, "scores": scores,
                                      "image_size": np.array([grid.width, grid.height], np.int64)})

    # Pass 3: each pair's samples → keypoint ids → one-to-one matches, written where pass 1 stored them.
    with MatchReader(matches_path) as reader, MatchWriter(matches_path, conf=record) as writer:
        for name0, name1 in tqdm(pairs, desc="assign", unit="pair"):
            raw, reversed_ = reader.read_raw(name0, name1)
            if reversed_:
                name0, name1 = name1, name0
            ids0 = _lookup_ids(cell_keys[name0], grids[name0].cells(raw["keypoints0"]))
            ids1 = _lookup_ids(cell_keys[name1], grids[name1].cells(raw["keypoints1"]))
            matches0, scores0 = _pair_matches(ids0, ids1, raw["scores"], len(cell_keys[name0]))
            writer.write(name0, name1, {"keypoints0": raw["keypoints0"], "keypoints1": raw["keypoints1"],
                                        "scores": raw["scores"], "matches0": matches0,
                                        "matching_scores0": scores0})
    return Path(matches_path)
