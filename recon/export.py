"""Exports of a finished model (OUT/sparse/0) in the layouts downstream tools read.

- colmap-txt: cameras.txt, images.txt, points3D.txt next to the binary files in sparse/0.
- ply: OUT/points3D.ply, coloured points in COLMAP's world frame.
- 3dgs: OUT/undistorted/{images/, images_2/, images_4/, images_8/, sparse/0/} with PINHOLE cameras (pycolmap's
  undistorter, any camera model including OPENCV_FISHEYE), the layout that the original 3DGS loader, gsplat's
  COLMAP parser (`--data_factor 1/2/4/8`) and nerfstudio's colmap dataparser read. Images with an EXIF
  orientation are staged upright first, so the exported pixels are those the keypoints were measured in.
  Nested names (video frames: `clip/t000001.000.jpg`) are flattened to `clip__t000001.000.jpg` in the export,
  because nerfstudio looks downscaled images up by base name and gsplat pairs `images/` with `images_N/` by
  sorted order: both need one flat folder, the same names at every scale. With masks (COLMAP's convention,
  `<mask_dir>/<image name>.png`, zero = ignore), each is undistorted with its image's camera into
  `masks/<exported name without suffix>.png` (and `masks_N/`): nerfstudio's layout, which both its transforms.json
  and its colmap dataparser (`masks_path`) read.
- nerfstudio: OUT/undistorted/transforms.json (+ sparse_pc.ply) over the undistorted images, in nerfstudio's
  conventions (OpenGL camera axes, world axes permuted as `ns-process-data` does and recorded in
  `applied_transform`; `./images/` paths, `colmap_im_id`, `k1 k2 p1 p2` = 0 since the images are undistorted,
  `mask_path` when masks exist). Pointing it at the undistorted copy keeps nerfstudio, which ignores EXIF
  orientation and distortion of exotic models, on the same pixels as COLMAP.

Each export is stamped with the model it was made from (OUT/exports.json: the size and time of every binary
model file, and the export's options); a rerun on an unchanged model recomputes nothing, and one export never
removes another's files (3dgs after nerfstudio keeps transforms.json). The image folder is the one the SfM
stage recorded with the model (recon.sfm.recorded_image_dir) unless given.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycolmap
from PIL import Image

from feature_backends.errors import ConfigError, InputError
from feature_backends.images import exif_orientation, read_image

from .options import option
from .records import read_record, write_record

logger = logging.getLogger(__name__)

EXPORT_FORMATS: tuple[str, ...] = ("colmap-txt", "ply", "3dgs", "nerfstudio")
_STAMPS = "exports.json"


@dataclass
class ExportOptions:
    formats: tuple[str, ...] = option(EXPORT_FORMATS, flags=("--format",), run_flags=("--export",),
                                      help=f"comma-separated export formats ({', '.join(EXPORT_FORMATS)})")
    max_image_size: int = option(-1, help="3dgs / nerfstudio: longer side of the undistorted images (-1: as is)")
    downscales: tuple[int, ...] = option((2, 4, 8), argparse={"type": lambda text: tuple(
        int(v) for v in text.split(",") if v)}, metavar="2,4,8",
        help="3dgs: downscaled copies images_<f>/ (and masks_<f>/), as ns-process-data writes and gsplat's "
             "--data_factor reads (empty: none)")
    mask_dir: Path | None = option(None, flags=("--masks",), run_flags=(),
                                   help="masks <image name>.png (zero = ignore) to undistort into the export "
                                        "(default for recon run: the extraction's --masks)")

    def check(self) -> None:
        for fmt in self.formats:
            if fmt not in EXPORT_FORMATS:
                raise ConfigError(f"unknown export format '{fmt}'; choose from {', '.join(EXPORT_FORMATS)}")
        if any(f < 2 for f in self.downscales):
            raise ConfigError(f"--downscales takes factors of 2 or more, got {self.downscales}")
        if self.mask_dir is not None and not Path(self.mask_dir).is_dir():
            raise ConfigError(f"mask folder '{self.mask_dir}' does not exist")

# nerfstudio's world-axis permutation (ns-process-data, keep_original_world_coordinate=False).
NERFSTUDIO_APPLIED_TRANSFORM = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0]], dtype=np.float64)


def model_folder(out_dir: str | Path) -> Path:
    """The model folder of OUT: sparse/0, sparse or OUT itself (found, not read)."""
    out_dir = Path(out_dir)
    for candidate in (out_dir / "sparse" / "0", out_dir / "sparse", out_dir):
        if (candidate / "cameras.bin").is_file() or (candidate / "cameras.txt").is_file():
            return candidate
    raise InputError(f"no COLMAP model in '{out_dir}' (looked for sparse/0, sparse and the folder itself)")


def load_model(out_dir: str | Path) -> tuple[Path, pycolmap.Reconstruction]:
    model_dir = model_folder(out_dir)
    try:
        return model_dir, pycolmap.Reconstruction(model_dir)
    except (ValueError, IndexError, RuntimeError, MemoryError) as error:  # what pycolmap raises on cut files
        raise InputError(f"the COLMAP model in '{model_dir}' cannot be read ({type(error).__name__}: {error}); "
                         "delete it and run `recon run` again to rebuild it") from error


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


def flat_names(names: Iterable[str]) -> dict[str, str]:
    """name → the exported name: '/' becomes '__'; a collision (or a flat name taken twice) is an error."""
    mapping = {name: name.replace("/", "__") for name in names}
    if len(set(mapping.values())) != len(mapping):
        raise InputError("two images would share one name in the flat export folder; rename the one with '__'")
    return mapping


def export_mask_name(flat: str) -> str:
    """The mask of exported image `flat` in the export: its stem + .png (nerfstudio's convention)."""
    return Path(flat).with_suffix(".png").name


def _downscale(source: Path, target: Path, factor: int, nearest: bool = False) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        # Floor, as nerfstudio scales its cameras (int(w / f)) and ffmpeg's scale=iw/f in ns-process-data.
        size = (max(1, image.width // factor), max(1, image.height // factor))
        resized = image.resize(size, Image.NEAREST if nearest else Image.BICUBIC)
        resized.save(target, quality=95)


def _undistort_masks(reconstruction: pycolmap.Reconstruction, model_dir: Path, mask_dir: Path, target: Path,
                     names: dict[str, str], options: pycolmap.UndistortCameraOptions) -> int:
    """masks/<exported name>.png: each mask warped by its image's undistortion (pycolmap.undistort_image, the
    undistorter's own mapping), kept where the warped value is at least half."""
    from .extract import mask_path

    distorted = pycolmap.Reconstruction(model_dir)
    count = 0
    for image in distorted.images.values():
        path = mask_path(mask_dir, image.name)
        if image.name not in names or not path.is_file():
            continue
        mask = np.asarray(Image.open(path).convert("L"))
        camera = distorted.cameras[image.camera_id]
        warped, _ = pycolmap.undistort_image(options, pycolmap.Bitmap.from_array(mask), camera)
        keep = np.asarray(warped.to_array()).reshape(warped.height, warped.width, -1)[..., 0] >= 128
        out = target / export_mask_name(names[image.name])
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((keep * 255).astype(np.uint8)).save(out)
        count += 1
    return count


def export_undistorted(out_dir: str | Path, image_dir: str | Path, max_image_size: int = -1,
                       downscales: Iterable[int] = (2, 4, 8), mask_dir: str | Path | None = None) -> Path:
    """OUT/undistorted/{images, images_N, masks*, sparse/0} with PINHOLE cameras; returns OUT/undistorted."""
    out_dir = Path(out_dir)
    model_dir, reconstruction = load_model(out_dir)
    target = out_dir / "undistorted"
    partial = out_dir / "undistorted.partial"
    shutil.rmtree(partial, ignore_errors=True)
    names = [image.name for image in reconstruction.images.values() if image.has_pose]
    # A fixed name (OUT is locked, one run at a time), so a staging folder left by a killed run is removed here.
    staging = out_dir / "undistorted.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        source = _stage_upright_images(Path(image_dir), names, staging)
        options = pycolmap.UndistortCameraOptions()
        options.max_image_size = max_image_size
        pycolmap.undistort_images(partial, model_dir, source, image_names=names, output_type="COLMAP",
                                  undistort_options=options)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    sparse0 = partial / "sparse" / "0"
    sparse0.mkdir(parents=True, exist_ok=True)
    for file in (partial / "sparse").iterdir():
        if file.is_file():
            file.rename(sparse0 / file.name)
    _flatten_and_scale(partial, sparse0, model_dir, names, downscales, mask_dir, options)
    for leftover in ("stereo",):
        shutil.rmtree(partial / leftover, ignore_errors=True)
    for script in partial.glob("run-colmap-*.sh"):
        script.unlink()
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def _flatten_and_scale(partial: Path, sparse0: Path, model_dir: Path, names: list[str], downscales: Iterable[int],
                       mask_dir: str | Path | None, options: pycolmap.UndistortCameraOptions) -> None:
    """Flat names in images/ and sparse/0, the masks, then the downscaled copies of both."""
    mapping = flat_names(names)
    undistorted = pycolmap.Reconstruction(sparse0)
    for image in undistorted.images.values():
        flat = mapping[image.name]
        if flat != image.name:
            (partial / "images" / image.name).rename(partial / "images" / flat)
            image.name = flat
    undistorted.write(sparse0)
    for folder in sorted((partial / "images").glob("**/*"), reverse=True):
        if folder.is_dir():
            folder.rmdir()  # emptied sub-folders of nested names
    masked = 0
    if mask_dir is not None:
        if len({export_mask_name(flat) for flat in mapping.values()}) != len(mapping):
            raise InputError("two exported images differ only in their suffix, so their masks would share a name")
        masked = _undistort_masks(undistorted, model_dir, Path(mask_dir), partial / "masks", mapping, options)
        logger.info("Undistorted %d masks into %s", masked, partial / "masks")
    for factor in downscales:
        for flat in mapping.values():
            _downscale(partial / "images" / flat, partial / f"images_{factor}" / flat, factor)
            mask = export_mask_name(flat)
            if masked and (partial / "masks" / mask).is_file():
                _downscale(partial / "masks" / mask, partial / f"masks_{factor}" / mask, factor, nearest=True)


def nerfstudio_frames(reconstruction: pycolmap.Reconstruction, image_prefix: str = "./images/",
                      mask_prefix: str | None = None) -> dict:
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
            "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,  # undistorted images
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
        if mask_prefix is not None:
            frame["mask_path"] = mask_prefix + export_mask_name(image.name)
        frames.append((image.camera_id, frame))
    content: dict = {"camera_model": "OPENCV"}
    if len(intrinsics_by_camera) == 1:
        content.update(next(iter(intrinsics_by_camera.values())))
        content["frames"] = [frame for _, frame in frames]
    else:
        content["frames"] = [{**intrinsics_by_camera[cid], **frame} for cid, frame in frames]
    content["applied_transform"] = NERFSTUDIO_APPLIED_TRANSFORM.tolist()
    return content


def export_nerfstudio(out_dir: str | Path, image_dir: str | Path | None = None) -> Path:
    """transforms.json + sparse_pc.ply in OUT/undistorted (made first when missing)."""
    out_dir = Path(out_dir)
    undistorted = out_dir / "undistorted"
    if not (undistorted / "sparse" / "0").is_dir():
        export_undistorted(out_dir, image_dir)
    _, reconstruction = load_model(undistorted)
    names = [image.name for image in reconstruction.images.values() if image.has_pose]
    masked = all((undistorted / "masks" / export_mask_name(name)).is_file() for name in names)
    content = nerfstudio_frames(reconstruction, mask_prefix="./masks/" if masked else None)
    transformed = pycolmap.Reconstruction(reconstruction)
    transformed.transform(pycolmap.Sim3d(1.0, pycolmap.Rotation3d(NERFSTUDIO_APPLIED_TRANSFORM[:, :3]), np.zeros(3)))
    transformed.export_PLY(undistorted / "sparse_pc.ply")
    content["ply_file_path"] = "sparse_pc.ply"
    path = write_record(undistorted / "transforms.json", content, indent=2)
    return path


def export(out_dir: str | Path, options: ExportOptions | Iterable[str] | None = None,
           image_dir: str | Path | None = None) -> dict[str, Path]:
    """Every format of `options` for the model in OUT/sparse/0; formats already up to date are not redone."""
    out_dir = Path(out_dir)
    if not isinstance(options, ExportOptions):
        options = ExportOptions() if options is None else ExportOptions(formats=tuple(options))
    options.check()
    model_dir = model_folder(out_dir)  # the up-to-date checks need its files' stamps only, not the model read
    stamps_path = out_dir / _STAMPS
    stamps = read_record(stamps_path) or {}
    model = _model_fingerprint(model_dir)
    todo = [fmt for fmt in EXPORT_FORMATS if fmt in options.formats or (fmt == "3dgs" and "nerfstudio" in
                                                                         options.formats)]
    written = {}
    for fmt in todo:  # in EXPORT_FORMATS order: nerfstudio is built on the undistorted (3dgs) export
        key = {"model": model, "max_image_size": options.max_image_size, "downscales": list(options.downscales),
               "masks": _folder_fingerprint(options.mask_dir)}
        present, target = _TARGETS[fmt](out_dir, model_dir)
        if stamps.get(fmt) == key and present.exists():
            logger.info("Export %s is up to date: %s", fmt, target)
        else:
            if fmt in ("3dgs", "nerfstudio") and image_dir is None:
                from .sfm import recorded_image_dir

                image_dir = recorded_image_dir(out_dir)
            _EXPORTERS[fmt](out_dir, image_dir, options)
            stamps[fmt] = key
            if fmt == "3dgs":
                stamps.pop("nerfstudio", None)  # its files were made from the undistorted images just replaced
            write_record(stamps_path, stamps, indent=2)
        if fmt in options.formats:
            written[fmt] = target
    return written


def _folder_fingerprint(folder: Path | None) -> list | None:
    """The mask folder as its files' names, sizes and times (a changed mask redoes the undistorted export)."""
    if folder is None:
        return None
    return sorted([p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
                  for p in Path(folder).rglob("*.png"))


def _model_fingerprint(model_dir: Path) -> dict[str, list[int]]:
    return {file.name: [file.stat().st_size, file.stat().st_mtime_ns] for file in sorted(model_dir.glob("*.bin"))}


# What each export writes: the file whose presence says it is there, and the path reported.
_TARGETS = {
    "colmap-txt": lambda out, model: (model / "images.txt", model),
    "ply": lambda out, model: (out / "points3D.ply",) * 2,
    "3dgs": lambda out, model: (out / "undistorted" / "sparse" / "0" / "cameras.bin", out / "undistorted"),
    "nerfstudio": lambda out, model: (out / "undistorted" / "transforms.json",) * 2,
}
_EXPORTERS = {
    "colmap-txt": lambda out, images, options: export_colmap_text(out),
    "ply": lambda out, images, options: export_ply(out),
    "3dgs": lambda out, images, options: export_undistorted(out, images, options.max_image_size, options.downscales,
                                                            options.mask_dir),
    "nerfstudio": lambda out, images, options: export_nerfstudio(out, images),
}
