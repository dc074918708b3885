"""Spatial prior from EXIF GPS, with the semantics of COLMAP's spatial matcher.

Each image's latitude/longitude(/altitude) becomes an Earth-centred (ECEF, WGS84) position in metres; by default
the altitude is ignored (COLMAP's `ignore_z`, on by default, because consumer GPS altitude is far noisier than its
horizontal fix). An image's spatial neighbours are its `max_neighbors` nearest images within `max_distance` metres,
topped up to `min_neighbors` regardless of distance (COLMAP's `min_num_neighbors`). Unlike COLMAP, the query image
itself does not count against `max_neighbors`.

Used alone (`--method spatial`) these neighbours are the pairs. Combined with retrieval they restrict the
candidates: a query with GPS is only compared with its spatial neighbours and with images that have no GPS (an
unknown position cannot be ruled out), so the prior removes pairs known to be far apart and nothing else.
The k-d tree is scipy's cKDTree (exact, O(N log N)), the same search COLMAP does with FLANN.

The EXIF block is read from the file header with PIL only; pixels are never decoded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from feature_backends.errors import InputError
from feature_backends.images import header_exif

from .io import deduplicate

logger = logging.getLogger(__name__)

GPS_IFD = 0x8825
_LAT_REF, _LAT, _LON_REF, _LON, _ALT_REF, _ALT = 1, 2, 3, 4, 5, 6

WGS84_A = 6378137.0
WGS84_F = 1 / 298.257223563
WGS84_E2 = WGS84_F * (2 - WGS84_F)


def _degrees(value) -> float:
    degrees, minutes, seconds = (float(v) for v in value)
    return degrees + minutes / 60.0 + seconds / 3600.0


def read_gps(path: str | Path) -> tuple[float, float, float | None] | None:
    """(latitude, longitude, altitude or None) in degrees and metres from EXIF, or None when absent/invalid."""
    try:
        with Image.open(path) as image:
            gps = header_exif(image).get_ifd(GPS_IFD)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None
    if _LAT not in gps or _LON not in gps:
        return None
    try:
        latitude = _degrees(gps[_LAT]) * (-1 if str(gps.get(_LAT_REF, "N")).upper().startswith("S") else 1)
        longitude = _degrees(gps[_LON]) * (-1 if str(gps.get(_LON_REF, "E")).upper().startswith("W") else 1)
        altitude = None
        if _ALT in gps:
            below = gps.get(_ALT_REF, 0)
            below = below[0] if isinstance(below, bytes) and below else below
            altitude = float(gps[_ALT]) * (-1 if below == 1 else 1)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not (-90 <= latitude <= 90 and -180 <= longitude <= 180) or (latitude == 0 and longitude == 0):
        return None  # (0, 0) is what cameras write when they had no fix; COLMAP skips it as well
    return latitude, longitude, altitude


def ecef(latitude: float, longitude: float, altitude: float = 0.0) -> np.ndarray:
    """WGS84 geodetic → Earth-centred, Earth-fixed coordinates in metres."""
    lat, lon = math.radians(latitude), math.radians(longitude)
    radius = WGS84_A / math.sqrt(1 - WGS84_E2 * math.sin(lat) ** 2)
    return np.array([
        (radius + altitude) * math.cos(lat) * math.cos(lon),
        (radius + altitude) * math.cos(lat) * math.sin(lon),
        (radius * (1 - WGS84_E2) + altitude) * math.sin(lat),
    ])


def read_positions(image_dir: str | Path, names: Sequence[str], ignore_z: bool = True) -> dict[str, np.ndarray]:
    """ECEF positions of the images that carry EXIF GPS."""
    positions = {}
    for name in names:
        gps = read_gps(Path(image_dir) / name)
        if gps is not None:
            latitude, longitude, altitude = gps
            positions[name] = ecef(latitude, longitude, 0.0 if ignore_z or altitude is None else altitude)
    logger.info("GPS: %d of %d images carry EXIF positions", len(positions), len(names))
    return positions


def spatial_neighbours(
    positions: Mapping[str, np.ndarray],
    max_neighbors: int = 50,
    max_distance: float = 100.0,
    min_neighbors: int = 0,
) -> dict[str, list[str]]:
    """Each positioned image → its nearest others, closest first (see the module docstring for the rule)."""
    from scipy.spatial import cKDTree

    if max_neighbors < 1 or max_distance <= 0:
        raise InputError("spatial prior needs max_neighbors >= 1 and max_distance > 0")
    names = list(positions)
    if len(names) < 2:
        return {name: [] for name in names}
    points = np.stack([positions[name] for name in names])
    tree = cKDTree(points)
    k = min(max(max_neighbors, min_neighbors) + 1, len(names))
    distances, indices = tree.query(points, k=k)
    out = {}
    for row, name in enumerate(names):
        found = []
        for distance, index in zip(np.atleast_1d(distances[row]), np.atleast_1d(indices[row])):
            if index == row:
                continue
            if distance > max_distance and len(found) >= min_neighbors:
                break
            found.append(names[index])
            if len(found) >= max(max_neighbors, min_neighbors):
                break
        out[name] = found
    return out


def spatial_pairs(neighbours: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
    return deduplicate((name, other) for name, others in neighbours.items() for other in others)
