"""Anchored dense matching: keypoints of a sparse detector, matched through a dense warp.

**Anchored keypoints** (`--matcher sift+roma`, `dad+roma`, ...; image-matching-webui's DaD(RoMa)): keypoints are
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
**Two phases** (`match_anchored`): phase 1 is the network (a pair's warp, or its matches when nothing carries over
from pair to pair, i.e. without propagation), here or on Ray workers (recon.executor); phase 2 takes the pairs in
the order of the pairs file and anchors, checks tracks, propagates and writes, here, so the result does not
depend on where or in which order phase 1 ran.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree
from tqdm import tqdm

from feature_backends.dense_warp import Warp
from feature_backends.errors import ImageReadError
from feature_backends.store import FeatureReader, FeatureWriter, MatchReader, MatchWriter, read_stored_conf

from ..cache import ByteBudgetCache
from ..executor import run_tasks
from ..match import pending_pairs
from .common import encoded_images, grouped_by_first_image

logger = logging.getLogger(__name__)


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


#: Pairs per Ray task in anchored mode (consecutive pairs of one first image): with propagation each result
#: carries a whole warp (RoMa symmetric at 864 px: ~18 MB), so tasks stay small.
PAIRS_PER_TASK = 4


def warp_arrays(warp: Warp) -> dict[str, np.ndarray]:
    """A warp as host arrays (what a Ray worker returns); `warp_from_arrays` is the inverse."""
    out = {"size0": np.asarray(warp.size0), "size1": np.asarray(warp.size1)}
    for key in ("forward", "certainty", "backward", "backward_certainty"):
        if getattr(warp, key) is not None:
            out[key] = getattr(warp, key).detach().cpu().numpy()
    return out


def warp_from_arrays(arrays: Mapping[str, np.ndarray]) -> Warp:
    # Arrays Ray returns are read-only views of its object store; torch wants writable memory.
    tensors = {key: torch.from_numpy(np.array(arrays[key])) if key in arrays else None
               for key in ("forward", "certainty", "backward", "backward_certainty")}
    return Warp(size0=tuple(int(v) for v in arrays["size0"]), size1=tuple(int(v) for v in arrays["size1"]), **tensors)


@dataclass
class _Settings:
    radius: float
    min_certainty: float
    cycle: bool
    exclusive: bool
    propagate: bool


class AnchoredWorker:
    """Phase 1 of anchored matching (the network) for a few pairs of one first image; the same code runs here and
    in a Ray actor (recon.executor). A task is (name0, keypoints0, [(name1, keypoints1), ...]); keypoints are None
    with propagation, whose pairs need the keypoints earlier pairs add, known only in phase 2 (the driver): then
    a pair's result is its warp (host arrays), else its matches on the given keypoints. An unreadable image gives
    the error text."""

    def __init__(self, dense_name: str, backend_conf: dict, device, image_dir: Path, settings: _Settings,
                 model=None):
        from feature_backends import registry

        self.model = model or registry.get_backend("dense", dense_name, backend_conf, device=device)
        self.encoded = encoded_images(self.model, image_dir)
        self.settings = settings

    def pair(self, name0: str, name1: str, keypoints0, keypoints1):
        """A pair's Warp (keypoints None) or (matches0, scores0), or the error text."""
        try:
            warp = self.model.warp_encoded(self.encoded[name0], self.encoded[name1])
        except ImageReadError as error:
            return str(error)
        if keypoints0 is None:
            return warp
        s = self.settings
        return anchor_matches(warp, keypoints0, keypoints1, s.radius, s.min_certainty, s.cycle, s.exclusive)

    def __call__(self, task):
        name0, keypoints0, partners = task
        results = [(name0, name1, self.pair(name0, name1, keypoints0, keypoints1)) for name1, keypoints1 in partners]
        return [(a, b, warp_arrays(r) if isinstance(r, Warp) else r) for a, b, r in results]


