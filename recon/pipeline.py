"""`recon run`: pairs → features → matches → SfM → exports (→ splats), chaining the stage functions only.

`RunConfig` is the composition of the stages' options (one dataclass per stage, each owning its defaults); the
command line is generated from it (recon.options). Before any stage runs, `RunConfig.check` validates every
option (pycolmap's mapper options included) and finds every weight file of every backend the run will use, so a
wrong option or a missing file ends the run at once instead of after an hour of extraction.

Video input (`run(VIDEO, OUT)`, several videos, or a folder mixing videos and photos): the frames stage
(recon.frames) writes OUT/frames/ and OUT/frames.json first and the run continues on OUT/frames; each video is
a sequence (pairs: sequential + loop closure + retrieval between sequences, when --pairs is "auto") and a camera
(camera mode "per-folder" when left at "single").

Output layout (OUT/):
    frames/, frames.json (video input only),
    pairs.txt, pairs-stats.json, global-feats.h5 (retrieval only), features.h5, matches.h5,
    sfm/{database.db, colmap.log.*, sfm_inputs.json, engine.json, error.txt (a failed SfM process's traceback)},
    sparse/0 (+ text), points3D.ply, exports.json,
    undistorted/{images, sparse/0, transforms.json, sparse_pc.ply}, run.json (config, timings, summary),
    report.html (recon.report: why each view registered or not; `--no-report` skips it)
With `--progress-json FILE` the run writes JSON-lines events (stage start/end, item counts, warnings) to FILE
(recon.progress).
Every stage resumes from what its output already holds, so re-running a killed run finishes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from feature_backends import registry
from feature_backends.errors import ConfigError, InputError, OutputError, ReconError
from feature_backends.images import describe_skipped, list_images, screen_images
from feature_backends.store import keypoint_counts
from pairs.io import read_name_list
from pairs.planner import PairOptions

from .dense import DenseOptions, is_dense_matcher, match_dense, parse_matcher_name, require_warp
from .executor import ExecutorOptions
from .export import ExportOptions, export
from .extract import ExtractOptions, extract
from .lock import OutputLock
from .frames import FRAMES_RECORD, FrameOptions, frame_names, has_video, sequence_folders, write_frames
from .match import MatchOptions, match
from .options import option, to_dict
from .pairs import plan_pairs
from .progress import ProgressSink
from .records import write_record
from .report import ReportOptions, write_report
from .sfm import SfMOptions, SfMResult, reconstruct
from .splat import SplatConfig

logger = logging.getLogger(__name__)


@dataclass
class RunConfig:
    frames: FrameOptions = field(default_factory=FrameOptions)
    pairs: PairOptions = field(default_factory=PairOptions)
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    match: MatchOptions = field(default_factory=MatchOptions)
    dense: DenseOptions = field(default_factory=DenseOptions)
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)
    sfm: SfMOptions = field(default_factory=SfMOptions)
    export: ExportOptions = field(default_factory=ExportOptions)
    train_splats: bool = option(False, flags=("--splat",), help="train Gaussian splats after SfM (recon splat)")
    splat: SplatConfig = field(default_factory=SplatConfig)
    write_report: bool = option(True, flags=("--report",), help="write OUT/report.html at the end (recon report)")
    report: ReportOptions = field(default_factory=ReportOptions)
    progress_json: Path | None = option(None, flags=("--progress-json",), metavar="FILE",
                                        help="write JSON-lines progress events to FILE (recon.progress)")
    device: str | None = option(None, flags=("--device",), help="cpu, cuda, cuda:1 … (default: CUDA when present)")
    image_list: list[str] | None = option(None, flags=("--image-list",), metavar="FILE",
                                          argparse={"type": read_name_list},
                                          help="file of image names to use (default: every image in the folder)")
    wait: bool = option(False, flags=("--wait",),
                        help="wait for another recon run on the same output folder to finish instead of refusing")

    def for_video(self, sequences: list[str]) -> RunConfig:
        """The defaults that fit video frames: each video a sequence (sequential pairs with loop closure and
        retrieval between sequences) and its own camera. Explicit choices (a pairs method, a camera mode other
        than the default) are kept."""
        config = self
        if self.pairs.method == "auto":
            pairs = replace(self.pairs, method="sequential", loop_closure=True, sequence_folders=tuple(sequences))
            config = replace(config, pairs=pairs)
            logger.info("Video input: sequential pairs with loop closure for %d sequence(s)", len(sequences))
        if self.sfm.camera_mode == "single":
            config = replace(config, sfm=replace(self.sfm, camera_mode="per-folder"))
            logger.info("Video input: one camera per video (camera mode per-folder)")
        return config

    @property
    def dense_mode(self) -> bool:
        return is_dense_matcher(self.match.matcher)

    def extract_options(self) -> ExtractOptions:
        """The extraction the run needs: the configured one, or for anchored dense matching ("sift+roma") the
        anchor detector's (refusing a feature configuration given for another detector)."""
        anchor, _ = parse_matcher_name(self.match.matcher) if self.dense_mode else (None, None)
        if anchor is None or anchor == self.extract.features:
            return self.extract
        if replace(self.extract, mask_dir=None) != replace(ExtractOptions(), features=self.extract.features):
            raise ConfigError(
                f"the feature configuration given is for '{self.extract.features}', but '{self.match.matcher}' "
                f"anchors on '{anchor}'; pass --features {anchor} with it, or drop it")
        return replace(ExtractOptions(), features=anchor, mask_dir=self.extract.mask_dir)

    def check(self, num_images: int) -> list[str]:
        """Every option valid and every weight file found, before any stage runs; returns the weight files."""
        self.frames.check()
        self.executor.check()
        self.sfm.check(num_images)
        self.export.check()
        if self.train_splats:
            self.splat.check()
            if "3dgs" not in self.export.formats:
                raise ConfigError("--splat trains on the undistorted export: keep '3dgs' in --export")
        files = []
        if self.pairs.resolved_method(num_images) == "retrieval" or self.pairs.loop_closure:
            files += registry.preflight("global", self.pairs.retrieval, self.pairs.retrieval_conf)
        name, conf = registry.split_conf(self.match.backend_conf())
        anchor, dense = parse_matcher_name(name) if self.dense_mode else (None, None)
        if not self.dense_mode or anchor is not None:
            features, feature_conf = registry.split_conf(self.extract_options().backend_conf())
            files += registry.preflight("features", features, feature_conf)
        if self.dense_mode:
            if anchor is not None:
                require_warp(dense)
            stage_keys = set(DenseOptions.QUANTISED + DenseOptions.ANCHORED)
            files += registry.preflight("dense", dense, {k: v for k, v in conf.items() if k not in stage_keys})
        else:
            matcher_class, _ = registry.resolve("matcher", name)
            implied = matcher_class.conf_for_features({"backend": features, "conf": feature_conf})
            files += registry.preflight("matcher", name, {**implied, **conf})
        return files


