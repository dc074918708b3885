"""Structure from motion from hloc-format features and matches, with pycolmap.

`reconstruct(sfm_dir, image_dir, pairs_path, features_path, matches_path)` builds `sfm_dir/database.db`,
verifies the matches geometrically, runs pycolmap's incremental mapper and writes the largest model to
`sfm_dir/sparse/0` (other models, if any, to sparse/1, 2 … by size). COLMAP's own log goes to
`sfm_dir/colmap.log`. A finished reconstruction is stamped with its inputs; calling again with the same
inputs returns it without re-mapping.

All of it (import, verification, mapping, calibration) runs in a fresh Python process by default
(`SfMOptions.fresh_process`). COLMAP's mapper is slower in a process that has just extracted and matched:
temple_ring_full's database, mapped in one process right after recon's matching stage, took 17.5 / 11.1 /
9.0 s in three runs, and 10.5 / 6.9 / 7.2 s when the same process handed it to a spawned one (alternating runs,
spawning included). The mapper is single-threaded there and page faults do not explain it (fewer after matching,
not more); the state that slows it (heap layout, caches) is not isolated, and a fresh process avoids it for
~0.4 s of start-up. A crash inside COLMAP then also ends in an error message rather than taking the pipeline
down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pycolmap
from tqdm import tqdm

from feature_backends import errors
from feature_backends.errors import InputError, ReconError
from feature_backends.store import FeatureReader, list_feature_names, read_stored_conf
from pairs.io import read_pairs

from .calibration import refine_principal_points
from .database import CameraMode, import_features, import_matches
from .verifiers import VerifierSettings, verify

logger = logging.getLogger(__name__)

_STAMP = "sfm_inputs.json"


@dataclass
class SfMOptions:
    camera_mode: CameraMode = "single"
    camera_model: str = "SIMPLE_RADIAL"
    mapper: Literal["incremental", "global"] = "incremental"
    min_match_score: float | None = None
    num_threads: int = -1
    random_seed: int = 0
    #: RANSAC threshold of geometric verification, in pixels of the original images. None: 2 px at the
    #: resolution the keypoints were detected at (see `verification_error`), COLMAP's 4 px when that is unknown.
    verification_max_error: float | None = None
    #: Geometric verification (recon.verifiers): "colmap" (COLMAP's LO-RANSAC over E, F and H; default), "magsac"
    #: (OpenCV's USAC MAGSAC++) or "poselib" (PoseLib's LO-RANSAC). CLI: --verifier.
    verifier: Literal["colmap", "magsac", "poselib"] = "colmap"
    #: What "magsac" and "poselib" fit: "fundamental" (pixels, no intrinsics) or "essential" (the database's camera
    #: priors). COLMAP's verifier fits all models and picks itself.
    verifier_model: Literal["fundamental", "essential"] = "fundamental"
    #: RANSAC confidence and iteration cap of every verifier (COLMAP's defaults).
    verification_confidence: float = 0.999
    verification_max_iterations: int = 10000
    #: After mapping: "auto" frees the principal point of shared cameras and keeps it where the views determine
    #: it (recon.calibration); "never" is COLMAP's fixed centre; "always" keeps every refined one.
    refine_principal_point: Literal["auto", "always", "never"] = "auto"
    #: Extra pycolmap.IncrementalPipelineOptions fields, checked against pycolmap's option object.
    mapper_options: dict = field(default_factory=dict)
    #: Run import, verification and mapping in a fresh Python process (see the module docstring: faster after
    #: the matching stages, and a COLMAP crash becomes an error). Not part of the result, so not of its stamp.
    fresh_process: bool = True


@dataclass
class SfMResult:
    sparse_dir: Path
    num_images: int
    num_registered: int
    num_points: int
    mean_track_length: float
    mean_reprojection_error: float
    num_models: int
    timings: dict[str, float]


def _fingerprint(paths: list[Path], options: SfMOptions) -> dict:
    files = {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}
    settings = asdict(options)
    del settings["fresh_process"]
    return {"files": files, "options": settings}


def _set_options(target, values: dict, where: str) -> None:
    for key, value in values.items():
        if "." in key:
            head, rest = key.split(".", 1)
            _set_options(getattr(target, head), {rest: value}, f"{where}.{head}")
            continue
        if not hasattr(target, key):
            raise InputError(f"unknown pycolmap option '{where}.{key}'")
        setattr(target, key, value)


def _mapper_options(options: SfMOptions, num_images: int):
    """pycolmap's pipeline options for the chosen mapper, with user overrides checked field by field."""
    if options.mapper == "incremental":
        mapper = pycolmap.IncrementalPipelineOptions()
    else:
        mapper = pycolmap.GlobalPipelineOptions()
    mapper.num_threads = options.num_threads
    mapper.random_seed = options.random_seed
    # Small collections (tests, previews) are valid models too; COLMAP's default minimum is 10 images.
    mapper.min_model_size = min(mapper.min_model_size, max(3, num_images // 2))
    _set_options(mapper, options.mapper_options, "mapper_options")
    return mapper


#: COLMAP's verification threshold (pixels of the image, whatever its size).
COLMAP_VERIFICATION_ERROR = 4.0
#: recon's, in pixels of the image the keypoints were detected in.
DETECTION_VERIFICATION_ERROR = 2.0


def verification_error(features_path: str | Path) -> float:
    """2 px at the detection resolution, in original-image pixels; COLMAP's 4 px if features.h5 does not say.

    Keypoint noise lives at the resolution the detector saw: SIFT on a 640 px image localises to ~0.1-0.3 px, on
    a 3072 px image resized to 1600 px to ~0.2-0.6 original px. COLMAP's fixed 4 px is loose for the first and
    fits the second. Measured (relative-pose AUC@1 against ground truth, scripts/bench_sfm.py pipeline):
    4 px -> 2 px at the detection scale: temple_ring 32.2 -> 34.0, temple_ring_full 62.4 -> 66.4, fountain_p11
    (3.84 px, detection at 1600 of 3072) 91.7 -> 91.9; registered images unchanged, also on sacre_coeur (10/10)
    and sceaux_castle (11/11), whose internet / uncalibrated photos have lens distortion.
    """
    record = read_stored_conf(features_path) or {}
    resize_max = (record.get("conf") or {}).get("resize_max")
    if not resize_max:
        return COLMAP_VERIFICATION_ERROR
    with FeatureReader(features_path) as reader:
        largest = max((int(max(reader.read(name, ["image_size"])["image_size"])) for name in reader.names()),
                      default=resize_max)
    return DETECTION_VERIFICATION_ERROR * max(1.0, largest / resize_max)


def model_stats(reconstruction: pycolmap.Reconstruction) -> dict[str, float]:
    return {
        "num_registered": reconstruction.num_reg_images(),
        "num_points": reconstruction.num_points3D(),
        "mean_track_length": reconstruction.compute_mean_track_length() if reconstruction.num_points3D() else 0.0,
        "mean_reprojection_error": reconstruction.compute_mean_reprojection_error()
        if reconstruction.num_points3D() else 0.0,
    }


def reconstruct(
    sfm_dir: str | Path,
    image_dir: str | Path,
    pairs_path: str | Path,
    features_path: str | Path,
    matches_path: str | Path,
    options: SfMOptions | None = None,
) -> SfMResult:
    options = options or SfMOptions()
    sfm_dir = Path(sfm_dir)
    sfm_dir.mkdir(parents=True, exist_ok=True)
    sparse_root = sfm_dir / "sparse"
    inputs = [Path(pairs_path), Path(features_path), Path(matches_path)]
    stamp = _fingerprint(inputs, options)
    stamp_path = sfm_dir / _STAMP
    if (sparse_root / "0").is_dir() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        logger.info("Reconstruction in %s is up to date with its inputs; not re-mapping", sparse_root / "0")
        reconstruction = pycolmap.Reconstruction(sparse_root / "0")
        num_images = len(list_feature_names(features_path))
        return SfMResult(sparse_root / "0", num_images, num_models=len(list(sparse_root.iterdir())),
                         timings={}, **model_stats(reconstruction))

    arguments = [str(sfm_dir), str(image_dir), str(pairs_path), str(features_path), str(matches_path)]
    if options.fresh_process and sys.executable:  # an embedded interpreter has no executable to start
        return _reconstruct_in_fresh_process(arguments, options, stamp)
    return _reconstruct_here(arguments, options, stamp)


def _reconstruct_here(arguments: list[str], options: SfMOptions, stamp: dict) -> SfMResult:
    sfm_dir = Path(arguments[0])
    with _colmap_log_to(sfm_dir / "colmap.log."):
        return _reconstruct(*map(Path, arguments), options, list_feature_names(arguments[3]), stamp,
                            sfm_dir / _STAMP, {})


def _reconstruct_in_fresh_process(arguments: list[str], options: SfMOptions, stamp: dict) -> SfMResult:
    """`_reconstruct_here` in a new interpreter. Errors come back as the same ReconError class and message; the
    child's log lines and progress bars go to this process's stderr."""
    root = logging.getLogger()
    handler_format = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    request = {
        "arguments": arguments, "options": asdict(options), "stamp": stamp,
        "log_level": logger.getEffectiveLevel(),
        "log_format": handler_format._fmt if handler_format else None,
        "log_datefmt": handler_format.datefmt if handler_format else None,
        "colmap_to_stderr": bool(pycolmap.logging.alsologtostderr),
    }
    with tempfile.TemporaryDirectory(prefix="recon-sfm-") as exchange:
        request_path, reply_path = Path(exchange, "request.json"), Path(exchange, "reply.json")
        request_path.write_text(json.dumps(request))
        # The package root goes first on the child's path, so a checkout that is not installed imports the same code.
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        process = subprocess.run(
            [sys.executable, "-c", "import sys, recon.sfm; recon.sfm._child_main(*sys.argv[1:])",
             str(request_path), str(reply_path)], env=env, check=False)
        reply = json.loads(reply_path.read_text()) if reply_path.is_file() else {}
    if "result" in reply:
        result = reply["result"]
        return SfMResult(**{**result, "sparse_dir": Path(result["sparse_dir"])})
    if "error" in reply:
        error_class = getattr(errors, reply["error"]["type"], ReconError)
        raise error_class(reply["error"]["message"])
    if process.returncode < 0:
        reason = f"was killed by {signal.Signals(-process.returncode).name}"
    else:
        reason = f"exited with status {process.returncode} (traceback above)"
    raise ReconError(f"the SfM process {reason}; COLMAP's log is in {arguments[0]}/colmap.log.*")


def _child_main(request_path: str, reply_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    logging.basicConfig(level=request["log_level"], format=request["log_format"] or logging.BASIC_FORMAT,
                        datefmt=request["log_datefmt"])
    pycolmap.logging.alsologtostderr = request["colmap_to_stderr"]
    try:
        result = _reconstruct_here(request["arguments"], SfMOptions(**request["options"]), request["stamp"])
    except ReconError as error:
        reply = {"error": {"type": type(error).__name__, "message": str(error)}}
    else:
        reply = {"result": {**asdict(result), "sparse_dir": str(result.sparse_dir)}}
    Path(reply_path).write_text(json.dumps(reply))


@contextlib.contextmanager
def _colmap_log_to(prefix: Path):
    """COLMAP's glog lines go to OUT/sfm/colmap.log.<time> instead of the terminal (unless -v)."""
    log = pycolmap.logging
    previous = log.alsologtostderr
    log.set_log_destination(log.INFO, str(prefix))
    log.alsologtostderr = previous and logger.isEnabledFor(logging.DEBUG)
    try:
        yield
    finally:
        log.alsologtostderr = previous


def _reconstruct(sfm_dir, image_dir, pairs_path, features_path, matches_path, options, names, stamp, stamp_path,
                 timings) -> SfMResult:
    sparse_root = sfm_dir / "sparse"
    database = sfm_dir / "database.db"
    start = time.perf_counter()
    pairs = read_pairs(pairs_path)
    image_ids = import_features(database, image_dir, features_path, options.camera_mode, options.camera_model)
    match_counts = import_matches(database, image_ids, pairs, matches_path, options.min_match_score)
    num_matches = sum(match_counts.values())
    timings["import"] = time.perf_counter() - start
    logger.info("Imported %d pairs with %d raw matches", len(pairs), num_matches)

    start = time.perf_counter()
    settings = VerifierSettings(
        options.verifier, options.verifier_model,
        options.verification_max_error if options.verification_max_error is not None
        else verification_error(features_path),
        options.verification_confidence, options.verification_max_iterations, random_seed=options.random_seed)
    logger.info("Verification: %s, threshold %.2f px", settings.verifier, settings.max_error)
    # Pairs with fewer raw matches than a model needs inliers can never verify; COLMAP skips them after reading
    # them back, we do not hand them over at all (on temple_ring_full most of the 1081 pairs are such).
    candidates = {pair: count for pair, count in match_counts.items() if count >= settings.min_num_inliers}
    num_verified = verify(database, candidates, sfm_dir, settings)
    timings["verify"] = time.perf_counter() - start
    logger.info("Geometric verification: %d of %d pairs verified (%d with too few matches to try)",
                num_verified, len(pairs), len(match_counts) - len(candidates))

    start = time.perf_counter()
    staging = sfm_dir / "models.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    mapper = _mapper_options(options, len(image_ids))
    progress = tqdm(total=len(image_ids), desc="mapping", unit="img")
    if options.mapper == "incremental":
        models = pycolmap.incremental_mapping(
            database, image_dir, staging, mapper,
            initial_image_pair_callback=lambda: progress.update(2),
            next_image_callback=lambda: progress.update(1),
        )
    else:
        models = pycolmap.global_mapping(database, image_dir, staging, mapper)
    progress.close()
    timings["map"] = time.perf_counter() - start
    if not models:
        raise ReconError(
            f"mapping failed: no model could be initialised from {num_verified} verified pairs "
            f"(see {sfm_dir}/colmap.log.*). Try more pairs, more keypoints or another matcher."
        )
    ordered = sorted(models.values(), key=lambda r: r.num_reg_images(), reverse=True)
    if options.refine_principal_point != "never":
        start = time.perf_counter()
        ordered = [refine_principal_points(model, force=options.refine_principal_point == "always")[0]
                   for model in ordered]
        timings["calibrate"] = time.perf_counter() - start
    shutil.rmtree(sparse_root, ignore_errors=True)
    sparse_root.mkdir()
    for index, reconstruction in enumerate(ordered):
        (sparse_root / str(index)).mkdir()
        reconstruction.write(sparse_root / str(index))
    shutil.rmtree(staging, ignore_errors=True)
    stamp_path.write_text(json.dumps(stamp))
    best = ordered[0]
    if len(ordered) > 1:
        logger.warning("The scene split into %d models; the largest (%d images) is sparse/0",
                       len(ordered), best.num_reg_images())
    return SfMResult(sparse_root / "0", len(names), num_models=len(ordered), timings=timings, **model_stats(best))
