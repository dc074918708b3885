"""The mapping step: one of pycolmap's three mappers on the verified database, models written largest first.

Engines (all pycolmap 4.2.1, none re-implemented here):
- `incremental`: `incremental_mapping`, COLMAP's classic register-one-image-at-a-time mapper.
- `global`: `global_mapping` (GLOMAP merged into COLMAP: rotation averaging, global positioning, bundle
  adjustment). When a camera's focal length is a guess (no EXIF focal, no user intrinsics: the import sets
  `has_prior_focal_length` False), `calibrate_view_graph` first estimates focal lengths from the fundamental
  matrices and upgrades the two-view geometries to calibrated ones, as its docstring asks for "when reliable
  intrinsics are unavailable". The calibration rewrites the database, so it runs on a copy.
- `hierarchical`: `hierarchical_mapping`, which clusters the view graph (`SceneClusteringOptions`), maps the
  clusters incrementally on `num_workers` workers and merges them. Up to `leaf_max_num_images` (500) images it
  makes one cluster, i.e. it is the incremental mapper on all cores (N = 400: 176 s on 2 cores). Above, the
  clusters overlap by `image_overlap` (50) views and are merged without a final global bundle adjustment (COLMAP's
  pipeline has none): generated N = 1000 gave 3 clusters (539, 338, 323), mapped in 6.4 min on 2 cores, merged in
  0.3 s. COLMAP logs each cluster to OUT/sfm/colmap.log.* only; recon logs the start. The minutes after the merge
  that once looked like a hang were recon's principal-point step (recon.sfm.calibration, now limited to 500
  images).
`auto` (recon.sfm.auto) chooses among them.

Options reach pycolmap's own option objects field by field, and `mapper_options` are checked against them in
`pipeline_options`, which the run calls before any work so an unknown or mistyped key ends the run at once
(exit 2) instead of after import and verification. A key may name its engine first
(`global.mapper.ba_num_iterations=2`, `hierarchical.num_workers=2`, `view_graph_calibration.…`); without a
prefix it belongs to the one engine `--mapper` names; with `auto`, to every engine auto may run whose options have
it (the incremental options inside the hierarchical ones included).
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

ENGINES = ("incremental", "global", "hierarchical")
MAPPERS = (*ENGINES, "auto")
_CALIBRATION = "view_graph_calibration"
# The option objects each --mapper builds (auto runs incremental or hierarchical and, when needed, global).
_SECTIONS = {
    "incremental": ("incremental",),
    "global": ("global", _CALIBRATION),
    "hierarchical": ("hierarchical",),
    "auto": ("incremental", "hierarchical", "global", _CALIBRATION),
}


#: The incremental mapper runs a global bundle adjustment whenever the model has grown by this factor in frames or
#: points since the last one (COLMAP's default: 1.1); local bundle adjustments refine every registration in
#: between, and a global one always ends the run. Measured on recon's default matches, same database, SfM
#: stage alone (mapping seconds, AUC@1), 1.1 -> 1.4: temple_ring 2.9 -> 2.4 s, 34.0 -> 34.0; temple_ring_full
#: 11.3 -> 9.8 s, 68.7 -> 68.5; fountain_p11 9.5 -> 8.1 s, 91.6 -> 91.6 (1.25: 2.6 / 9.9 / 8.9 s, same AUC).
#: Fewer global adjustments also slow the growth of mapping time with N.
GLOBAL_BA_GROWTH = 1.4

#: Iterations of each local bundle adjustment of the incremental mapper (COLMAP's: 25). Each one only has to keep
#: the growing model good enough to register the next views: the final global one and recon.sfm.refinement's
#: polish it. Same database, SfM stage alone, mapping seconds (2 runs each; 4 for 25) and AUC@1 after the whole
#: stage, 25 -> 10 (-> 5): temple_ring_full 12.4-14.8 -> 10.5-11.3 (9.8-9.9) s, 77.8 -> 77.6 (77.6); fountain_p11
#: 9.1-13.0 -> 8.0-10.6 (8.9-9.1) s, 94.2 -> 94.2 (94.4); temple_ring 2.4-3.7 -> 2.7-2.9 (2.2-3.1) s, 37.9 -> 38.0
#: (38.0). 10 rather than 5: the hard scenes we do not have need each registration's poses well refined.
LOCAL_BA_ITERATIONS = 10


def _set_options(target: Any, values: dict, where: str) -> None:
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if not hasattr(target, head):
            _unknown(target, head, where)
        if rest:
            _set_options(getattr(target, head), {rest: value}, f"{where}{head}.")
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


def mapping_threads(section: str, num_threads: int | None) -> int:
    """The threads an engine maps with: the user's number, else one for the incremental mapper and all cores (-1)
    for the others.

    Why one: pycolmap 4.2.1's incremental mapper searches for its initial pair on `num_threads` threads that
    share the set of pairs already tried, so which pair wins (and so the model's frame, and on hard scenes the
    model) depends on thread timing. On the 6-view test scene 5 of 30 runs on one database chose another pair
    with 2 threads, 0 of 30 with one. On a 200-view database (2-core VM) mapping took 22.3 / 26.7 s with one
    thread and 22.0 / 26.6 s with two, the same model; more cores speed up large bundle adjustments, which
    `--sfm.num-threads N` buys back at the price of that reproducibility. The global mapper gave the same model
    in 15 of 15 runs with all cores. So a rerun, a resumed run and the fresh process give the same model."""
    if num_threads is not None:
        return num_threads
    return 1 if section == "incremental" else -1


def _new_options(section: str, num_images: int, num_threads: int | None, random_seed: int) -> Any:
    num_threads = mapping_threads(section, num_threads)
    if section == _CALIBRATION:
        options = pycolmap.ViewGraphCalibrationOptions()
        options.random_seed = random_seed
        return options
    if section == "hierarchical":
        options = pycolmap.HierarchicalPipelineOptions()
        options.num_threads = num_threads
        # One worker per core would run several multi-threaded bundle adjustments on the same cores.
        options.num_workers = 1 if num_threads == 1 else -1
        inner = options.incremental_options
    else:
        options = (pycolmap.IncrementalPipelineOptions() if section == "incremental"
                   else pycolmap.GlobalPipelineOptions())
        inner = options
    inner.num_threads = num_threads
    inner.random_seed = random_seed
    if section != "global":
        inner.ba_global_frames_ratio = inner.ba_global_points_ratio = GLOBAL_BA_GROWTH
        inner.ba_local_max_num_iterations = LOCAL_BA_ITERATIONS
    # Small collections (tests, previews) are valid models too; COLMAP's default minimum is 10 images.
    inner.min_model_size = min(inner.min_model_size, max(3, num_images // 2))
    return options


def pipeline_options(mapper: str, overrides: dict, num_images: int, num_threads: int | None, random_seed: int,
                     use_pose_priors: bool = False) -> dict[str, Any]:
    """pycolmap's option objects for `mapper`, by section (engine name or 'view_graph_calibration'), with the
    user's overrides checked field by field."""
    if mapper not in MAPPERS:
        raise ConfigError(f"unknown mapper '{mapper}'; known: {', '.join(MAPPERS)}")
    sections = {name: _new_options(name, num_images, num_threads, random_seed) for name in _SECTIONS[mapper]}
    # GPS in the incremental bundle adjustment (the global mapper has no prior term: its model is aligned after).
    for name, section in sections.items():
        if use_pose_priors and name in ("incremental", "hierarchical"):
            inner = section.incremental_options if name == "hierarchical" else section
            inner.use_prior_position = inner.use_robust_loss_on_prior_position = True
    for key, value in _dotted(overrides).items():
        head, _, rest = key.partition(".")
        if head in (*ENGINES, _CALIBRATION):
            if not rest:
                raise ConfigError(f"--mapper-option {key}={value!r}: name a field of the {head} options "
                                  f"({head}.FIELD=VALUE)")
            if head not in sections:
                raise ConfigError(f"--mapper-option {key}: --mapper {mapper} does not use the {head} options "
                                  f"(it uses: {', '.join(sections)})")
            _set_options(sections[head], {rest: value}, f"{head}.")
            if mapper == "auto" and head == "incremental":  # auto's hierarchical run is its incremental one above
                _set_options(sections["hierarchical"].incremental_options, {rest: value}, "incremental.")
        elif mapper == "auto":
            _set_auto_option(sections, key, value)
        else:
            _set_options(sections[mapper], {key: value}, "")
    return sections


