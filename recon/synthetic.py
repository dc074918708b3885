"""Generated scenes with known poses, for the examples, tests and benchmarks.

pycolmap already synthesizes a reconstruction and renders one textured patch per 3D point
(`synthesize_dataset` + `synthesize_images`), so nothing here re-implements rendering: this
module only picks settings that a feature pipeline can actually solve. Patches are drawn per
point, so dense point sets overlap into mush; 150 points at 640x480 over 12 frames registers
every frame with COLMAP's own SIFT pipeline, 400 points only 2 of 12.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pycolmap


@dataclass(frozen=True, kw_only=True)
class SceneSpec:
    num_frames: int = 12
    num_points: int = 150
    width: int = 640
    height: int = 480
    focal: float = 800.0
    seed: int = 0


def make_scene(out_dir: str | Path, spec: SceneSpec = SceneSpec()) -> Path:
    """Write `out_dir/images/*.png` and the ground-truth model `out_dir/gt/`; return out_dir.

    The ground truth is a COLMAP text+binary model whose image names match the PNG names, so
    `recon eval OUT/sparse/0 --gt out_dir/gt` compares against it directly.
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    gt_dir = out_dir / "gt"
    image_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)

    options = pycolmap.SyntheticDatasetOptions()
    options.num_rigs = 1
    options.num_cameras_per_rig = 1
    options.num_frames_per_rig = spec.num_frames
    options.num_points3D = spec.num_points
    options.camera_width = spec.width
    options.camera_height = spec.height
    options.camera_model_id = pycolmap.CameraModelId.SIMPLE_RADIAL
    options.camera_params = [spec.focal, spec.width / 2, spec.height / 2, 0.0]
    options.num_points2D_without_point3D = 0
    pycolmap.set_random_seed(spec.seed)
    reconstruction = pycolmap.synthesize_dataset(options)
    pycolmap.synthesize_images(pycolmap.SyntheticImageOptions(), reconstruction, image_dir)
    reconstruction.write(gt_dir)
    return out_dir
