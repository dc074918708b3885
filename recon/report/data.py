"""What the report shows, computed from the files of an output folder only (recon's or hloc's layout).

Each view's reason comes from the first stage whose output lost it:
    image folder → features.h5 (unreadable / not extracted / no features) → pairs.txt (no pairs)
    → sfm/database.db two_view_geometries (no verified pair) → sparse/0..N (registered, in a smaller model,
    or rejected by the mapper).
Reading the files (rather than events recorded during the run) is what lets `recon report OUT` explain a folder
made by hloc or by an older recon, and what makes the reasons checkable against the files themselves.
"""

from __future__ import annotations

import base64
import io
import json
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycolmap
from PIL import Image, UnidentifiedImageError

from feature_backends.images import IMAGE_EXTENSIONS
from feature_backends.store import FeatureReader
from pairs.io import read_pairs

# COLMAP's TwoViewGeometry configurations that carry a verified model (not UNDEFINED, DEGENERATE, WATERMARK).
VERIFIED_CONFIGS = (2, 3, 4, 5, 6, 8, 9)
_PAIR_ID_FACTOR = 2147483647  # COLMAP's kMaxNumImages: pair_id = id1 * factor + id2 with id1 < id2

REASONS = {
    "registered": "registered in the main model (sparse/0)",
    "smaller_model": "registered, but in a smaller model ({model})",
    "unreadable": "unreadable: the image file could not be decoded",
    "not_extracted": "not extracted: no entry in features.h5 (excluded by an image list, or the run stopped)",
    "no_features": "no features: the detector found no keypoints (blank, blurred or masked out)",
    "no_pairs": "no pairs: the pair planner paired it with no other view",
    "no_verified_pair": "no verified pair: none of its pairs passed geometric verification (no overlap?)",
    "rejected": "rejected by the mapper: verified pairs exist, but it could not be registered",
    "unknown": "not registered (no COLMAP database to tell why)",
}


@dataclass
class Sources:
    """Where each input of the report is in an output folder (recon's layout first, hloc's as fallback)."""

    out_dir: Path
    image_dir: Path | None = None
    features: Path | None = None
    pairs: Path | None = None
    database: Path | None = None
    models: list[Path] = field(default_factory=list)
    run_record: dict = field(default_factory=dict)

    @classmethod
    def find(cls, out_dir: str | Path, image_dir: str | Path | None = None) -> Sources:
        out_dir = Path(out_dir)
        first = lambda *paths: next((p for p in paths if p.is_file()), None)  # noqa: E731
        record = json.loads((out_dir / "run.json").read_text()) if (out_dir / "run.json").is_file() else {}
        if image_dir is None:
            stamp = out_dir / "sfm" / "sfm_inputs.json"
            recorded = record.get("image_dir") or (json.loads(stamp.read_text()).get("image_dir")
                                                   if stamp.is_file() else None)
            image_dir = Path(recorded) if recorded and Path(recorded).is_dir() else None
        return cls(out_dir, Path(image_dir) if image_dir else None,
                   first(out_dir / "features.h5", *sorted(out_dir.glob("feats-*.h5"))),
                   first(out_dir / "pairs.txt", *sorted(out_dir.glob("pairs*.txt"))),
                   first(out_dir / "sfm" / "database.db", out_dir / "database.db"),
                   _model_dirs(out_dir), record)


def _model_dirs(out_dir: Path) -> list[Path]:
    """sparse/0, sparse/1, … (recon, COLMAP); else a model written straight into sfm/ or OUT (hloc's sfm_dir)."""
    sparse = out_dir / "sparse"
    numbered = sorted((p for p in sparse.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)) \
        if sparse.is_dir() else []
    models = [p for p in numbered if (p / "images.bin").is_file() or (p / "images.txt").is_file()]
    if models:
        return models
    return [p for p in (out_dir / "sfm", out_dir) if (p / "images.bin").is_file()][:1]


def _list_image_dir(image_dir: Path | None) -> list[str]:
    if image_dir is None or not image_dir.is_dir():
        return []
    return sorted(p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not any(s.startswith(".") for s in p.parts)
                  and p.is_file())


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return False


