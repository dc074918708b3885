"""Geometric verification of the imported matches: COLMAP's two-view geometry, with recon's threshold and trial cap.

Two deliberate differences from COLMAP's defaults, both measured (README, "Command line"):
- the RANSAC threshold is 2 px at the resolution the keypoints were detected at (`verification_error`), not 4 px at
  any image size;
- each pair's RANSAC is capped at the trials its own match count needs (`verify_matches`).
pycolmap runs the estimation; only these two rules are ours.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pycolmap

from feature_backends.store import FeatureReader, read_stored_conf
from pairs.io import write_pairs

from .database import colmap_name


#: COLMAP's verification threshold (pixels of the image, whatever its size).
COLMAP_VERIFICATION_ERROR = 4.0
#: recon's, in pixels of the image the keypoints were detected in.
DETECTION_VERIFICATION_ERROR = 2.0


def verification_error(features_path: str | Path) -> float:
    """2 px at the detection resolution, in original-image pixels; COLMAP's 4 px if features.h5 does not say.

    Keypoint noise lives at the resolution the detector saw: SIFT on a 640 px image localises to ~0.1-0.3 px, on
    a 3072 px image resized to 1600 px to ~0.2-0.6 original px. COLMAP's fixed 4 px is loose for the first and
    fits the second. Measured (relative-pose AUC@1 against ground truth, scripts/bench_sfm.py pipeline):
    4 px -> 2 px at the detection scale: temple_ring 32.2 -> 34.0, temple_ring_full 62.4 -> 66.4, fountain_p11
    (3.84 px, detection at 1600 of 3072) 91.7 -> 91.9; registered images unchanged, also on sacre_coeur (10/10)
    and sceaux_castle (11/11), whose internet / uncalibrated photos have lens distortion.
    """
    record = read_stored_conf(features_path) or {}
    resize_max = (record.get("conf") or {}).get("resize_max")
    if not resize_max:
        return COLMAP_VERIFICATION_ERROR
    with FeatureReader(features_path) as reader:
        largest = max((int(max(reader.read(name, ["image_size"])["image_size"])) for name in reader.names()),
                      default=resize_max)
    return DETECTION_VERIFICATION_ERROR * max(1.0, largest / resize_max)


#: Inlier-ratio floors the RANSAC trial cap is set from, per group of pairs (see `verify_matches`).
_TRIAL_CAP_RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def verify_matches(
    database_path: str | Path,
    pair_match_counts: Mapping[tuple[str, str], int],
    work_dir: str | Path,
    options: pycolmap.TwoViewGeometryOptions | None = None,
) -> int:
    """COLMAP's geometric verification over the given pairs; returns the number of verified pairs.

    COLMAP caps every RANSAC at the trials needed to draw one clean sample at `ransac.min_inlier_ratio` (0.25),
    the same for all pairs. But a pair with N raw matches can only verify with at least `min_num_inliers` of them,
    so its inlier ratio is at least min_num_inliers / N: a pair of 17 chance matches needs ~100 trials, not the
    10,000 it gets, and such pairs are most of what exhaustive matching sends (on temple_ring_full 99 of 424
    candidates failed and took most of the 10 s of verification). Pairs are therefore verified in groups, each with
    the cap of its smallest admissible ratio, floored to a grid so the cap is never tighter than the bound.
    """
    options = options or pycolmap.TwoViewGeometryOptions()
    base_ratio = options.ransac.min_inlier_ratio
    groups: dict[float, list[tuple[str, str]]] = {}
    for pair, count in pair_match_counts.items():
        bound = options.min_num_inliers / max(count, 1)
        ratio = next((r for r in _TRIAL_CAP_RATIOS if r <= bound and r > base_ratio), base_ratio)
        groups.setdefault(ratio, []).append(pair)
    write_pairs(Path(work_dir) / "pairs-verification.txt", list(pair_match_counts))
    group_file = Path(work_dir) / "pairs-verification.group.txt"
    for ratio, pairs in sorted(groups.items()):
        group_options = pycolmap.TwoViewGeometryOptions(options.todict())
        group_options.ransac.min_inlier_ratio = ratio
        colmap_pairs = [(colmap_name(name0), colmap_name(name1)) for name0, name1 in pairs]
        pycolmap.verify_matches(database_path, write_pairs(group_file, colmap_pairs), group_options)
    group_file.unlink(missing_ok=True)
    with pycolmap.Database.open(database_path) as db:
        return db.num_verified_image_pairs()
