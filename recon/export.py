"""Exports of a finished model (OUT/sparse/0) in the layouts downstream tools read.

- colmap-txt: cameras.txt, images.txt, points3D.txt next to the binary files in sparse/0.
- ply: OUT/points3D.ply, coloured points in COLMAP's world frame.
- 3dgs: OUT/undistorted/{images/, sparse/0/} with PINHOLE cameras (pycolmap's undistorter), the layout that
  the original 3DGS loader and gsplat's COLMAP parser read. Images with an EXIF orientation are staged upright
  first, so the exported pixels are those the keypoints were measured in.
- nerfstudio: OUT/undistorted/transforms.json (+ sparse_pc.ply) over the undistorted images, in nerfstudio's
  conventions (OpenGL camera axes, world axes permuted as `ns-process-data` does and recorded in
  `applied_transform`). Pointing it at the undistorted copy keeps nerfstudio, which ignores EXIF orientation
  and distortion of exotic models, on the same pixels as COLMAP.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import pycolmap
from PIL import Image

from feature_backends.errors import InputError
from feature_backends.images import exif_orientation, read_image

logger = logging.getLogger(__name__)

ExportFormat = Literal["colmap-txt", "ply", "nerfstudio", "3dgs"]
EXPORT_FORMATS: tuple[str, ...] = ("colmap-txt", "ply", "3dgs", "nerfstudio")

# nerfstudio's world-axis permutation (ns-process-data, keep_original_world_coordinate=False).
NERFSTUDIO_APPLIED_TRANSFORM = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0]], dtype=np.float64)


def load_model(out_dir: str | Path) -> tuple[Path, pycolmap.Reconstruction]:
    out_dir = Path(out_dir)
    for candidate in (out_dir / "sparse" / "0", out_dir / "sparse", out_dir):
        if (candidate / "cameras.bin").is_file() or (candidate / "cameras.txt").is_file():
            return candidate, pycolmap.Reconstruction(candidate)
    raise InputError(f"no COLMAP model in '{out_dir}' (looked for sparse/0, sparse and the folder itself)")


def export_colmap_text(out_dir: str | Path) -> Path:
    model_dir, reconstruction = load_model(out_dir)
    reconstruction.write_text(model_dir)
    return model_dir


def export_ply(out_dir: str | Path, path: str | Path | None = None) -> Path:
    _, reconstruction = load_model(out_dir)
    path = Path(path) if path else Path(out_dir) / "points3D.ply"
    reconstruction.export_PLY(path)
    return path


def _stage_upright_images(image_dir: Path, names: Iterable[str], staging: Path) -> Path:
    """A folder with every image upright: links to the originals, rotated PNG-lossless copies where needed."""
    names = list(names)
    rotated = [n for n in names if exif_orientation(image_dir / n) != 1]
    if not rotated:
        return image_dir
    for name in names:
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name in rotated:
            array = (read_image(image_dir / name) * 255.0 + 0.5).astype(np.uint8)
            Image.fromarray(array).save(target, format=Image.registered_extensions().get(target.suffix.lower(), "PNG"),
                                        quality=95)
        else:
            os.symlink((image_dir / name).resolve(), target)
    logger.info("Staged %d EXIF-rotated images upright for undistortion", len(rotated))
    return staging


def export_undistorted(out_dir: str | Path, image_dir: str | Path, max_image_size: int = -1) -> Path:
    """OUT/undistorted/{images, sparse/0} with PINHOLE cameras; returns OUT/undistorted."""
    out_dir = Path(out_dir)
    model_dir, reconstruction = load_model(out_dir)
    target = out_dir / "undistorted"
    partial = out_dir / "undistorted.partial"
    shutil.rmtree(partial, ignore_errors=True)
    names = [image.name for image in reconstruction.images.values() if image.has_pose]
    with tempfile.TemporaryDirectory(dir=out_dir) as staging:
        source = _stage_upright_images(Path(image_dir), names, Path(staging))
        options = pycolmap.UndistortCameraOptions()
        options.max_image_size = max_image_size
        pycolmap.undistort_images(partial, model_dir, source, image_names=names, output_type="COLMAP",
                                  undistort_options=options)
    sparse0 = partial / "sparse" / "0"
    sparse0.mkdir(parents=True, exist_ok=True)
    for file in (partial / "sparse").iterdir():
        if file.is_file():
            file.rename(sparse0 / file.name)
    for leftover in ("stereo",):
        shutil.rmtree(partial / leftover, ignore_errors=True)
    for script in partial.glob("run-colmap-*.sh"):
        script.unlink()
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def nerfstudio_frames(reconstruction: pycolmap.Reconstruction, image_prefix: str = "images/") -> dict:
    """transforms.json content for a PINHOLE/SIMPLE_PINHOLE model, as nerfstudio's colmap_to_json builds it."""
    frames = []
    intrinsics_by_camera = {}
    for camera_id, camera in reconstruction.cameras.items():
        if camera.model.name not in ("PINHOLE", "SIMPLE_PINHOLE"):
            raise InputError(f"nerfstudio export needs undistorted PINHOLE cameras, got {camera.model.name}")
        intrinsics_by_camera[camera_id] = {
            "fl_x": float(camera.focal_length_x), "fl_y": float(camera.focal_length_y),
            "cx": float(camera.principal_point_x), "cy": float(camera.principal_point_y),
            "w": int(camera.width), "h": int(camera.height),
        }
    for image_id in sorted(reconstruction.images):
        image = reconstruction.images[image_id]
        if not image.has_pose:
            continue
        world_to_camera = np.eye(4)
        world_to_camera[:3, :4] = image.cam_from_world().matrix()
        camera_to_world = np.linalg.inv(world_to_camera)
        camera_to_world[0:3, 1:3] *= -1  # OpenCV → OpenGL camera axes
        camera_to_world = camera_to_world[[0, 2, 1, 3], :]
        camera_to_world[2, :] *= -1
        frame = {"file_path": image_prefix + image.name, "transform_matrix": camera_to_world.tolist(),
                 "colmap_im_id": int(image_id)}
        frames.append((image.camera_id, frame))
    content: dict = {"camera_model": "OPENCV"}
    if len(intrinsics_by_camera) == 1:
        content.update(next(iter(intrinsics_by_camera.values())))
        content["frames"] = [frame for _, frame in frames]
    else:
        content["frames"] = [{**intrinsics_by_camera[cid], **frame} for cid, frame in frames]
    content["applied_transform"] = NERFSTUDIO_APPLIED_TRANSFORM.tolist()
    return content


