"""The SfM stage: hloc-format features and matches → COLMAP database → verified pairs → pycolmap mapping.

`reconstruct(out_dir, image_dir, pairs_path, features_path, matches_path, options)` writes the models to
`out_dir/sparse/0` (largest; others to sparse/1, 2 … by size), where COLMAP, nerfstudio and the export stage look
for them, and its work files to `out_dir/sfm/` (database.db, colmap.log.*, the inputs stamp). A finished
reconstruction is stamped with its inputs; calling again with the same inputs returns it without re-mapping.

Modules: `database` (import), `verification` (two-view geometry), `mapping` (pycolmap's mappers), `auto` (which
mapper), `refinement` (outlier filter and bundle adjustment after mapping), `calibration` (principal point),
`process` (the whole stage in a fresh Python process, the default: measured faster after the matching stages, and
a COLMAP crash becomes an error message; see its docstring).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pycolmap

from feature_backends.errors import ConfigError, InputError, ReconError
from feature_backends.store import list_feature_names
from pairs.io import check_names, read_pairs

from ..options import option, to_dict
from ..records import read_record, write_record
from .calibration import refine_principal_points
from .auto import map_scene
from .database import CameraMode, check_matches_fit, import_features, import_matches, restore_names
from .mapping import final_adjustment, model_stats, pipeline_options, write_models
from .priors import align_to_priors
from .refinement import refine_model
from .verification import verification_error
from .verifiers import VerifierSettings, verify

logger = logging.getLogger(__name__)

_STAMP = "sfm_inputs.json"
_ENGINE = "engine.json"  # which engine made sparse/, and why


@dataclass
class SfMOptions:
    camera_mode: CameraMode = option("single", flags=("--camera-mode",), help="images sharing one camera: all of a size, per sub-folder, or none")
    camera_model: str = option("SIMPLE_RADIAL", flags=("--camera-model",),
                               help="COLMAP camera model (SIMPLE_RADIAL, OPENCV, OPENCV_FISHEYE, …)")
    mapper: Literal["incremental", "global", "hierarchical", "auto"] = option(
        "auto", flags=("--mapper",),
        help="pycolmap's incremental mapper, its global mapper (GLOMAP; view-graph calibration first when focal "
             "lengths are guesses), its hierarchical mapper (clusters mapped in parallel, then merged), or auto: "
             "incremental (hierarchical above 500 images), and the global mapper too when that leaves views out, "
             "keeping the model with more views (recon.sfm.auto has the rule and the measurements)")
    mapper_options: dict = option(
        default_factory=dict, flags=("--mapper-option",),
        help="a field of pycolmap's IncrementalPipelineOptions / GlobalPipelineOptions / "
             "HierarchicalPipelineOptions (the engine --mapper names), optionally prefixed by the engine "
             "(required with auto): incremental.mapper.init_min_num_inliers=50, global.mapper.ba_num_iterations=2, "
             "hierarchical.num_workers=2, hierarchical.clustering_options.leaf_max_num_images=200, "
             "view_graph_calibration.…; checked before any work")
    view_graph_calibration: Literal["auto", "always", "never"] = option(
        "auto", help="global mapper: estimate focal lengths from the view graph first (pycolmap's "
                     "calibrate_view_graph); 'auto' when some camera's focal length is a guess (no EXIF)")
    use_pose_priors: bool = option(
        False, flags=("--use-pose-priors",),
        help="use EXIF GPS: the incremental mapper adds the positions to its bundle adjustment, and every model "
             "is aligned to them (metric, in an east-north-up frame whose origin run.json records)")
    pose_prior_std: float = option(5.0, help="GPS accuracy in metres (the priors' standard deviation)")
    min_match_score: float | None = option(None, help="drop raw matches scoring at or below this before import")
    num_threads: int | None = option(
        None, help="mapper threads (-1: all cores); default one for the incremental mapper, whose parallel search "
                   "for the initial pair makes the model depend on thread timing (recon.sfm.mapping."
                   "mapping_threads), all cores for the others")
    random_seed: int = option(0, help="RANSAC and mapper seed")
    verification_max_error: float | None = option(
        None, help="RANSAC threshold of geometric verification in original-image pixels (default: 2 px at the "
                   "detection resolution, COLMAP's 4 px when features.h5 does not record it)")
    verifier: Literal["colmap", "magsac", "poselib"] = option(
        "poselib", flags=("--verifier",),
        help="geometric verification: PoseLib's LO-RANSAC on F (default: same AUC as COLMAP's on the benchmark "
             "scenes, 4-5x faster), COLMAP's LO-RANSAC (E, F and H) or OpenCV's USAC MAGSAC++ (recon.sfm.verifiers)")
    verifier_model: Literal["fundamental", "essential"] = option(
        "fundamental", help="magsac / poselib: fit F on pixels, or E with the database's camera priors")
    verification_confidence: float = option(0.999, help="RANSAC confidence of every verifier")
    verification_max_iterations: int = option(10000, help="RANSAC iteration cap of every verifier")
    outlier_ratio: float = option(
        4.0, help="after mapping, drop observations whose reprojection error exceeds this multiple of the model's "
                  "median point error, then one bundle adjustment (0: off; recon.sfm.refinement)")
    refine_principal_point: Literal["auto", "always", "never"] = option(
        "auto", flags=("--refine-principal-point",),
        help="after mapping, free the principal point of shared cameras; 'auto' keeps it only where the BA "
             "covariance shows the views determine it, 'never' is COLMAP's behaviour")
    fresh_process: bool = option(
        True, help="run import, verification and mapping in a fresh Python process (faster after the matching "
                   "stages; a COLMAP crash becomes an error)")

    def check(self, num_images: int = 100) -> None:
        """Every option valid, pycolmap's included: called before any stage runs."""
        pipeline_options(self.mapper, self.mapper_options, num_images, self.num_threads, self.random_seed)
        verifier_settings(self).check()
        if not self.outlier_ratio >= 0:
            raise ConfigError(f"--sfm.outlier-ratio must be 0 (off) or a positive multiple, got {self.outlier_ratio}")
        if not self.pose_prior_std > 0:
            raise ConfigError(f"--sfm.pose-prior-std must be positive metres, got {self.pose_prior_std}")
        try:
            pycolmap.CameraModelId(pycolmap.CameraModelId.__members__[self.camera_model])
        except KeyError:
            models = ", ".join(name for name in pycolmap.CameraModelId.__members__ if name != "INVALID")
            raise ConfigError(f"unknown camera model '{self.camera_model}'; known: {models}") from None


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
    engine: str = ""  # the mapping engine whose model was kept
    engine_reason: str = ""  # why (auto: what each engine registered)
    engine_runs: dict[str, dict] = field(default_factory=dict)  # per engine run: registered, models, points, …
    refinement: dict | None = None  # the outlier filter's threshold and counts (largest model)
    georeference: dict | None = None  # with use_pose_priors: the ENU frame's WGS84 origin, scale, residual

    def to_dict(self) -> dict:
        return {**asdict(self), "sparse_dir": str(self.sparse_dir)}

    @classmethod
    def from_dict(cls, record: dict) -> SfMResult:
        return cls(**{**record, "sparse_dir": Path(record["sparse_dir"])})


