"""Import hloc-format features and matches into a COLMAP database (verification: recon.sfm.verification).

Cameras are built here rather than by `pycolmap.import_images` because recon applies EXIF orientation to
every image (feature_backends.images): the camera's width and height must be those of the upright image the
keypoints live in, whatever COLMAP's own reader would decide. Each image gets a trivial rig and frame, as COLMAP
4's import does. Keypoints move from hloc's convention (pixel centres at integer coordinates) to COLMAP's
(+0.5). The database is rebuilt on every call: it is cheap next to extraction and matching, and a stale
database from another configuration is a classic source of wrong models (hloc deletes it too).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pycolmap
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from feature_backends.errors import InputError
from feature_backends.images import header_exif
from feature_backends.store import FeatureReader, MatchReader
from pairs.io import check_names, deduplicate

from .priors import pose_prior

logger = logging.getLogger(__name__)

CameraMode = Literal["single", "per-folder", "per-image"]

_EXIF_IFD = 0x8769
_FOCAL_LENGTH = 0x920A
_FOCAL_35MM = 0xA405
_FOCAL_PLANE_X_RES = 0xA20E
_FOCAL_PLANE_UNIT = 0xA210
_MM_PER_UNIT = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}
# COLMAP's prior when nothing is known: focal = 1.2 * max(width, height).
DEFAULT_FOCAL_FACTOR = 1.2


def exif_focal_pixels(path: str | Path, width: int, height: int) -> float | None:
    """Focal length in pixels of the upright image from EXIF, or None.

    Uses the 35 mm-equivalent focal length (36 mm across the longer side) or FocalLength with the focal-plane
    resolution; COLMAP additionally consults a sensor-width database by camera model, which we do not ship.
    """
    try:
        with Image.open(path) as image:
            exif = header_exif(image)
            ifd = exif.get_ifd(_EXIF_IFD) if exif else {}
            original_width = max(image.size)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None
    tags = {**dict(exif or {}), **dict(ifd or {})}
    focal_35 = tags.get(_FOCAL_35MM)
    if focal_35:
        return float(focal_35) / 36.0 * max(width, height)
    focal_mm, x_res, unit = tags.get(_FOCAL_LENGTH), tags.get(_FOCAL_PLANE_X_RES), tags.get(_FOCAL_PLANE_UNIT, 2)
    if focal_mm and x_res and float(x_res) > 0 and unit in _MM_PER_UNIT:
        pixels_per_mm = float(x_res) / _MM_PER_UNIT[unit]
        # The focal-plane resolution refers to the sensor's original pixel grid.
        return float(focal_mm) * pixels_per_mm * max(width, height) / original_width
    return None


def _camera_group(name: str, size: tuple[int, int], mode: CameraMode) -> tuple:
    if mode == "per-image":
        return (name,)
    folder = name.rsplit("/", 1)[0] if (mode == "per-folder" and "/" in name) else ""
    return (folder, size)  # images of different sizes can never share a camera


def colmap_name(name: str) -> str:
    """The image's name inside COLMAP's database: COLMAP reads pairs files split at spaces, so a name with white
    space is stored percent-escaped ('IMG 0001.JPG' -> 'IMG%200001.JPG'); the model is written back under the
    real names (`restore_names`). Other names are kept as they are."""
    if not any(char.isspace() for char in name):
        return name
    return "".join(f"%{ord(char):02X}" if char.isspace() or char == "%" else char for char in name)


def restore_names(model: pycolmap.Reconstruction, names: Sequence[str]) -> bool:
    """Rename a model's images from their database names back to `names`; whether any name changed."""
    real = {colmap_name(name): name for name in names if colmap_name(name) != name}
    for image in model.images.values():
        if image.name in real:
            image.name = real[image.name]
    return bool(real)


