"""The last step of every mapper: observations far above the model's own error level dropped, one bundle adjustment.

COLMAP's mappers filter observations with a fixed threshold (the incremental mapper's `filter_max_reproj_error`,
4 px; the global mapper's 1 degree), set for full-size images and any feature. recon's default SIFT at 1600 px
leaves a model whose track errors have a median of 0.17-0.25 px, so 4 px keeps the heavy tail (temple_ring: 1 %
of the observations above 2.1 px), and that tail pulls the shared intrinsics and the poses. Here the threshold
follows the model: `max_error_ratio` times the median of its points' mean reprojection errors, whatever the
feature, matcher or image size; the observations above it are removed (points left with one view go too) and one
global bundle adjustment, the incremental mapper's own (its iteration cap, tolerances and solver choice by model
size), refines poses, points and the intrinsics the engine refines.

Measured on recon's default models of the ground-truth scenes (incremental mapper, after the principal-point
step; AUC@1/3/5 of relative poses, scripts/bench_sfm.py's scoring; 2-core VM):

| ratio        | temple_ring (19)   | temple_ring_full (47) | fountain_p11 (11)  |
|--------------|--------------------|-----------------------|--------------------|
| off          | 34.0 / 76.2 / 85.7 | 68.5 / 89.4 / 93.6    | 91.6 / 97.2 / 98.3 |
| 2            | 36.9 / 77.6 / 86.5 | 79.6 / 93.1 / 95.8    | 91.5 / 97.2 / 98.3 |
| 3            | 38.6 / 78.3 / 87.0 | 78.5 / 92.8 / 95.6    | 91.5 / 97.2 / 98.3 |
| **4**        | 37.9 / 78.1 / 86.9 | 78.5 / 92.8 / 95.6    | 91.6 / 97.2 / 98.3 |
| 5            | 37.8 / 78.1 / 86.9 | 78.2 / 92.7 / 95.6    | 91.7 / 97.2 / 98.3 |
| 4 px fixed (COLMAP) -> 1 px fixed | 34.0 -> 38.6 | 68.5 -> 77.5   | 91.6 -> 91.6       |

(ratio 4: threshold 0.67, 0.71 and 0.99 px; 1809, 4875 and 3398 observations removed). In the stage the filter
runs before the principal-point step, which then sees the cleaner model: AUC@1 37.9, 77.8 and 94.2 end to end
(bench_sfm, 2026-11-30), the step taking 0.3, 0.8 and 0.5 s there. Lowering the incremental mapper's own threshold instead (`mapper.filter_max_reproj_error=1`) gave the
same accuracy (38.0, 77.7) but mapping took 1.3-2.5x as long: every local adjustment filtered and re-triangulated
more. Gaussian keypoint noise alone almost never crosses the threshold (a track's mean error has a median near
its noise level, so the cut lies beyond 4 sigma): on clean data the step is one adjustment that changes nothing.

pycolmap provides the filter (`ObservationManager.filter_points3D_with_large_reprojection_error`) and the bundle
adjustment; only the threshold rule is ours.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import pycolmap

logger = logging.getLogger(__name__)


@dataclass
class Refinement:
    threshold_px: float
    median_error_px: float
    filtered_observations: int
    points_before: int
    points_after: int
    error_before_px: float
    error_after_px: float

    def to_dict(self) -> dict:
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(self).items()}


def refine_model(model: pycolmap.Reconstruction, max_error_ratio: float,
                 options: pycolmap.BundleAdjustmentOptions | None = None,
                 ) -> tuple[pycolmap.Reconstruction, Refinement | None]:
    """The model with observations above `max_error_ratio` x the median point error removed and one global
    bundle adjustment with `options` (recon.sfm.mapping.final_adjustment; default: the incremental mapper's global
    adjustment). The input is not modified; it comes back as is (and None) when the ratio is 0 or the model has
    no points."""
    if max_error_ratio <= 0 or model.num_points3D() == 0:
        return model, None
    errors = np.fromiter((point.error for point in model.points3D.values()), float, count=model.num_points3D())
    median = float(np.median(errors))
    threshold = max_error_ratio * median
    refined = pycolmap.Reconstruction(model)
    error_before = refined.compute_mean_reprojection_error()
    filtered = pycolmap.ObservationManager(refined).filter_points3D_with_large_reprojection_error(
        threshold, set(refined.point3D_ids()))
    if filtered:
        if options is None:
            options = pycolmap.IncrementalPipelineOptions().get_global_bundle_adjustment()
            options.refine_principal_point = options.print_summary = False
        pycolmap.bundle_adjustment(refined, options)
        refined.update_point_3d_errors()
    report = Refinement(threshold, median, filtered, model.num_points3D(), refined.num_points3D(), error_before,
                        refined.compute_mean_reprojection_error())
    logger.info("Outlier filter: %d observations above %.2f px (%.1f x the median point error) removed, %d -> %d "
                "points, one bundle adjustment: %.3f -> %.3f px", filtered, threshold, max_error_ratio,
                report.points_before, report.points_after, report.error_before_px, report.error_after_px)
    return (refined if filtered else model), report