@dataclass
class SfMInputs:
    """The stage's paths, as one record (also what the fresh process receives)."""

    out_dir: Path
    image_dir: Path
    pairs: Path
    features: Path
    matches: Path

    @property
    def work_dir(self) -> Path:
        return self.out_dir / "sfm"

    @property
    def sparse_root(self) -> Path:
        return self.out_dir / "sparse"

    def to_dict(self) -> dict[str, str]:
        return {key: str(value) for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, record: dict) -> SfMInputs:
        return cls(**{key: Path(value) for key, value in record.items()})


def _fingerprint(inputs: SfMInputs, options: SfMOptions) -> dict:
    paths = [inputs.pairs, inputs.features, inputs.matches]
    files = {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}
    settings = to_dict(options)
    del settings["fresh_process"]  # not part of the result
    return {"files": files, "options": settings, "image_dir": str(inputs.image_dir.resolve())}


def recorded_image_dir(out_dir: str | Path) -> Path:
    """The image folder the model in OUT/sparse was reconstructed from (recorded by this stage)."""
    stamp_path = Path(out_dir) / "sfm" / _STAMP
    stamp = read_record(stamp_path)
    if isinstance(stamp, dict):
        image_dir = stamp.get("image_dir")
        if image_dir and Path(image_dir).is_dir():
            return Path(image_dir)
    raise InputError(f"cannot tell where the images of '{out_dir}' are (no record in {stamp_path}); "
                     "pass --images PATH")


