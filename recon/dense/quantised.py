"""Quantised dense matching: sampled matches snapped to a grid, one keypoint per occupied cell.

**Quantised keypoints** (`--matcher roma`; hloc's match_dense, used there for LoFTR): per pair, sample matches; snap
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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from feature_backends.errors import ConfigError, ImageReadError
from feature_backends.images import image_size
from feature_backends.store import FeatureReader, FeatureWriter, MatchReader, MatchWriter, read_stored_conf

from ..executor import run_tasks
from ..match import pending_pairs
from .common import encoded_images, grouped_by_first_image

logger = logging.getLogger(__name__)


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


def _unmasked(sampled: dict, image_dir: Path, mask_dir: Path, name0: str, name1: str) -> dict:
    """The sampled matches whose both ends lie on kept pixels of their images' masks (recon.extract)."""
    from ..extract import inside_mask, load_mask

    keep = np.ones(len(sampled["scores"]), bool)
    for name, key in ((name0, "keypoints0"), (name1, "keypoints1")):
        keep &= inside_mask(sampled[key], load_mask(mask_dir, name, image_size(image_dir / name)))
    return {key: sampled[key][keep] for key in ("keypoints0", "keypoints1", "scores")}


class QuantisedWorker:
    """Pass 1 for the pairs of one first image: (name0, [name1, ...]) → [(name0, name1, samples | error text)].
    One model and one encoding cache per worker; the same code runs here and in a Ray actor (recon.executor)."""

    def __init__(self, dense_name: str, backend_conf: dict, device, image_dir: Path, mask_dir: Path | None,
                 model=None):
        from feature_backends import registry

        self.model = model or registry.get_backend("dense", dense_name, backend_conf, device=device)
        self.image_dir, self.mask_dir = Path(image_dir), mask_dir
        self.encoded = encoded_images(self.model, self.image_dir)

    def __call__(self, task):
        name0, partners = task
        out = []
        for name1 in partners:
            try:
                sampled = self.model.match_encoded(self.encoded[name0], self.encoded[name1])
            except ImageReadError as error:
                out.append((name0, name1, str(error)))
                continue
            if self.mask_dir is not None:
                sampled = _unmasked(sampled, self.image_dir, self.mask_dir, name0, name1)
            out.append((name0, name1, {k: np.asarray(sampled[k]) for k in ("keypoints0", "keypoints1", "scores")}))
        return out


def _sample_pairs(model, name, todo, writer, image_dir, mask_dir, executor, remote) -> set[tuple[str, str]]:
    """Pass 1 (the network) over the pairs `todo`, grouped by first image, here or on Ray workers (`remote`: the
    worker's (dense name, backend conf, device)); the samples are written here. Returns the pairs that failed."""
    groups: dict[str, list[str]] = {}
    for name0, name1 in todo:
        groups.setdefault(name0, []).append(name1)
    if executor is not None and executor.executor != "local":
        results = run_tasks(executor, QuantisedWorker, (*remote, image_dir, mask_dir), groups.items())
    else:
        results = map(QuantisedWorker(name, {}, None, image_dir, mask_dir, model=model), groups.items())
    failed: set[tuple[str, str]] = set()
    progress = tqdm(total=len(todo), desc=f"match {name}", unit="pair")
    for group in results:
        for name0, name1, sampled in group:
            if isinstance(sampled, str):
                logger.warning("Skipping pair (%s, %s): %s", name0, name1, sampled)
                failed.add((name0, name1))
            else:
                writer.write(name0, name1, sampled)
        progress.update(len(group))
    progress.close()
    return failed


def match_quantised(model, name: str, pairs: Sequence[tuple[str, str]], image_dir: Path, features_path,
                    matches_path, cell_size: int, max_error: int, max_keypoints: int | None,
                    mask_dir: Path | None = None, executor=None, remote: tuple | None = None) -> Path:
    """The three passes (module docstring). With a Ray `executor`, pass 1 (the network) is sharded by first image
    over workers built from `remote` = (dense name, backend conf, device); passes 2-3 run here."""
    cell_size, max_error = int(cell_size), int(max_error)
    if max_error < 1 or cell_size < max_error or cell_size % max_error:
        raise ConfigError(f"cell_size ({cell_size}) must be a multiple of max_error ({max_error}) >= 1")
    record = {"backend": name, "conf": model.conf.to_dict(), "mode": "quantised"}
    if mask_dir is not None:
        record["masks"] = str(Path(mask_dir).resolve())
    # Pass 1: the network, pair by pair; only sampled matches are kept (on disk).
    with MatchWriter(matches_path, conf=record) as writer:
        todo = pending_pairs(writer, grouped_by_first_image(pairs), matches_path)
        failed = _sample_pairs(model, name, todo, writer, image_dir, mask_dir, executor, remote)
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
