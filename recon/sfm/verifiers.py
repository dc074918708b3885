"""Geometric verification choices: COLMAP's LO-RANSAC, OpenCV's USAC MAGSAC++ or PoseLib, as image-matching-webui
offers them.

Whatever runs, the result lands in the COLMAP database as verified two-view geometries (inlier matches, the
configuration and the fitted matrix), which is all pycolmap's mappers read, so everything after verification is
unchanged.

- "colmap": `pycolmap.verify_matches` through recon.sfm.verification.verify_matches. COLMAP fits E, F and H
  with LO-RANSAC and picks the configuration itself (calibrated, uncalibrated, planar, panoramic, watermark);
  `model` does not apply to it.
- "magsac": OpenCV's USAC with MAGSAC++ scoring (`cv2.USAC_MAGSAC`, Barath et al. 2020), the robust estimator
  image-matching-webui defaults to. A marginalised score instead of an inlier count, so the threshold is a bound
  on the noise rather than a hard cut; inliers are those OpenCV's mask reports at the given threshold.
- "poselib" (default): PoseLib's LO-RANSAC (Larsson et al.) with its non-linear refinement on the inliers.
  Default since it verified 4-5x faster than "colmap" at the same AUC@1 (recon's SIFT + MNN, same features and
  matches, 2026-11-29): temple_ring 34.0 vs 34.0-34.3, temple_ring_full 68.7 vs 66.4, fountain_p11 91.6 vs 91.8,
  all views registered; it accepts fewer pairs (331 vs 424 on temple_ring_full: COLMAP also keeps planar and
  panoramic configurations), and the mapper needs none of them.

`model` "fundamental" fits F on pixel coordinates (COLMAP's keypoints as stored; no intrinsics needed) and writes
UNCALIBRATED geometries. "essential" fits E with the database cameras (EXIF focal or COLMAP's 1.2 x max side
prior; distortion undone by pycolmap's `cam_from_img`) and writes CALIBRATED geometries with the relative pose:
it can only be as right as those priors. Threshold (pixels), confidence and the iteration cap mean the same for
all three; `min_num_inliers` (COLMAP's 15) decides whether a pair is verified.

Own code: the two estimators are called pair by pair from here because neither library knows COLMAP's database;
the COLMAP path keeps recon's grouped trial caps (recon.sfm.verification).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pycolmap

from feature_backends.errors import ConfigError
from feature_backends.threads import available_cores, ordered_map

from .database import colmap_name
from .verification import verify_matches

logger = logging.getLogger(__name__)

VERIFIERS = ("colmap", "magsac", "poselib")
MODELS = ("fundamental", "essential")
Verifier = Literal["colmap", "magsac", "poselib"]
Model = Literal["fundamental", "essential"]


@dataclass(frozen=True)
class VerifierSettings:
    verifier: Verifier = "colmap"
    model: Model = "fundamental"
    max_error: float = 4.0  # pixels of the images the keypoints are stored in
    confidence: float = 0.999
    max_iterations: int = 10000
    min_num_inliers: int = 15
    random_seed: int = 0

    def check(self) -> None:
        if self.verifier not in VERIFIERS:
            raise ConfigError(f"unknown verifier '{self.verifier}'; known: {', '.join(VERIFIERS)}")
        if self.model not in MODELS:
            raise ConfigError(f"unknown verifier model '{self.model}'; known: {', '.join(MODELS)}")
        if not (self.max_error > 0 and 0 < self.confidence < 1 and self.max_iterations >= 1):
            raise ConfigError(f"verification needs max_error > 0, 0 < confidence < 1 and max_iterations >= 1; got "
                              f"{self.max_error}, {self.confidence}, {self.max_iterations}")


def verify(database_path: str | Path, pair_match_counts: Mapping[tuple[str, str], int], work_dir: str | Path,
           settings: VerifierSettings) -> int:
    """Verify the given pairs with the chosen verifier; return the number of verified pairs in the database."""
    settings.check()
    if settings.verifier == "colmap":
        options = pycolmap.TwoViewGeometryOptions()
        options.ransac.max_error = settings.max_error
        options.ransac.confidence = settings.confidence
        options.ransac.max_num_trials = settings.max_iterations
        options.ransac.random_seed = settings.random_seed
        options.min_num_inliers = settings.min_num_inliers
        return verify_matches(database_path, pair_match_counts, work_dir, options)
    estimate = _ESTIMATORS[(settings.verifier, settings.model)]
    with pycolmap.Database.open(database_path) as db:
        images = {image.name: image for image in db.read_all_images()}
        cameras = {camera.camera_id: camera for camera in db.read_all_cameras()}
        keypoints: dict[int, np.ndarray] = {}

        def pairs():  # read here, in the thread that owns the database
            for name0, name1 in pair_match_counts:
                image0, image1 = images[colmap_name(name0)], images[colmap_name(name1)]
                matches = db.read_matches(image0.image_id, image1.image_id)
                if len(matches) < settings.min_num_inliers:
                    continue
                for image in (image0, image1):
                    if image.image_id not in keypoints:
                        keypoints[image.image_id] = db.read_keypoints(image.image_id)[:, :2].astype(np.float64)
                yield image0, image1, matches

        def fit(pair):  # on a worker thread: the estimators release the GIL while they run
            image0, image1, matches = pair
            return pair, estimate(keypoints[image0.image_id][matches[:, 0]], keypoints[image1.image_id][matches[:, 1]],
                                  cameras[image0.camera_id], cameras[image1.camera_id], settings)

        for (image0, image1, matches), geometry in ordered_map(fit, pairs(), workers=verification_threads()):
            if geometry is None:
                continue
            geometry, inliers = geometry
            if inliers.sum() < settings.min_num_inliers:
                continue
            geometry.inlier_matches = np.ascontiguousarray(matches[inliers]).astype(np.uint32)
            db.write_two_view_geometry(image0.image_id, image1.image_id, geometry)
        return db.num_verified_image_pairs()


def verification_threads() -> int:
    """Threads fitting pairs: one per core available to this process, at most 16. PoseLib and OpenCV release the
    GIL while they estimate (PoseLib's F on 40 pairs of 800 matches: 5.0-5.4 s on one thread, 2.9-3.0 s on two
    here), and each pair's RANSAC has its own seed, so the geometries do not depend on the thread count."""
    return max(1, min(16, available_cores()))


