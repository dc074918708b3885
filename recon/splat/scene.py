"""The training input: the posed, undistorted PINHOLE views and the sparse points of a COLMAP model.

Input is the undistorted PINHOLE export (`OUT/undistorted/{images,sparse/0}`), or any folder holding `images/` +
`sparse/0` directly. Splatting rasterizers are pinhole-only, so a distorted model is refused with an InputError
instead of being trained with the wrong projection (gsplat's parser undistorts on the fly; we leave that to the
export stage so every consumer sees the same images). Views are sorted by name; every `eval_every`-th one (index 0
first, as gsplat's parser) is held out for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pycolmap
import torch
from PIL import Image

from feature_backends.errors import InputError
from feature_backends.images import read_image

if TYPE_CHECKING:
    from . import SplatConfig

PINHOLE_MODELS = ("PINHOLE", "SIMPLE_PINHOLE")


@dataclass
class View:
    name: str
    image: torch.Tensor  # (H, W, 3) float32 in [0, 1]
    viewmat: torch.Tensor  # (4, 4) cam_from_world
    K: torch.Tensor  # (3, 3)

    @property
    def width(self) -> int:
        return self.image.shape[1]

    @property
    def height(self) -> int:
        return self.image.shape[0]


@dataclass
class Scene:
    train: list[View]
    test: list[View]
    points: np.ndarray  # (N, 3)
    colors: np.ndarray  # (N, 3) in [0, 1]
    scene_scale: float
    resolution_scale: int
    model_dir: Path


def find_model(out_dir: str | Path) -> tuple[Path, Path]:
    """(image_dir, sparse_dir) of the undistorted export in `out_dir`, or of `out_dir` itself."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"'{out_dir}' is not a folder")
    for root in (out_dir / "undistorted", out_dir):
        for sparse in (root / "sparse" / "0", root / "sparse"):
            if (sparse / "cameras.bin").is_file() or (sparse / "cameras.txt").is_file():
                if not (root / "images").is_dir():
                    raise InputError(f"found the model '{sparse}' but no image folder '{root / 'images'}'")
                return root / "images", sparse
    raise InputError(
        f"no sparse model in '{out_dir}': expected the undistorted export OUT/undistorted/{{images,sparse/0}} "
        "(written by recon's export stage) or a folder holding images/ and sparse/0/"
    )


def _auto_scale(width: int, height: int, max_side: int) -> int:
    scale = 1
    while max(width, height) / scale > max_side:
        scale *= 2
    return scale


def load_scene(out_dir: str | Path, config: SplatConfig, device: torch.device) -> Scene:
    image_dir, sparse_dir = find_model(out_dir)
    reconstruction = pycolmap.Reconstruction(sparse_dir)
    for camera in reconstruction.cameras.values():
        if camera.model.name not in PINHOLE_MODELS:
            raise InputError(
                f"camera {camera.camera_id} in '{sparse_dir}' is {camera.model.name}; Gaussian splatting needs "
                f"undistorted {' or '.join(PINHOLE_MODELS)} cameras: run the export stage (undistortion) and pass "
                "its output folder"
            )
    images = sorted((im for im in reconstruction.images.values() if im.has_pose), key=lambda im: im.name)
    if len(images) < 2:
        raise InputError(f"the model in '{sparse_dir}' has {len(images)} posed image(s); splatting needs at least 2")
    if len(reconstruction.points3D) < 4:
        raise InputError(f"the model in '{sparse_dir}' has {len(reconstruction.points3D)} 3D points; need >= 4")

    first_camera = reconstruction.cameras[images[0].camera_id]
    scale = config.resolution_scale
    if scale is None:
        scale = 1 if device.type == "cuda" else _auto_scale(first_camera.width, first_camera.height,
                                                             config.cpu_max_side)
    views: list[View] = []
    for image in images:
        camera = reconstruction.cameras[image.camera_id]
        path = image_dir / image.name
        pixels = read_image(path)
        if pixels.shape[:2] != (camera.height, camera.width):
            raise InputError(
                f"image '{path}' is {pixels.shape[1]}x{pixels.shape[0]} but its camera is "
                f"{camera.width}x{camera.height}; pass the undistorted images that belong to this model"
            )
        K = camera.calibration_matrix().astype(np.float64)
        if scale > 1:
            width, height = max(1, camera.width // scale), max(1, camera.height // scale)
            pixels = np.asarray(Image.fromarray((pixels * 255).round().astype(np.uint8)).resize(
                (width, height), Image.Resampling.BOX), np.float32) / 255.0
            # COLMAP pixel centres sit at +0.5, so scaling the whole first two rows is exact
            K[0] *= width / camera.width
            K[1] *= height / camera.height
        viewmat = np.eye(4)
        viewmat[:3] = image.cam_from_world().matrix()
        views.append(View(
            name=image.name,
            image=torch.from_numpy(np.ascontiguousarray(pixels[..., :3])).float().to(device),
            viewmat=torch.from_numpy(viewmat).float().to(device),
            K=torch.from_numpy(K).float().to(device),
        ))
    k = config.eval_every
    test = [v for i, v in enumerate(views) if k and i % k == 0]
    train = [v for i, v in enumerate(views) if not (k and i % k == 0)]

    ids = sorted(reconstruction.points3D)
    points = np.array([reconstruction.points3D[i].xyz for i in ids], np.float64)
    colors = np.array([reconstruction.points3D[i].color for i in ids], np.float64) / 255.0
    centers = np.array([im.projection_center() for im in images])
    # gsplat's parser: 1.1 x the largest camera distance from the mean camera centre
    scene_scale = float(np.linalg.norm(centers - centers.mean(0), axis=1).max() * 1.1) or 1.0
    return Scene(train, test, points, colors, scene_scale, scale, sparse_dir)