def import_features(
    database_path: str | Path,
    image_dir: str | Path,
    features_path: str | Path,
    camera_mode: CameraMode = "single",
    camera_model: str = "SIMPLE_RADIAL",
    image_names: Sequence[str] | None = None,
    prior_std: float = 5.0,
) -> dict[str, int]:
    """Create a fresh database with cameras, rigs, frames, images, keypoints and, for images with EXIF GPS, pose
    priors (recon.sfm.priors, `prior_std` metres); return name → image_id."""
    database_path = Path(database_path)
    database_path.parent.mkdir(parents=True, exist_ok=True)
    # With its SQLite side files: a -wal or -journal left by a killed run must not be replayed into the new one.
    for suffix in ("", "-wal", "-shm", "-journal"):
        database_path.with_name(database_path.name + suffix).unlink(missing_ok=True)
    image_dir = Path(image_dir)
    image_ids: dict[str, int] = {}
    with FeatureReader(features_path) as features, pycolmap.Database.open(database_path) as db:
        names = list(image_names) if image_names is not None else features.names()
        if not names:
            raise InputError(f"'{features_path}' holds no features to import")
        clash = sorted({colmap_name(n) for n in names if colmap_name(n) != n} & set(names))
        if clash:
            raise InputError(f"image '{clash[0]}' has the escaped name of another image with spaces; rename it")
        cameras: dict[tuple, int] = {}
        num_priors = 0
        for name in tqdm(names, desc="import", unit="img"):
            data = features.read(name, ["keypoints", "image_size"])
            width, height = (int(v) for v in data["image_size"])
            group = _camera_group(name, (width, height), camera_mode)
            if group not in cameras:
                focal = exif_focal_pixels(image_dir / name, width, height)
                has_prior = focal is not None
                focal = focal if has_prior else DEFAULT_FOCAL_FACTOR * max(width, height)
                camera = pycolmap.Camera.create_from_model_name(0, camera_model, focal, width, height)
                camera.has_prior_focal_length = has_prior
                cameras[group] = db.write_camera(camera)
                rig = pycolmap.Rig()
                rig.add_ref_sensor(pycolmap.sensor_t(type=pycolmap.SensorType.CAMERA, id=cameras[group]))
                rig_id = db.write_rig(rig)
                cameras[group + ("rig",)] = rig_id
            camera_id = cameras[group]
            image_id = db.write_image(pycolmap.Image(name=colmap_name(name), camera_id=camera_id))
            frame = pycolmap.Frame()
            frame.rig_id = cameras[group + ("rig",)]
            frame.add_data_id(
                pycolmap.data_t(sensor_id=pycolmap.sensor_t(type=pycolmap.SensorType.CAMERA, id=camera_id), id=image_id)
            )
            db.write_frame(frame)
            db.write_keypoints(image_id, (data["keypoints"].astype(np.float64) + 0.5).astype(np.float32))
            prior = pose_prior(image_dir / name, camera_id, image_id, prior_std)
            if prior is not None:
                db.write_pose_prior(prior)
                num_priors += 1
            image_ids[name] = image_id
    logger.info("Imported %d images with %d cameras (%s), %d with GPS pose priors", len(image_ids), len(cameras) // 2,
                camera_mode, num_priors)
    return image_ids


def import_matches(
    database_path: str | Path,
    image_ids: dict[str, int],
    pairs: Sequence[tuple[str, str]],
    matches_path: str | Path,
    min_match_score: float | None = None,
) -> dict[tuple[str, str], int]:
    """Write raw matches of every pair (de-duplicated in both directions); return the match count per pair."""
    check_names(pairs, image_ids, "the pairs file")
    counts: dict[tuple[str, str], int] = {}
    with MatchReader(matches_path) as reader, pycolmap.Database.open(database_path) as db:
        for name0, name1 in tqdm(deduplicate(pairs), desc="import matches", unit="pair"):
            if not reader.has(name0, name1):
                raise InputError(f"pair ({name0}, {name1}) has no matches in '{matches_path}'; run the match stage")
            matches, scores = reader.read(name0, name1)
            if min_match_score is not None:
                matches = matches[scores > min_match_score]
            db.write_matches(image_ids[name0], image_ids[name1], matches.astype(np.uint32))
            counts[(name0, name1)] = len(matches)
    return counts


def check_matches_fit(features_path: str | Path, matches_path: str | Path, names: Sequence[str]) -> None:
    """Refuse matches made from other features than `features_path` holds (their indices would point at other
    keypoints, or past the end, which crashes COLMAP): compares the fingerprints the match stage recorded."""
    with MatchReader(matches_path) as matches:
        recorded = matches.feature_fingerprints()
    if recorded is None:
        return  # hloc's file, or an older recon's: nothing to compare
    with FeatureReader(features_path) as features:
        changed = sorted(n for n in names
                         if n in recorded and n in features and features.fingerprint(n) != recorded[n])
    if changed:
        raise InputError(f"'{matches_path}' was made from other features than '{features_path}' holds now for "
                         f"{len(changed)} image(s), e.g. {changed[:3]}; rerun the match stage (it recomputes "
                         "those pairs) or delete the matches file")
