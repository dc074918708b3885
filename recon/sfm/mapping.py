"""The mapping step: pycolmap's mapper on the verified database, models written largest first.

Options reach pycolmap's own option objects (`IncrementalPipelineOptions`, `GlobalPipelineOptions`) field by
field, and `mapper_options` are checked against them in `pipeline_options`, which the run calls before any
work so an unknown or mistyped key ends the run at once (exit 2) instead of after import and verification.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pycolmap
from tqdm import tqdm

from feature_backends.errors import ConfigError

logger = logging.getLogger(__name__)

MAPPERS = ("incremental", "global")


def _set_options(target: Any, values: dict, where: str) -> None:
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if not hasattr(target, head):
            _unknown(target, head, where)
        if rest or isinstance(value, dict):
            _set_options(getattr(target, head), {rest: value} if rest else value, f"{where}{head}.")
            continue
        try:
            setattr(target, head, value)
        except (TypeError, ValueError) as error:
            current = getattr(target, head)
            raise ConfigError(f"--mapper-option {where}{head}={value!r}: expected a value like "
                              f"{current!r} ({type(current).__name__})") from error


def _unknown(target: Any, key: str, where: str) -> None:
    known = sorted(name for name in dir(target) if not name.startswith("_") and not callable(getattr(target, name)))
    raise ConfigError(f"--mapper-option: unknown pycolmap option '{where}{key}' of {type(target).__name__}; "
                      f"known: {', '.join(known)}")


def pipeline_options(mapper: str, overrides: dict, num_images: int, num_threads: int, random_seed: int):
    """pycolmap's pipeline options for `mapper`, with the user's overrides checked field by field."""
    if mapper not in MAPPERS:
        raise ConfigError(f"unknown mapper '{mapper}'; known: {', '.join(MAPPERS)}")
    options = pycolmap.IncrementalPipelineOptions() if mapper == "incremental" else pycolmap.GlobalPipelineOptions()
    options.num_threads = num_threads
    options.random_seed = random_seed
    # Small collections (tests, previews) are valid models too; COLMAP's default minimum is 10 images.
    options.min_model_size = min(options.min_model_size, max(3, num_images // 2))
    _set_options(options, overrides, "")
    return options


def run_mapper(mapper: str, options: Any, database: Path, image_dir: Path, staging: Path,
               num_images: int) -> list[pycolmap.Reconstruction]:
    """The models pycolmap finds, largest first (empty when none could be initialised)."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    progress = tqdm(total=num_images, desc="mapping", unit="img")
    if mapper == "incremental":
        models = pycolmap.incremental_mapping(
            database, image_dir, staging, options,
            initial_image_pair_callback=lambda: progress.update(2),
            next_image_callback=lambda: progress.update(1),
        )
    else:
        models = pycolmap.global_mapping(database, image_dir, staging, options)
    progress.close()
    shutil.rmtree(staging, ignore_errors=True)
    return sorted(models.values(), key=lambda r: r.num_reg_images(), reverse=True)


def write_models(models: list[pycolmap.Reconstruction], sparse_root: Path) -> Path:
    """sparse/0 (largest), sparse/1, … in COLMAP's binary layout, replacing what was there."""
    staging = sparse_root.with_name(sparse_root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for index, model in enumerate(models):
        (staging / str(index)).mkdir(parents=True)
        model.write(staging / str(index))
    shutil.rmtree(sparse_root, ignore_errors=True)
    staging.replace(sparse_root)
    return sparse_root / "0"


def model_stats(reconstruction: pycolmap.Reconstruction) -> dict[str, float]:
    return {
        "num_registered": reconstruction.num_reg_images(),
        "num_points": reconstruction.num_points3D(),
        "mean_track_length": reconstruction.compute_mean_track_length() if reconstruction.num_points3D() else 0.0,
        "mean_reprojection_error": reconstruction.compute_mean_reprojection_error()
        if reconstruction.num_points3D() else 0.0,
    }