def _dotted(overrides: dict, prefix: str = "") -> dict[str, Any]:
    """{"mapper": {"init_min_num_inliers": 50}} (the command line's nesting) -> {"mapper.init_min_num_inliers": 50}."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _set_auto_option(sections: dict[str, Any], key: str, value: Any) -> None:
    """An unprefixed key with --mapper auto: set wherever the engines auto may run have it (the incremental options,
    also inside the hierarchical ones, and the global options); unknown to all of them is an error."""
    targets = [(sections["incremental"], ""), (sections["hierarchical"].incremental_options, ""),
               (sections["global"], "global.")]
    found = [(target, where) for target, where in targets if _has_path(target, key)]
    if not found:
        raise ConfigError(f"--mapper-option: unknown pycolmap option '{key}' of IncrementalPipelineOptions or "
                          f"GlobalPipelineOptions (the engines of --mapper auto); name one engine's option as "
                          f"incremental.…, global.…, hierarchical.… or view_graph_calibration.…")
    for target, where in found:
        _set_options(target, {key: value}, where)


def _has_path(target: Any, key: str) -> bool:
    for part in key.split("."):
        if part.startswith("_") or not hasattr(target, part):
            return False
        target = getattr(target, part)
    return True


def has_focal_priors(database: Path) -> bool:
    """Whether every camera's focal length comes from EXIF or the user rather than a guess."""
    with pycolmap.Database.open(database) as db:
        return all(camera.has_prior_focal_length for camera in db.read_all_cameras())