def reconstruct(
    out_dir: str | Path,
    image_dir: str | Path,
    pairs_path: str | Path,
    features_path: str | Path,
    matches_path: str | Path,
    options: SfMOptions | None = None,
) -> SfMResult:
    """Models to out_dir/sparse/N (largest first), work files to out_dir/sfm/; see the module docstring."""
    options = options or SfMOptions()
    inputs = SfMInputs(Path(out_dir), Path(image_dir), Path(pairs_path), Path(features_path), Path(matches_path))
    for path, role, stage in ((inputs.pairs, "pairs", "recon pairs"), (inputs.features, "features", "recon extract"),
                              (inputs.matches, "matches", "recon match")):
        if not path.is_file():
            raise InputError(f"{path}: no such file; the SfM stage needs its {role} (make them with `{stage}`, or "
                             f"give the file with --{role})")
    inputs.work_dir.mkdir(parents=True, exist_ok=True)
    stamp = _fingerprint(inputs, options)
    stamp_path = inputs.work_dir / _STAMP
    model_dir = inputs.sparse_root / "0"
    if model_dir.is_dir() and read_record(stamp_path) == stamp:
        finished = _finished(inputs, model_dir)
        if finished is not None:
            return finished
    # No stamp vouches for OUT/sparse until the new model is whole (reconstruct_here writes it last): a run killed
    # anywhere in between leaves a model the next run maps again, never one it takes for up to date.
    stamp_path.unlink(missing_ok=True)
    if options.fresh_process and sys.executable:  # an embedded interpreter has no executable to start
        from .process import reconstruct_in_fresh_process

        return reconstruct_in_fresh_process(inputs, options, stamp)
    return reconstruct_here(inputs, options, stamp)


def _finished(inputs: SfMInputs, model_dir: Path) -> SfMResult | None:
    """The stamped model as the stage's result, or None when it cannot be read (damaged: mapped again)."""
    try:
        model = pycolmap.Reconstruction(model_dir)
    except (ValueError, IndexError, RuntimeError, MemoryError) as error:  # what pycolmap raises on cut files
        logger.warning("The model in %s cannot be read (%s: %s); mapping again", model_dir, type(error).__name__,
                       error)
        return None
    logger.info("Reconstruction in %s is up to date with its inputs; not re-mapping", model_dir)
    num_images = len(_image_names(inputs.features, read_pairs(inputs.pairs)))
    engine = read_record(inputs.work_dir / _ENGINE) or {}
    return SfMResult(model_dir, num_images, num_models=len(list(inputs.sparse_root.iterdir())), timings={},
                     **model_stats(model), **engine)


def _image_names(features: Path, pairs: list[tuple[str, str]]) -> list[str]:
    """The images the stage maps: those of the pairs, in the features file's order. A features file kept from an
    earlier run in the same folder (the extract stage resumes into it) may hold other images, which would count as
    views left out (and make `--mapper auto` run the global mapper for them)."""
    stored = list_feature_names(features)
    check_names(pairs, stored, f"the pairs file (against the features in '{features}')")
    paired = {name for pair in pairs for name in pair}
    return [name for name in stored if name in paired]


def reconstruct_here(inputs: SfMInputs, options: SfMOptions, stamp: dict) -> SfMResult:
    with _colmap_log_to(inputs.work_dir / "colmap.log."):
        result = _reconstruct(inputs, options)
    write_record(inputs.work_dir / _STAMP, stamp)  # last: the model and engine.json are whole
    return result


#: The step of the stage running now, and a function told of each new one (the fresh process records it, so a
#: crash or a kill of that process is reported with the step it happened in).
_step = {"name": "start-up", "listener": None}


def _enter(step: str) -> None:
    _step["name"] = step
    if _step["listener"] is not None:
        _step["listener"](step)


def current_step() -> str:
    return _step["name"]


def on_step(listener) -> None:
    """Call `listener(step)` at each new step of the stage (the fresh process records them)."""
    _step["listener"] = listener


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