def export_nerfstudio(out_dir: str | Path, image_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    undistorted = out_dir / "undistorted"
    if not (undistorted / "sparse" / "0").is_dir():
        export_undistorted(out_dir, image_dir)
    _, reconstruction = load_model(undistorted)
    content = nerfstudio_frames(reconstruction)
    transformed = pycolmap.Reconstruction(reconstruction)
    transformed.transform(pycolmap.Sim3d(1.0, pycolmap.Rotation3d(NERFSTUDIO_APPLIED_TRANSFORM[:, :3]), np.zeros(3)))
    transformed.export_PLY(undistorted / "sparse_pc.ply")
    content["ply_file_path"] = "sparse_pc.ply"
    path = undistorted / "transforms.json"
    path.write_text(json.dumps(content, indent=2))
    return path


def export(out_dir: str | Path, formats: Iterable[str], image_dir: str | Path | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    written = {}
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise InputError(f"unknown export format '{fmt}'; choose from {', '.join(EXPORT_FORMATS)}")
        if fmt in ("3dgs", "nerfstudio") and image_dir is None:
            image_dir = _image_dir_from_run(out_dir)
        if fmt == "colmap-txt":
            written[fmt] = export_colmap_text(out_dir)
        elif fmt == "ply":
            written[fmt] = export_ply(out_dir)
        elif fmt == "3dgs":
            written[fmt] = export_undistorted(out_dir, image_dir)
        elif fmt == "nerfstudio":
            written[fmt] = export_nerfstudio(out_dir, image_dir)
    return written


def _image_dir_from_run(out_dir: Path) -> Path:
    record = out_dir / "run.json"
    if record.is_file():
        image_dir = json.loads(record.read_text()).get("image_dir")
        if image_dir and Path(image_dir).is_dir():
            return Path(image_dir)
    raise InputError(f"cannot tell where the images of '{out_dir}' are; pass --images PATH")
