"""Generated correspondence scenes for the mapping engines: features.h5, matches.h5 and pairs.txt written
straight from known 3D points and cameras, with no images to render, extract or match.

The mappers see exactly what they would after recon's matching stage (keypoints with pixel noise, raw matches
with outliers), in milliseconds instead of minutes, and the scene's graph can be shaped at will: `weak_links`
cut the ring of cameras at given frames and leave only `weak_matches` matches in each pair across a cut (the
"textureless turntable" where incremental mapping splits), and `gps_sigma` writes EXIF GPS positions (metres of
noise around the true centre, in a local east-north-up frame at `gps_origin`) into small placeholder JPEGs so
the import can read pose priors. The ground truth goes to `gt/` as a COLMAP model, for `recon eval`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap

from feature_backends.store import FeatureWriter, MatchWriter
from pairs.io import write_pairs


@dataclass(frozen=True, kw_only=True)
class RingSpec:
    num_frames: int = 24
    num_points: int = 1500
    radius: float = 6.0  # metres: cameras on a horizontal circle looking at the origin
    width: int = 640
    height: int = 480
    focal: float = 500.0
    principal_offset: tuple[float, float] = (0.0, 0.0)  # pixels from the image centre
    noise_px: float = 0.5
    outlier_ratio: float = 0.1  # random wrong matches added per pair
    window: int = 3  # each frame is paired with the next `window` frames around the ring
    weak_links: tuple[int, ...] = ()  # cuts before these frames
    weak_matches: int = 0  # true matches kept per pair across a cut
    weak_outliers: int = 0  # wrong matches added per pair across a cut
    view_cone_deg: float = 90.0  # a point is seen only within this angle of its normal (short tracks when small)
    exif_focal: bool = True  # write the focal length to EXIF (False: the import guesses it)
    gps_sigma: float | None = None  # metres; None: no GPS
    gps_origin: tuple[float, float, float] = (47.3769, 8.5417, 400.0)  # latitude, longitude, altitude
    seed: int = 0

    @property
    def names(self) -> list[str]:
        return [f"frame_{i:04d}.jpg" for i in range(self.num_frames)]


def ring_cameras(spec: RingSpec) -> list[tuple[np.ndarray, np.ndarray]]:
    """(R, t) world->camera per frame, x_cam = R X + t; y is down, the ring lies in the x-z plane."""
    cameras = []
    for index in range(spec.num_frames):
        angle = 2 * np.pi * index / spec.num_frames
        height = 0.4 * np.sin(3 * angle)  # not a planar ring: a little vertical motion
        centre = np.array([spec.radius * np.sin(angle), height, -spec.radius * np.cos(angle)])
        forward = -centre / np.linalg.norm(centre)
        right = np.cross([0.0, 1.0, 0.0], forward)
        right /= np.linalg.norm(right)
        R = np.stack([right, np.cross(forward, right), forward])
        cameras.append((R, -R @ centre))
    return cameras


def _points(spec: RingSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points on a vertical cylinder (half the ring's radius, so the object fills the view: a small object seen
    from afar leaves the focal length undetermined) and their outward normals (visibility)."""
    angle = rng.uniform(0, 2 * np.pi, spec.num_points)
    normals = np.stack([np.sin(angle), np.zeros_like(angle), -np.cos(angle)], axis=1)
    points = spec.radius / 2 * normals + np.stack([np.zeros_like(angle), rng.uniform(-1.5, 1.5, spec.num_points),
                                        np.zeros_like(angle)], axis=1)
    return points, normals


def _crosses_cut(i: int, j: int, spec: RingSpec) -> bool:
    steps = [(i + k) % spec.num_frames for k in range(1, (j - i) % spec.num_frames + 1)]
    return any(step in spec.weak_links for step in steps)