def _import_and_verify(inputs: SfMInputs, options: SfMOptions, database: Path, timings: dict) -> dict[str, int]:
    _enter("database import")
    start = time.perf_counter()
    pairs = read_pairs(inputs.pairs)
    names = _image_names(inputs.features, pairs)
    image_ids = import_features(database, inputs.image_dir, inputs.features, options.camera_mode,
                                options.camera_model, image_names=names, prior_std=options.pose_prior_std)
    check_matches_fit(inputs.features, inputs.matches, names)
    match_counts = import_matches(database, image_ids, pairs, inputs.matches, options.min_match_score)
    timings["import"] = time.perf_counter() - start
    logger.info("Imported %d pairs with %d raw matches", len(pairs), sum(match_counts.values()))

    _enter("geometric verification")
    start = time.perf_counter()
    settings = verifier_settings(options, inputs.features)
    logger.info("Verification: %s, threshold %.2f px", settings.verifier, settings.max_error)
    # Pairs with fewer raw matches than a model needs inliers can never verify; COLMAP skips them after reading
    # them back, we do not hand them over at all (on temple_ring_full most of the 1081 pairs are such).
    candidates = {pair: count for pair, count in match_counts.items() if count >= settings.min_num_inliers}
    num_verified = verify(database, candidates, inputs.work_dir, settings)
    timings["verify"] = time.perf_counter() - start
    logger.info("Geometric verification: %d of %d pairs verified (%d with too few matches to try)",
                num_verified, len(pairs), len(match_counts) - len(candidates))
    return {"images": len(image_ids), "verified": num_verified}


def verifier_settings(options: SfMOptions, features_path: str | Path | None = None) -> VerifierSettings:
    """The verifier and its RANSAC settings; the threshold defaults to recon's (`verification_error`)."""
    max_error = options.verification_max_error
    if max_error is None:
        max_error = verification_error(features_path) if features_path is not None else 1.0
    return VerifierSettings(options.verifier, options.verifier_model, max_error, options.verification_confidence,
                            options.verification_max_iterations, random_seed=options.random_seed)


def _reconstruct(inputs: SfMInputs, options: SfMOptions) -> SfMResult:
    timings: dict[str, float] = {}
    database = inputs.work_dir / "database.db"
    counts = _import_and_verify(inputs, options, database, timings)

    _enter(f"mapping ({options.mapper})")
    start = time.perf_counter()
    sections = pipeline_options(options.mapper, options.mapper_options, counts["images"], options.num_threads,
                                options.random_seed, options.use_pose_priors)
    choice = map_scene(options.mapper, sections, database, inputs.image_dir, inputs.work_dir / "models.partial",
                       counts["images"], options.view_graph_calibration)
    models = choice.models
    timings["map"] = time.perf_counter() - start
    if not models:
        raise ReconError(
            f"mapping failed: no model could be initialised from {counts['verified']} verified pairs "
            f"(see {inputs.work_dir}/colmap.log.*). Try more pairs, more keypoints or another matcher."
        )
    engine_extra = {}
    if options.outlier_ratio:
        _enter("outlier filter and bundle adjustment")
        start = time.perf_counter()
        adjustment = final_adjustment(choice.engine, sections)
        refined = [refine_model(model, options.outlier_ratio, adjustment) for model in models]
        models = [model for model, _ in refined]
        if refined[0][1] is not None:
            engine_extra["refinement"] = refined[0][1].to_dict()
        timings["refine"] = time.perf_counter() - start
    if options.refine_principal_point != "never":
        _enter("principal-point refinement")
        start = time.perf_counter()
        models = [refine_principal_points(model, force=options.refine_principal_point == "always")[0]
                  for model in models]
        timings["calibrate"] = time.perf_counter() - start
    if options.use_pose_priors:  # every model into the GPS frame; the largest one's alignment is recorded
        _enter("alignment to the GPS priors")
        alignments = [align_to_priors(model, database, options.pose_prior_std) for model in models]
        engine_extra["georeference"] = alignments[0]
    _enter("writing the model")
    names = list_feature_names(inputs.features)
    if any([restore_names(model, names) for model in models]):  # and colours, which COLMAP could not read
        for model in models:
            model.extract_colors_for_all_images(str(inputs.image_dir))
    model_dir = write_models(models, inputs.sparse_root)
    if len(models) > 1:
        largest = {models[0].image(i).name for i in models[0].reg_image_ids()}
        outside = {model.image(i).name for model in models[1:] for i in model.reg_image_ids()} - largest
        if outside:
            logger.warning("The scene split into %d models; the largest (%d images) is sparse/0, %d images are only "
                           "in the others", len(models), models[0].num_reg_images(), len(outside))
        else:  # e.g. a second start from views the first model already holds: nothing is missing from sparse/0
            logger.info("%d smaller models re-use views of sparse/0 (%d images) and hold no other view",
                        len(models) - 1, models[0].num_reg_images())
    engine = {"engine": choice.engine, "engine_reason": choice.reason, "engine_runs": choice.runs, **engine_extra}
    write_record(inputs.work_dir / _ENGINE, engine, indent=2)
    return SfMResult(model_dir, counts["images"], num_models=len(models), timings=timings,
                     **model_stats(models[0]), **engine)