def read_verified_pairs(database: Path | None) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """(verified pairs → inliers, every pair → raw matches) from a COLMAP database (sqlite, read-only)."""
    if database is None:
        return {}, {}
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        names = dict(db.execute("SELECT image_id, name FROM images"))

        def pair(pair_id: int) -> tuple[str, str]:
            id2 = pair_id % _PAIR_ID_FACTOR
            return names[(pair_id - id2) // _PAIR_ID_FACTOR], names[id2]

        verified = {pair(pid): rows for pid, rows, config in
                    db.execute("SELECT pair_id, rows, config FROM two_view_geometries")
                    if config in VERIFIED_CONFIGS and rows > 0}
        raw = {pair(pid): rows for pid, rows in db.execute("SELECT pair_id, rows FROM matches")}
    return verified, raw


@dataclass
class ModelView:
    model: int
    observations: int
    error: float


def read_models(model_dirs: list[Path], max_points: int, seed: int = 0) -> dict:
    """Per registered view (name → ModelView), track lengths, errors, subsampled points and camera frusta."""
    views: dict[str, ModelView] = {}
    track_lengths, point_errors, points, cameras, models = [], [], [], [], []
    for index, model_dir in enumerate(model_dirs):
        model = pycolmap.Reconstruction(model_dir)
        points3D = model.points3D  # one binding: each `model.points3D` access converts the whole map
        xyz = np.array([p.xyz for p in points3D.values()]).reshape(-1, 3)
        rgb = np.array([p.color for p in points3D.values()]).reshape(-1, 3)
        track_lengths += [p.track.length() for p in points3D.values()]
        point_errors += [p.error for p in points3D.values()]
        points.append((index, xyz, rgb))
        images = model.images
        for image_id in model.reg_image_ids():
            image = images[image_id]
            views[image.name] = ModelView(index, image.num_points3D, _image_error(points3D, image))
            cameras.append(_frustum(image, index))
        models.append({"index": index, "path": model_dir.as_posix(), "images": model.num_reg_images(),
                       "points": len(points3D)})
    scale = _frustum_scale(points, cameras)
    for camera in cameras:
        camera["corners"] = (np.array(camera["centre"]) + scale * np.array(camera["corners"])).round(4).tolist()
    return {"views": views, "track_lengths": track_lengths, "point_errors": point_errors,
            "points": _subsample(points, max_points, seed), "cameras": cameras, "models": models}


def _image_error(points3D, image: pycolmap.Image) -> float:
    """Mean reprojection error (px) of a registered view's observations."""
    observed = image.get_observation_points2D()
    if not observed:
        return 0.0
    xy = np.array([p.xy for p in observed])
    world = np.array([points3D[p.point3D_id].xyz for p in observed])
    pose = image.cam_from_world().matrix()
    cam = world @ pose[:, :3].T + pose[:, 3]
    projected = image.camera.img_from_cam(cam)
    return float(np.nanmean(np.linalg.norm(projected - xy, axis=1)))


def _frustum(image: pycolmap.Image, model: int) -> dict:
    """Camera centre and its four image corners' directions at unit depth, in world coordinates."""
    camera = image.camera
    pose = image.cam_from_world().matrix()
    rotation = pose[:, :3].T  # world_from_cam rotation
    corners = np.array([[0, 0], [camera.width, 0], [camera.width, camera.height], [0, camera.height]], float)
    rays = np.array([camera.cam_from_img(c) for c in corners]).reshape(4, 2)
    rays = np.hstack([rays, np.ones((4, 1))]) @ rotation.T
    return {"name": image.name, "model": model, "centre": image.projection_center().round(4).tolist(),
            "corners": rays.tolist()}


def _frustum_scale(points, cameras) -> float:
    """A frustum depth visible at the scale of the scene: 1/8 of the median camera distance from the points'
    median (or from the cameras' median when there are no points)."""
    centres = np.array([c["centre"] for c in cameras]).reshape(-1, 3)
    xyz = np.concatenate([p[1] for p in points]) if points else np.zeros((0, 3))
    if len(xyz) == 0:
        xyz = centres
    if len(xyz) == 0 or len(centres) == 0:
        return 1.0
    distance = np.median(np.linalg.norm(centres - np.median(xyz, axis=0), axis=1))
    return float(distance / 8) if distance > 0 else 1.0


def _subsample(points, max_points: int, seed: int) -> dict:
    """At most `max_points` points (uniformly at random, fixed seed), as flat rounded lists for the page."""
    model = np.concatenate([np.full(len(p[1]), p[0]) for p in points]) if points else np.zeros(0, int)
    xyz = np.concatenate([p[1] for p in points]) if points else np.zeros((0, 3))
    rgb = np.concatenate([p[2] for p in points]) if points else np.zeros((0, 3))
    total = len(xyz)
    if total > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(total, max_points, replace=False))
        model, xyz, rgb = model[keep], xyz[keep], rgb[keep]
    return {"total": total, "shown": len(xyz), "xyz": xyz.round(4).ravel().tolist(),
            "rgb": rgb.astype(int).ravel().tolist(), "model": model.astype(int).tolist()}