def make_ring_scene(out_dir: str | Path, spec: RingSpec = RingSpec()) -> Path:
    """Write OUT/{features.h5, matches.h5, pairs.txt, images/, gt/}; return OUT."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    points, normals = _points(spec, rng)
    cx, cy = spec.width / 2 + spec.principal_offset[0], spec.height / 2 + spec.principal_offset[1]
    K = np.array([[spec.focal, 0, cx], [0, spec.focal, cy], [0, 0, 1.0]])
    cameras = ring_cameras(spec)
    visible_ids: list[np.ndarray] = []
    with FeatureWriter(out_dir / "features.h5") as features:
        for name, (R, t) in zip(spec.names, cameras):
            local = points @ R.T + t
            pixels = (local @ K.T)[:, :2] / local[:, 2:]
            centre = -R.T @ t
            rays = (centre - points) / np.linalg.norm(centre - points, axis=1, keepdims=True)
            seen = (local[:, 2] > 0) & (np.einsum("ij,ij->i", normals, rays) > np.cos(np.deg2rad(spec.view_cone_deg)))
            seen &= (pixels[:, 0] > 0) & (pixels[:, 0] < spec.width) & (pixels[:, 1] > 0) & (pixels[:, 1] < spec.height)
            ids = np.flatnonzero(seen)
            visible_ids.append(ids)
            keypoints = pixels[ids] + rng.normal(0, spec.noise_px, (len(ids), 2)) - 0.5  # hloc convention
            features.write(name, {"keypoints": keypoints.astype(np.float32),
                                  "image_size": np.array([spec.width, spec.height]),
                                  "scores": np.ones(len(ids), np.float32)})
    pairs = []
    with MatchWriter(out_dir / "matches.h5") as matches:
        for i in range(spec.num_frames):
            for step in range(1, spec.window + 1):
                j = (i + step) % spec.num_frames
                pairs.append((spec.names[i], spec.names[j]))
                matches.write(spec.names[i], spec.names[j],
                              _pair_matches(visible_ids[i], visible_ids[j], _crosses_cut(i, j, spec), spec, rng))
    write_pairs(out_dir / "pairs.txt", pairs)
    _write_images(out_dir / "images", spec, cameras, rng)
    _ground_truth(spec, K, cameras).write(_mkdir(out_dir / "gt"))
    return out_dir


def _pair_matches(ids0: np.ndarray, ids1: np.ndarray, weak: bool, spec: RingSpec,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    _, index0, index1 = np.intersect1d(ids0, ids1, return_indices=True)
    if weak:
        keep = rng.permutation(len(index0))[:spec.weak_matches]
        index0, index1 = index0[keep], index1[keep]
    matches0 = np.full(len(ids0), -1, np.int32)
    matches0[index0] = index1
    free0 = np.flatnonzero(matches0 < 0)
    num_outliers = min(len(free0), int(spec.outlier_ratio * len(index0)) + (spec.weak_outliers if weak else 0))
    if num_outliers:
        unused1 = np.setdiff1d(np.arange(len(ids1)), index1)
        chosen = rng.choice(free0, num_outliers, replace=False)
        matches0[chosen] = rng.choice(unused1, num_outliers, replace=len(unused1) < num_outliers)
    return {"matches0": matches0, "matching_scores0": (matches0 >= 0).astype(np.float32)}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def enu_to_wgs84(origin: tuple[float, float, float], enu: np.ndarray) -> np.ndarray:
    """(N, 3) east-north-up metres around `origin` (lat, lon, alt) -> (N, 3) latitude, longitude, altitude."""
    gps = pycolmap.GPSTransform()
    return np.asarray(gps.enu_to_ellipsoid(enu, *origin[:2], origin[2]))


def camera_enu(spec: RingSpec, cameras) -> np.ndarray:
    """True camera centres in east-north-up metres: world x -> east, z -> north, -y -> up (a rotation)."""
    centres = np.array([-R.T @ t for R, t in cameras])
    return np.stack([centres[:, 0], centres[:, 2], -centres[:, 1]], axis=1)


def _write_images(image_dir: Path, spec: RingSpec, cameras, rng: np.random.Generator) -> None:
    """Grey JPEGs (the mappers never read pixels) with the focal length (FocalLength in mm and the focal-plane
    resolution in pixels per mm) and GPS in EXIF, as the spec asks."""
    from PIL import Image

    gps = None
    if spec.gps_sigma is not None:
        enu = camera_enu(spec, cameras) + rng.normal(0, spec.gps_sigma, (spec.num_frames, 3))
        gps = enu_to_wgs84(spec.gps_origin, enu)
    for index, name in enumerate(spec.names):
        image = Image.new("L", (spec.width, spec.height), 128)
        exif = Image.Exif()
        if spec.exif_focal:
            exif[0x8769] = {0x920A: spec.focal / 100.0, 0xA20E: 100.0, 0xA210: 4}
        if gps is not None:
            exif[0x8825] = _gps_ifd(*gps[index])
        image.save(image_dir / name, exif=exif)


def _gps_ifd(latitude: float, longitude: float, altitude: float) -> dict:
    def dms(value: float) -> tuple[float, float, float]:
        value = abs(value)
        degrees = int(value)
        minutes = int((value - degrees) * 60)
        return (float(degrees), float(minutes), round((value - degrees - minutes / 60) * 3600, 6))

    return {1: "N" if latitude >= 0 else "S", 2: dms(latitude), 3: "E" if longitude >= 0 else "W",
            4: dms(longitude), 5: 0 if altitude >= 0 else 1, 6: abs(round(altitude, 4))}


def _ground_truth(spec: RingSpec, K: np.ndarray, cameras) -> pycolmap.Reconstruction:
    reconstruction = pycolmap.Reconstruction()
    camera = pycolmap.Camera.create_from_model_name(1, "PINHOLE", spec.focal, spec.width, spec.height)
    camera.params = [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]
    reconstruction.add_camera_with_trivial_rig(camera)
    for index, (name, (R, t)) in enumerate(zip(spec.names, cameras), 1):
        image = pycolmap.Image(name=name, camera_id=1, image_id=index)
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(R), t)
        reconstruction.add_image_with_trivial_frame(image, pose)
    return reconstruction