@dataclass
class RunResult:
    out_dir: Path
    num_images: int
    pairs_method: str
    num_pairs: int
    sfm: SfMResult
    timings: dict[str, float]
    exports: dict[str, str]
    skipped: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        sfm = self.sfm
        lines = [
            f"recon run → {self.out_dir}",
            f"  images       {sfm.num_registered} / {self.num_images} registered"
            + (f" ({sfm.num_models} models)" if sfm.num_models > 1 else ""),
            f"  pairs        {self.num_pairs} ({self.pairs_method})",
            f"  mapper       {sfm.engine}" + (f" ({sfm.engine_reason})" if sfm.engine_reason else ""),
            f"  points       {sfm.num_points}",
            f"  track length {sfm.mean_track_length:.2f} (mean)",
            f"  reproj error {sfm.mean_reprojection_error:.3f} px (mean)",
            "  time         " + ", ".join(self._stage_time(k, v) for k, v in self.timings.items())
            + f" | total {sum(self.timings.values()):.1f}s",
            f"  model        {sfm.sparse_dir}",
        ]
        lines += [f"  {fmt:<12} {path}" for fmt, path in self.exports.items()]
        if self.skipped:
            lines.append(f"  skipped      {len(self.skipped)}: {describe_skipped(self.skipped)}")
        return "\n".join(lines)

    def _stage_time(self, stage: str, seconds: float) -> str:
        if stage == "sfm" and self.sfm.timings:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in self.sfm.timings.items())
            return f"sfm {seconds:.1f}s ({parts})"
        return f"{stage} {seconds:.1f}s"