def histogram(values, bins) -> dict:
    counts, edges = np.histogram(np.asarray(values, float), bins=bins)
    return {"counts": counts.tolist(), "edges": np.round(edges, 4).tolist()}


def thumbnail(path: Path, size: int) -> str | None:
    """A small JPEG as a data URL, or None when the file cannot be decoded."""
    encoded = encode_thumbnail(path, size)
    return encoded[0] if encoded else None


def encode_thumbnail(path: Path, size: int, quality: int = 70) -> tuple[str, float] | None:
    """(JPEG data URL with longer side <= size, thumbnail pixels per original pixel), or None when undecodable."""
    try:
        with Image.open(path) as image:
            width = image.size[0]
            image.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster
            image = image.convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), image.size[0] / width


def view_reasons(names: list[str], sources: Sources, keypoints: dict[str, int], pair_counts: Counter,
                 verified_counts: Counter, registered: dict[str, ModelView]) -> dict[str, str]:
    """Each view's reason code (a key of REASONS), by the first stage that lost it."""
    reasons = {}
    for name in names:
        if name in registered:
            reasons[name] = "registered" if registered[name].model == 0 else "smaller_model"
        elif name not in keypoints:
            unreadable = sources.image_dir is not None and not _readable(sources.image_dir / name)
            reasons[name] = "unreadable" if unreadable else "not_extracted"
        elif keypoints[name] == 0:
            reasons[name] = "no_features"
        elif sources.pairs is not None and pair_counts[name] == 0:
            reasons[name] = "no_pairs"
        elif sources.database is None:
            reasons[name] = "unknown"
        elif verified_counts[name] == 0:
            reasons[name] = "no_verified_pair"
        else:
            reasons[name] = "rejected"
    return reasons


def read_keypoint_counts(features: Path | None) -> dict[str, int]:
    if features is None:
        return {}
    with FeatureReader(features) as reader:
        return {name: reader.keypoint_counts(name)[0] for name in reader.names()}


def read_pair_counts(pairs: Path | None) -> tuple[Counter, int]:
    counts: Counter = Counter()
    if pairs is None:
        return counts, 0
    pair_list = {tuple(sorted(p)) for p in read_pairs(pairs)}
    for name0, name1 in pair_list:
        counts[name0] += 1
        counts[name1] += 1
    return counts, len(pair_list)


def components(names: list[str], verified: dict[tuple[str, str], int]) -> list[list[str]]:
    """Connected components of the verified-pair graph (views in no verified pair left out), largest first:
    the groups the mapper could at best join; more than one means the scene splits before mapping."""
    parent = {name: name for name in names}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for name0, name1 in verified:
        if name0 in parent and name1 in parent:
            parent[root(name0)] = root(name1)
    groups: dict[str, list[str]] = {}
    for name0, name1 in verified:
        for name in (name0, name1):
            if name in parent:
                groups.setdefault(root(name), [])
    for name in names:
        if root(name) in groups:
            groups[root(name)].append(name)
    return sorted(groups.values(), key=len, reverse=True)