def _phase_one(worker: AnchoredWorker, todo, keypoints: _AnchorKeypoints, executor, remote: tuple):
    """(name0, name1, Warp | (matches0, scores0) | error text) for every pair of `todo`, in its order: computed
    here one pair at a time, or on Ray workers (`remote`: their constructor's arguments) in tasks of
    PAIRS_PER_TASK consecutive pairs of one first image, returned in task order (recon.executor's ordered map)."""
    if executor is None or executor.executor == "local":
        for name0, name1 in todo:  # anchored in phase 2, as every pair with propagation
            yield name0, name1, worker.pair(name0, name1, None, None)
        return
    given = (lambda name: None) if worker.settings.propagate else keypoints.__getitem__

    def tasks():
        task = None
        for name0, name1 in todo:
            if task is None or task[0] != name0 or len(task[2]) == PAIRS_PER_TASK:
                if task is not None:
                    yield task
                task = (name0, given(name0), [])
            task[2].append((name1, given(name1)))
        if task is not None:
            yield task

    for results in run_tasks(executor, AnchoredWorker, remote, tasks(), ordered=True):
        for name0, name1, result in results:
            yield name0, name1, warp_from_arrays(result) if isinstance(result, dict) else result


def match_anchored(model, name: str, pairs: Sequence[tuple[str, str]], image_dir: Path, features_path, matches_path,
                   radius: float, cycle: bool, exclusive: bool = False, consistent: bool = True,
                   propagate: bool = True, executor=None, remote: tuple | None = None) -> Path:
    """Anchored matching in two phases: the network's per-pair warps (or matches, without propagation) here or on
    Ray workers (`executor`, with `remote` = the workers' (dense name, backend conf, device)), then here, in the
    order of the pairs whatever the executor, anchoring, the track check, propagation and the writes; so a
    distributed run writes the local run's files (on one device type: a warp moved from a GPU is anchored on
    the driver's CPU)."""
    if not model.has_warp:
        model.warp_images(None, None)  # raises the backend's own message: it gives matches, not a warp
    settings = _Settings(radius, float(model.conf.get("min_certainty", 0.0)), cycle, exclusive, propagate)
    record = {"backend": name, "conf": model.conf.to_dict(), "mode": "anchored",
              "anchors": read_stored_conf(features_path), "radius": radius, "cycle": cycle,
              "exclusive": exclusive, "consistent": consistent, "propagate": propagate}
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
        readable = [pair for pair in todo if pair[0] in features and pair[1] in features]
        skipped = len(todo) - len(readable)  # an image the extraction stage could not read
        # The driver's worker is not used with Ray workers (its model only recorded the configuration above).
        local = AnchoredWorker(name, {}, None, image_dir, settings, model=model)
        results = _phase_one(local, readable, keypoints, executor, (*remote, image_dir, settings) if remote else ())
        for name0, name1, result in tqdm(results, total=len(readable), desc=f"match {name} (anchored)", unit="pair"):
            if isinstance(result, str):
                logger.warning("Skipping pair (%s, %s): %s", name0, name1, result)
                skipped += 1
                continue
            matches0, scores0 = _phase_two(name0, name1, result, keypoints, tracks, image_ids, settings)
            writer.write(name0, name1, {"matches0": matches0, "matching_scores0": scores0})
        if propagate:
            _pad_matches(writer, pairs, features, keypoints)
    if skipped:
        logger.warning("%d pairs with unreadable images were skipped", skipped)
    return Path(matches_path)


def _phase_two(name0, name1, result, keypoints: _AnchorKeypoints, tracks: _Tracks | None, image_ids,
               settings: _Settings):
    """One pair's matches0 / scores0 from its warp (or its matches), after the track check and propagation."""
    if isinstance(result, Warp):
        result = anchor_matches(result, keypoints[name0], keypoints[name1], settings.radius, settings.min_certainty,
                                settings.cycle, settings.exclusive, settings.propagate)
    matches0, scores0 = result[:2]
    ids = (image_ids[name0], image_ids[name1])
    if tracks is not None:
        matches0 = tracks.add(*ids, matches0, scores0)
        scores0 = np.where(matches0 >= 0, scores0, 0).astype(np.float32)
    if settings.propagate:
        counts = (keypoints.count(name0), keypoints.count(name1))
        matches0, scores0, gained0, gained1 = _propagate(tracks, ids, counts, matches0, scores0, result[2:],
                                                         settings.radius)
        keypoints.add(name0, gained0)
        keypoints.add(name1, gained1)
    return matches0, scores0


def _pad_matches(writer: MatchWriter, pairs, features: FeatureReader, keypoints: _AnchorKeypoints) -> None:
    """hloc's matches0 has one entry per keypoint of image 0: pairs written before image 0 gained keypoints are
    padded with -1 once every image has all of its keypoints."""
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