class _Timer(dict):
    """Times each stage and tells the progress sink when it starts and ends."""

    def __init__(self, sink: ProgressSink | None = None):
        super().__init__()
        self.sink = sink or ProgressSink(None)

    def __call__(self, stage: str, function, *args, **kwargs):
        self.sink.emit("stage_start", stage=stage)
        start = time.perf_counter()
        result = function(*args, **kwargs)
        seconds = time.perf_counter() - start
        self[stage] = self.get(stage, 0.0) + seconds
        self.sink.emit("stage_end", stage=stage, seconds=round(seconds, 3))
        return result


def _inputs(inputs: str | Path | list[str | Path], out_dir: Path, config: RunConfig, timed: _Timer,
            claim_output) -> tuple[Path, list[str], RunConfig, dict | None]:
    """(image folder, image names, config, frames record): video input goes through the frames stage first.
    `claim_output()` creates and locks OUT once the options are checked (nothing is created for a bad option)."""
    given = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not has_video(given):
        if len(given) != 1:
            raise InputError("several inputs are taken for videos only; put the photos in one folder")
        image_dir = Path(given[0])
        names = list_images(image_dir, config.image_list)
        config.check(len(names))
        claim_output()
        return image_dir, names, config, None
    config.for_video(["video"]).check(100)  # options and weights checked before decoding
    claim_output()
    image_dir = timed("frames", write_frames, given, out_dir, config.frames)
    names = frame_names(out_dir)
    if config.image_list is not None:
        names = list_images(image_dir, config.image_list)
    config = config.for_video(sequence_folders(out_dir))
    config.check(len(names))
    return image_dir, names, config, json.loads((out_dir / FRAMES_RECORD).read_text())


def run(inputs: str | Path | list[str | Path], out_dir: str | Path, config: RunConfig | None = None) -> RunResult:
    """`inputs`: an image folder, or videos / a folder with videos (see the module docstring). One run at a time
    per output folder (recon.lock)."""
    config = config or RunConfig()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output path '{out_dir}' is an existing file; give a folder")
    with contextlib.ExitStack() as stack:
        def claim_output() -> None:
            output_folder(out_dir)
            stack.enter_context(OutputLock(out_dir, wait=config.wait))

        sink = stack.enter_context(ProgressSink(config.progress_json))
        start = time.perf_counter()
        result = _run_locked(inputs, out_dir, config, claim_output, _Timer(sink))
        sink.emit("run_end", seconds=round(time.perf_counter() - start, 3), num_images=result.num_images,
                  registered=result.sfm.num_registered, models=result.sfm.num_models)
        return result


def output_folder(out_dir: str | Path) -> Path:
    """`out_dir`, created; an existing file or a folder recon cannot write is refused in one line."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output path '{out_dir}' is an existing file; give a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".recon-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OutputError(f"cannot write to output folder '{out_dir}' ({error.strerror}); choose a writable "
                         "folder") from error
    return out_dir


def usable_for_matching(features_path: Path, names: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The images with keypoints in `features_path`, and those without ("no features": blank, 1x1, lens cap)."""
    counts = keypoint_counts(features_path, names)
    usable = [name for name in names if counts.get(name, 0) > 0]
    none = [{"file": name, "reason": "no features"} for name in names if name in counts and counts[name] == 0]
    if none:
        logger.warning("Skipping %d image(s) for matching: %s", len(none), describe_skipped(none))
    return usable, none


def _need_two_views(names: list[str], skipped: list[dict[str, str]]) -> None:
    if len(names) >= 2:
        return
    detail = f"; skipped: {describe_skipped(skipped, 3)}" if skipped else ""
    raise InputError(f"SfM needs at least two views, and {len(names)} usable image(s) remain{detail}; add "
                     "overlapping photos of the scene")