def run_engine(engine: str, sections: dict[str, Any], database: Path, image_dir: Path, staging: Path,
               num_images: int, calibrate: str = "auto") -> list[pycolmap.Reconstruction]:
    """The models `engine` finds, largest first (empty when none could be initialised). `calibrate`: view-graph
    calibration before the global mapper, 'auto' (when a focal length is a guess), 'always' or 'never'."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if engine == "incremental":
            progress = tqdm(total=num_images, desc="mapping", unit="img")
            models = pycolmap.incremental_mapping(
                database, image_dir, staging, sections["incremental"],
                initial_image_pair_callback=lambda: progress.update(2),
                next_image_callback=lambda: progress.update(1),
            )
            progress.close()
        elif engine == "global":
            models = _global_mapping(sections, database, image_dir, staging, calibrate)
        elif engine == "hierarchical":
            models = _hierarchical_mapping(sections["hierarchical"], database, image_dir, staging, num_images)
        else:
            raise ConfigError(f"unknown mapping engine '{engine}'; known: {', '.join(ENGINES)}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(models.values(), key=lambda r: r.num_reg_images(), reverse=True)


def _global_mapping(sections: dict[str, Any], database: Path, image_dir: Path, staging: Path,
                    calibrate: str) -> dict[int, pycolmap.Reconstruction]:
    if calibrate == "always" or (calibrate == "auto" and not has_focal_priors(database)):
        # calibrate_view_graph rewrites the two-view geometries and cameras: keep the caller's database as it was.
        copy = staging / "global.db"
        shutil.copyfile(database, copy)
        database = copy
        calibrated = pycolmap.calibrate_view_graph(database, sections[_CALIBRATION])
        logger.info("View-graph calibration of the focal lengths %s",
                    "succeeded" if calibrated else "failed (mapping with the guesses)")
    (staging / "models").mkdir()
    return pycolmap.global_mapping(database, image_dir, staging / "models", sections["global"])


def _hierarchical_mapping(options: Any, database: Path, image_dir: Path, staging: Path,
                          num_images: int) -> dict[int, pycolmap.Reconstruction]:
    clustering = options.clustering_options
    # COLMAP logs the clusters (sizes, each one's incremental mapping, the merge) to OUT/sfm/colmap.log.* only.
    logger.info("Hierarchical mapping of %d images: %s (leaf_max_num_images %d, image_overlap %d), "
                "cluster progress in colmap.log", num_images,
                "one cluster, i.e. incremental mapping" if num_images <= clustering.leaf_max_num_images
                else "clusters mapped in parallel and merged", clustering.leaf_max_num_images,
                clustering.image_overlap)
    return pycolmap.hierarchical_mapping(database, image_dir, staging, options)


def final_adjustment(engine: str, sections: dict[str, Any]) -> pycolmap.BundleAdjustmentOptions:
    """The options of one more global bundle adjustment after `engine` (recon.sfm.refinement): the incremental
    mapper's own global adjustment (its iteration cap, tolerances and solver choice by size, with the user's
    `ba_global_*` overrides), refining the intrinsics `engine` refines (the user may have held some fixed through
    --mapper-option) except the principal point, which is recon.sfm.calibration's."""
    incremental = (sections["incremental"] if "incremental" in sections
                   else sections["hierarchical"].incremental_options if "hierarchical" in sections
                   else pycolmap.IncrementalPipelineOptions())
    options = incremental.get_global_bundle_adjustment()
    if engine == "global":
        intrinsics = sections["global"].mapper.bundle_adjustment
        focal, extra = intrinsics.refine_focal_length, intrinsics.refine_extra_params
    else:
        inner = sections["hierarchical"].incremental_options if engine == "hierarchical" else sections[engine]
        focal, extra = inner.ba_refine_focal_length, inner.ba_refine_extra_params
    options.refine_focal_length, options.refine_extra_params = focal, extra
    options.refine_principal_point = False
    options.print_summary = False
    return options


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
