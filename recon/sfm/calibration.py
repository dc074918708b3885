"""Principal-point self-calibration after mapping, kept only where the images pin it down.

COLMAP holds every principal point at the image centre (its mapper option `ba_refine_principal_point` is off),
because with few or weakly spread views the principal point trades off against rotation and drifts. Real lenses
are rarely centred, though, and a fixed wrong principal point tilts every camera by the same small angle: on the
Middlebury temple (true principal point (302.3, 246.9) in a 640x480 image, 18 px off centre) that bias alone caps
relative-pose accuracy, and metric photogrammetry tools (Metashape, RealityCapture) refine cx, cy by default.

So after the mapper has finished, one more global bundle adjustment frees the principal point of every camera
shared by enough registered images, and pycolmap's BA covariance decides, camera by camera, whether the estimate
is trustworthy: its standard deviation (for one pixel of keypoint noise, which overstates the ~0.3 px of SIFT)
must be below `max_sigma_fraction` of the image size, the shift below `max_shift_fraction` and significant
(Mahalanobis distance >= `min_significance`); otherwise that camera keeps COLMAP's centred principal point.
Measured with recon's default pipeline against ground truth (relative-pose AUC@1 over all pairs,
scripts/bench_sfm.py):

| scene              | sigma (px, 1 px noise) | shift (px) | kept | AUC@1 COLMAP / recon before -> after |
|--------------------|------------------------|------------|------|--------------------------------------|
| temple_ring_full   | 4.8 of 640             | 25         | yes  | 21.3 / 20.5 -> 62.4                  |
| fountain_p11       | 2.4 of 3072            | 26         | yes  | 66.1 / 65.3 -> 91.7                  |
| temple_ring (19)   | 82 of 640              | -          | no   | 33.8 / 32.2 (freed anyway: 0.3)      |

(with COLMAP's 4 px verification; recon.sfm.verification_error then raised them to 66.4, 91.8 and 34.0). The
generated demo scene (12 views, principal point exactly centred): the free estimate moves 3.0 px at sigma 2.4 px,
not significant, kept at the centre (taking it cost 20 points of AUC@1).

Scale: `max_images` (500). pycolmap's covariance builds a dense inverse factor of the Schur complement over every
pose (6 parameters per image): its time and memory grow steeply with the registered images, and the step runs it
twice around one global bundle adjustment. Measured on generated scenes (scripts/bench_scale.py, true principal
point exactly centred, 2-core VM), after hierarchical mapping:

| images | covariance before / after | BA, principal point free | whole step | mapping | AUC@1 mapper -> step |
|--------|---------------------------|--------------------------|------------|---------|----------------------|
| 400    | 11 / 9 s                  | 24 s                     | 39 s       | 176 s   | 87.7 (centre kept)   |
| 600    | 37 / 42 s                 | 27 s                     | 97 s       | 100 s   | 84.9 -> 82.5         |
| 1000   | 132 / > 90 s (stopped)    | 256 s                    | > 480 s    | 387 s   | 85.7 -> 80.5 (BA)    |

Above a few hundred views the step costs as much as mapping and more (at 1000 it was the 5+ silent minutes after
the last cluster that made `--mapper hierarchical` look hung; the process grew by 1.3 GB), and at these sizes
the covariance makes the freed principal point's drift look significant: 1.2 px at sigma 0.22 px
at 600 (refined, -2.4 AUC@1), 1.6 px at sigma 0.17 px at 1000, while the truth is the centre. So above
`max_images` registered images the mapper's model stands and the log says so; `--refine-principal-point always`
still frees the principal point there, with one bundle adjustment and no covariance.

pycolmap provides the bundle adjuster and the covariance; only the acceptance rule is ours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pycolmap

logger = logging.getLogger(__name__)


@dataclass
class PrincipalPointDecision:
    camera_id: int
    num_images: int
    shift_px: float
    sigma_px: float
    kept: bool
    reason: str


def refine_principal_points(
    reconstruction: pycolmap.Reconstruction,
    min_images: int = 8,
    max_images: int = 500,
    max_sigma_fraction: float = 0.01,
    max_shift_fraction: float = 0.1,
    min_significance: float = 3.7,  # Mahalanobis distance of the shift; sqrt of chi²(2 dof) at 0.999
    force: bool = False,
) -> tuple[pycolmap.Reconstruction, list[PrincipalPointDecision]]:
    """The model with principal points refined where well determined (all eligible cameras with `force`).

    The input is not modified; it is returned as is when no camera qualifies."""
    images_per_camera: dict[int, int] = {}
    for image_id in reconstruction.reg_image_ids():
        camera_id = reconstruction.images[image_id].camera_id
        images_per_camera[camera_id] = images_per_camera.get(camera_id, 0) + 1
    eligible = {cid for cid, count in images_per_camera.items() if count >= min_images}
    num_images = sum(images_per_camera.values())
    if not eligible:
        return reconstruction, []
    if force:  # every estimate is kept: no covariance to decide with, so no size limit either
        logger.info("Principal points: one bundle adjustment over %d registered images", num_images)
        trial, _ = _free_principal_points(pycolmap.Reconstruction(reconstruction), eligible, solve=True,
                                          covariance=False)
        return trial, _log([PrincipalPointDecision(
            cid, images_per_camera[cid], float(np.linalg.norm(_principal_point(trial.cameras[cid])
                                                              - _principal_point(reconstruction.cameras[cid]))),
            float("nan"), True, "forced") for cid in sorted(eligible)])
    if num_images > max_images:
        logger.info("Principal points kept at the centre: %d registered images exceed the limit of %d for the "
                    "covariance (it would cost as much as mapping; recon.sfm.calibration); "
                    "--refine-principal-point always frees them without it", num_images, max_images)
        return reconstruction, []
    logger.info("Principal points: bundle adjustment covariance over %d registered images", num_images)
    # The covariance at the mapper's solution already tells which cameras the views constrain (the Hessian
    # barely changes over the few pixels the principal point moves), so undetermined ones never enter the solve:
    # 0.07 s instead of a 1 s adjustment on temple_ring, where the freed principal point would drift 125 px.
    decisions: dict[int, PrincipalPointDecision] = {}
    _, covariance_before = _free_principal_points(pycolmap.Reconstruction(reconstruction), eligible, solve=False)
    sigma_before = {cid: _sigma(c) for cid, c in covariance_before.items()}
    undetermined = f"not determined by these views (sigma > {max_sigma_fraction:.0%} of the image)"
    candidates = {cid for cid in eligible
                  if sigma_before[cid] <= max_sigma_fraction * _size(reconstruction.cameras[cid])}
    for cid in eligible - candidates:
        decisions[cid] = PrincipalPointDecision(cid, images_per_camera[cid], 0.0, sigma_before[cid], False,
                                                undetermined)
    trial = reconstruction
    while candidates:
        trial, pp_covariance = _free_principal_points(pycolmap.Reconstruction(reconstruction), candidates, solve=True)
        rejected = set()
        for cid in candidates:
            size = _size(reconstruction.cameras[cid])
            offset = _principal_point(trial.cameras[cid]) - _principal_point(reconstruction.cameras[cid])
            shift, sigma = float(np.linalg.norm(offset)), _sigma(pp_covariance[cid])
            if not sigma <= max_sigma_fraction * size:
                kept, reason = False, undetermined
            elif shift > max_shift_fraction * size:
                kept, reason = False, f"implausible shift (> {max_shift_fraction:.0%} of the image)"
            elif _mahalanobis(offset, pp_covariance[cid]) < min_significance:
                # Occam: a shift the views cannot tell from noise only trades pose accuracy for nothing (a
                # generated scene with an exactly centred principal point moved 3 px and lost 20 points of AUC@1).
                kept, reason = False, f"shift not significant (< {min_significance} sigma)"
            else:
                kept, reason = True, "determined"
            decisions[cid] = PrincipalPointDecision(cid, images_per_camera[cid], shift, sigma, kept, reason)
            if not kept:
                rejected.add(cid)
        if not rejected:
            break
        # Start again from the mapper's model without them: a rejected camera's drift has already moved the poses
        # and points it shares with the others.
        candidates -= rejected
        trial = reconstruction
    return trial, _log(sorted(decisions.values(), key=lambda d: d.camera_id))


def _log(decisions: list[PrincipalPointDecision]) -> list[PrincipalPointDecision]:
    for d in decisions:
        logger.info("camera %d (%d images): principal point %s, shift %.1f px, sigma %.2f px — %s", d.camera_id,
                    d.num_images, "refined" if d.kept else "kept at the centre", d.shift_px, d.sigma_px, d.reason)
    return decisions


def _size(camera: pycolmap.Camera) -> int:
    return max(camera.width, camera.height)


def _free_principal_points(model: pycolmap.Reconstruction, free: set[int], solve: bool, covariance: bool = True):
    """(model, {camera: 2x2 principal-point covariance}) with the given cameras' principal points free, the model
    adjusted in place if `solve`; no covariances ({}) without `covariance`."""
    adjuster = _adjuster(model, free)
    if solve:
        adjuster.solve()
        model.update_point_3d_errors()  # the stored per-point errors feed the summary and the exports
    if not covariance:
        return model, {}
    covariance = pycolmap.estimate_ba_covariance(pycolmap.BACovarianceOptions(), model, adjuster)
    return model, {cid: _principal_point_covariance(covariance, model.cameras[cid]) for cid in free}


def _adjuster(reconstruction: pycolmap.Reconstruction, free_principal_point: set[int]):
    """Global BA problem over all registered images; only the given cameras' principal points are free."""
    options = pycolmap.BundleAdjustmentOptions()
    options.print_summary = False
    options.refine_principal_point = True
    config = pycolmap.BundleAdjustmentConfig()
    for image_id in reconstruction.reg_image_ids():
        config.add_image(image_id)
    for camera_id in reconstruction.cameras:
        if camera_id not in free_principal_point:
            config.set_constant_cam_intrinsics(camera_id)
    config.fix_gauge(pycolmap.BundleAdjustmentGauge.THREE_POINTS)
    return pycolmap.create_default_ceres_bundle_adjuster(options, config, reconstruction)


def _principal_point(camera: pycolmap.Camera) -> np.ndarray:
    return np.asarray(camera.params)[list(camera.principal_point_idxs())]


def _principal_point_covariance(covariance, camera: pycolmap.Camera) -> np.ndarray | None:
    """The 2x2 covariance of (cx, cy), in pixels² for unit keypoint noise; None when unavailable."""
    if covariance is None:
        return None
    block = covariance.get_other_params_cov(camera.params)
    if block is None or block.shape[0] != len(camera.params):
        return None
    index = list(camera.principal_point_idxs())
    return block[np.ix_(index, index)]


def _sigma(pp_covariance: np.ndarray | None) -> float:
    """Largest standard deviation of the principal point; inf when unknown."""
    if pp_covariance is None:
        return float("inf")
    return float(np.sqrt(max(np.linalg.eigvalsh(pp_covariance).max(), 0.0)))


def _mahalanobis(shift: np.ndarray, pp_covariance: np.ndarray | None) -> float:
    if pp_covariance is None:
        return 0.0
    return float(np.sqrt(shift @ np.linalg.solve(pp_covariance, shift)))