def _run_locked(inputs, out_dir: Path, config: RunConfig, claim_output, timed: _Timer) -> RunResult:
    sink = timed.sink
    image_dir, names, config, frames_record = _inputs(inputs, out_dir, config, timed, claim_output)
    sink.emit("run_start", out_dir=str(out_dir), image_dir=str(image_dir), num_images=len(names))
    names, skipped = screen_images(image_dir, names, decode=config.dense_mode and
                                   parse_matcher_name(config.match.matcher)[0] is None)
    _need_two_views(names, skipped)
    features_path, matches_path = out_dir / "features.h5", out_dir / "matches.h5"
    pairs_path = out_dir / "pairs.txt"
    anchor, _ = parse_matcher_name(config.match.matcher) if config.dense_mode else (None, None)
    if not config.dense_mode or anchor is not None:
        undecodable: list[dict[str, str]] = []
        timed("extract", extract, config.extract_options(), image_dir, features_path, names, config.device,
              executor=config.executor, skipped=undecodable)
        names, featureless = usable_for_matching(features_path, names)
        skipped += undecodable + featureless
        _need_two_views(names, skipped)
        sink.emit("items", stage="extract", done=len(names), total=len(names) + len(skipped), skipped=len(skipped))
    pairs_plan = timed("pairs", plan_pairs, image_dir, pairs_path, config.pairs, names, config.device,
                       executor=config.executor)
    sink.emit("items", stage="pairs", done=len(pairs_plan.pairs), total=len(pairs_plan.pairs))
    if config.dense_mode:
        timed("match", match_dense, config.match.backend_conf(), pairs_path, image_dir, features_path,
              matches_path, config.dense, config.device, mask_dir=config.extract.mask_dir, executor=config.executor)
    else:
        timed("match", match, config.match, pairs_path, features_path, matches_path, config.device,
              executor=config.executor)
    sink.emit("items", stage="match", done=len(pairs_plan.pairs), total=len(pairs_plan.pairs))
    try:
        sfm = timed("sfm", reconstruct, out_dir, image_dir, pairs_path, features_path, matches_path, config.sfm)
    except ReconError:  # no model at all: the report is what tells the user why, view by view
        if config.write_report:
            _write_report(timed, out_dir, config, image_dir)
        raise
    sink.emit("items", stage="sfm", done=sfm.num_registered, total=len(names) + len(skipped), models=sfm.num_models)
    export_options = config.export
    if export_options.mask_dir is None and config.extract.mask_dir is not None:
        export_options = replace(export_options, mask_dir=config.extract.mask_dir)
    written = timed("export", export, out_dir, export_options, image_dir)
    if config.train_splats:
        from .splat import splat

        splat_config = replace(config.splat, device=config.splat.device or config.device)
        written["splats"] = timed("splat", splat, out_dir, splat_config)

    result = RunResult(out_dir, len(names) + len(skipped), pairs_plan.method, len(pairs_plan.pairs), sfm,
                       dict(timed), {fmt: str(path) for fmt, path in written.items()}, skipped)
    record = {"image_dir": str(image_dir.resolve()), "config": to_dict(config), "result": sfm.to_dict(),
              "timings": dict(timed), "pairs_method": pairs_plan.method, "num_pairs": len(pairs_plan.pairs),
              "skipped": skipped}
    if frames_record is not None:
        record["frames"] = frames_record
    write_record(out_dir / "run.json", record, indent=2, default=str)
    if config.write_report:  # last, so it reads the finished run.json; its own time is recorded in the page
        report = _write_report(timed, out_dir, config, image_dir)
        if report is not None:
            result.exports["report"] = str(report)
    return result


def _write_report(timed: _Timer, out_dir: Path, config: RunConfig, image_dir: Path) -> Path | None:
    """The report, or a warning when it cannot be written: a finished reconstruction is never lost to it."""
    try:
        return timed("report", write_report, out_dir, config.report, image_dir)
    except Exception as error:  # noqa: BLE001 (tests call write_report directly, where errors do raise)
        logger.warning("report.html not written (%s: %s); `recon report %s` retries", type(error).__name__, error,
                       out_dir)
        return None
