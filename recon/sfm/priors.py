"""GPS pose priors: EXIF positions written to the database as pycolmap `PosePrior`s, and a metric model.

The import writes one WGS84 prior per image whose EXIF carries GPS (read by pairs.spatial.read_gps, the same
reader as spatial pairs), as COLMAP's own image reader does, with a diagonal covariance of `std` metres (consumer
GPS gives no accuracy in EXIF; an image without altitude gets 0 m and 100× the vertical variance).

With `use_pose_priors`, the incremental mapper (also inside the hierarchical one) adds the priors to its bundle
adjustment (`use_prior_position`, robust loss), which makes its model metric. The global mapper of pycolmap
4.2.1 has no prior term, so every engine's model is then aligned to the priors by a RANSAC similarity
(`align_reconstruction_to_locations`, inlier threshold 3 × std) in a local east-north-up frame whose origin,
the first prior, is returned so the model can be put back on the globe.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pycolmap

from pairs.spatial import read_gps

logger = logging.getLogger(__name__)

_NO_ALTITUDE_FACTOR = 100.0


def pose_prior(path: Path, camera_id: int, image_id: int, std: float) -> pycolmap.PosePrior | None:
    """The image's EXIF GPS as a WGS84 prior (latitude, longitude, altitude), or None without GPS."""
    gps = read_gps(path)
    if gps is None:
        return None
    latitude, longitude, altitude = gps
    variance = np.array([1.0, 1.0, 1.0 if altitude is not None else _NO_ALTITUDE_FACTOR]) * std**2
    return pycolmap.PosePrior(
        position=np.array([latitude, longitude, altitude or 0.0]),
        position_covariance=np.diag(variance),
        coordinate_system=pycolmap.PosePriorCoordinateSystem.WGS84,
        corr_data_id=pycolmap.data_t(sensor_id=pycolmap.sensor_t(type=pycolmap.SensorType.CAMERA, id=camera_id),
                                     id=image_id),
    )


def prior_positions(database: Path) -> tuple[dict[int, np.ndarray], tuple[float, float, float] | None]:
    """East-north-up positions (metres) of the images with a WGS84 prior, and the frame's origin (lat, lon, alt)."""
    with pycolmap.Database.open(database) as db:
        priors = [p for p in db.read_all_pose_priors()
                  if p.coordinate_system == pycolmap.PosePriorCoordinateSystem.WGS84]
    if not priors:
        return {}, None
    wgs84 = np.array([p.position for p in priors])
    origin = tuple(float(v) for v in wgs84[0])
    enu = pycolmap.GPSTransform().ellipsoid_to_enu(wgs84, *origin)
    return {p.corr_data_id.id: np.asarray(position) for p, position in zip(priors, enu)}, origin


def align_to_priors(model: pycolmap.Reconstruction, database: Path, std: float) -> dict | None:
    """Move `model` into the priors' east-north-up frame (metres); None when fewer than 3 registered images have
    priors or no similarity fits."""
    positions, origin = prior_positions(database)
    common = [image_id for image_id in model.reg_image_ids() if image_id in positions]
    if len(common) < 3:
        logger.warning("pose priors: %d registered images carry GPS, 3 are needed to align the model", len(common))
        return None
    ransac = pycolmap.RANSACOptions()
    ransac.max_error = 3.0 * std
    names = [model.images[image_id].name for image_id in common]
    sim3 = pycolmap.align_reconstruction_to_locations(model, names, np.array([positions[i] for i in common]),
                                                      3, ransac)
    if sim3 is None:
        logger.warning("pose priors: no similarity aligns the model to the GPS positions within %.1f m",
                       ransac.max_error)
        return None
    model.transform(sim3)
    residuals = [np.linalg.norm(model.images[i].projection_center() - positions[i]) for i in common]
    logger.info("pose priors: model aligned to %d GPS positions (scale %.4g, median residual %.2f m)",
                len(common), sim3.scale, float(np.median(residuals)))
    return {"enu_origin_wgs84": origin, "images_with_gps": len(common), "scale": float(sim3.scale),
            "median_residual_m": float(np.median(residuals))}