def _geometry(config: pycolmap.TwoViewGeometryConfiguration, **matrices) -> pycolmap.TwoViewGeometry:
    geometry = pycolmap.TwoViewGeometry()
    geometry.config = config
    for name, value in matrices.items():
        setattr(geometry, name, value)
    return geometry


def _normalized(points: np.ndarray, camera: pycolmap.Camera) -> np.ndarray:
    return np.asarray(camera.cam_from_img(points), dtype=np.float64)


def _mean_focal(camera: pycolmap.Camera) -> float:
    return float(np.mean([camera.params[i] for i in camera.focal_length_idxs()]))


def _magsac_fundamental(points0, points1, camera0, camera1, settings):
    import cv2

    cv2.setRNGSeed(settings.random_seed)
    F, mask = cv2.findFundamentalMat(points0, points1, cv2.USAC_MAGSAC, settings.max_error, settings.confidence,
                                     settings.max_iterations)
    if F is None or mask is None or F.shape != (3, 3):
        return None
    return _geometry(pycolmap.TwoViewGeometryConfiguration.UNCALIBRATED, F=F), mask.ravel().astype(bool)


def _magsac_essential(points0, points1, camera0, camera1, settings):
    import cv2

    cv2.setRNGSeed(settings.random_seed)
    normalized0, normalized1 = _normalized(points0, camera0), _normalized(points1, camera1)
    threshold = settings.max_error / (0.5 * (_mean_focal(camera0) + _mean_focal(camera1)))
    E, mask = cv2.findEssentialMat(normalized0, normalized1, np.eye(3), cv2.USAC_MAGSAC, settings.confidence,
                                   threshold, settings.max_iterations)
    if E is None or mask is None or E.shape != (3, 3):  # OpenCV stacks several solutions when ambiguous
        return None
    inliers = mask.ravel().astype(bool)
    _, R, t, _ = cv2.recoverPose(E, normalized0[inliers], normalized1[inliers], np.eye(3))
    pose = pycolmap.Rigid3d(pycolmap.Rotation3d(R), t.ravel())
    return _geometry(pycolmap.TwoViewGeometryConfiguration.CALIBRATED, E=E, cam2_from_cam1=pose), inliers


def _poselib():
    try:
        import poselib
    except ImportError as error:
        raise ConfigError(f"--verifier poselib (the default) needs PoseLib, a dependency of recon: pip install "
                          f"poselib, or choose --verifier colmap ({error})") from error
    return poselib


def _poselib_ransac(settings: VerifierSettings) -> dict:
    return {"max_epipolar_error": settings.max_error, "success_prob": settings.confidence,
            "max_iterations": settings.max_iterations, "min_iterations": min(100, settings.max_iterations),
            "seed": settings.random_seed}


def _poselib_fundamental(points0, points1, camera0, camera1, settings):
    F, info = _poselib().estimate_fundamental(points0, points1, _poselib_ransac(settings), {})
    inliers = np.asarray(info.get("inliers", []), dtype=bool)
    if len(inliers) != len(points0):
        return None
    return _geometry(pycolmap.TwoViewGeometryConfiguration.UNCALIBRATED, F=F), inliers


def _poselib_camera(camera: pycolmap.Camera) -> dict:
    return {"model": camera.model.name, "width": camera.width, "height": camera.height,
            "params": [float(p) for p in camera.params]}


def _poselib_essential(points0, points1, camera0, camera1, settings):
    pose, info = _poselib().estimate_relative_pose(points0, points1, _poselib_camera(camera0), _poselib_camera(camera1),
                                                _poselib_ransac(settings), {})
    inliers = np.asarray(info.get("inliers", []), dtype=bool)
    if len(inliers) != len(points0):
        return None
    R, t = np.asarray(pose.R), np.asarray(pose.t)
    cross = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    pose = pycolmap.Rigid3d(pycolmap.Rotation3d(R), t)
    return _geometry(pycolmap.TwoViewGeometryConfiguration.CALIBRATED, E=cross @ R, cam2_from_cam1=pose), inliers


_ESTIMATORS = {
    ("magsac", "fundamental"): _magsac_fundamental,
    ("magsac", "essential"): _magsac_essential,
    ("poselib", "fundamental"): _poselib_fundamental,
    ("poselib", "essential"): _poselib_essential,
}
