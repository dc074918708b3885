"""`recon run`: pairs → features → matches → SfM → exports (→ splats), chaining the stage functions only.

`RunConfig` is the composition of the stages' options (one dataclass per stage, each owning its defaults); the
command line is generated from it (recon.options). Before any stage runs, `RunConfig.check` validates every
option (pycolmap's mapper options included) and finds every weight file of every backend the run will use, so a
wrong option or a missing file ends the run at once instead of after an hour of extraction.

Output layout (OUT/):
    pairs.txt, pairs-stats.json, global-feats.h5 (retrieval only), features.h5, matches.h5,
    sfm/{database.db, colmap.log.*, sfm_inputs.json}, sparse/0 (+ text), points3D.ply, exports.json,
    undistorted/{images, sparse/0, transforms.json, sparse_pc.ply}, run.json (config, timings, summary)
Every stage resumes from what its output already holds, so re-running a killed run finishes it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from feature_backends import registry
from feature_backends.errors import ConfigError
from feature_backends.images import list_images
from pairs.io import read_name_list
from pairs.planner import PairOptions

from .dense import DenseOptions, is_dense_matcher, match_dense, parse_matcher_name
from .export import ExportOptions, export
from .extract import ExtractOptions, extract
from .match import MatchOptions, match
from .options import option, to_dict
from .pairs import plan_pairs
from .sfm import SfMOptions, SfMResult, reconstruct
from .splat import SplatConfig

logger = logging.getLogger(__name__)


@dataclass
class RunConfig:
    pairs: PairOptions = field(default_factory=PairOptions)
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    match: MatchOptions = field(default_factory=MatchOptions)
    dense: DenseOptions = field(default_factory=DenseOptions)
    sfm: SfMOptions = field(default_factory=SfMOptions)
    export: ExportOptions = field(default_factory=ExportOptions)
    train_splats: bool = option(False, flags=("--splat",), help="train Gaussian splats after SfM (recon splat)")
    splat: SplatConfig = field(default_factory=SplatConfig)
    device: str | None = option(None, flags=("--device",), help="cpu, cuda, cuda:1 … (default: CUDA when present)")
    image_list: list[str] | None = option(None, flags=("--image-list",), metavar="FILE",
                                          argparse={"type": read_name_list},
                                          help="file of image names to use (default: every image in the folder)")

    @property
    def dense_mode(self) -> bool:
        return is_dense_matcher(self.match.matcher)

    def extract_options(self) -> ExtractOptions:
        """The extraction the run needs: the configured one, or for anchored dense matching ("sift+roma") the
        anchor detector's (refusing a feature configuration given for another detector)."""
        anchor, _ = parse_matcher_name(self.match.matcher) if self.dense_mode else (None, None)
        if anchor is None or anchor == self.extract.features:
            return self.extract
        if self.extract != replace(ExtractOptions(), features=self.extract.features):
            raise ConfigError(
                f"the feature configuration given is for '{self.extract.features}', but '{self.match.matcher}' "
                f"anchors on '{anchor}'; pass --features {anchor} with it, or drop it")
        return replace(ExtractOptions(), features=anchor)

    def check(self, num_images: int) -> list[str]:
        """Every option valid and every weight file found, before any stage runs; returns the weight files."""
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
        return "\n".join(lines)

    def _stage_time(self, stage: str, seconds: float) -> str:
        if stage == "sfm" and self.sfm.timings:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in self.sfm.timings.items())
            return f"sfm {seconds:.1f}s ({parts})"
        return f"{stage} {seconds:.1f}s"


class _Timer(dict):
    def __call__(self, stage: str, function, *args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        self[stage] = self.get(stage, 0.0) + time.perf_counter() - start
        return result


def run(image_dir: str | Path, out_dir: str | Path, config: RunConfig | None = None) -> RunResult:
    config = config or RunConfig()
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    names = list_images(image_dir, config.image_list)
    config.check(len(names))
    out_dir.mkdir(parents=True, exist_ok=True)
    timed = _Timer()
    features_path, matches_path = out_dir / "features.h5", out_dir / "matches.h5"

    pairs_plan = timed("pairs", plan_pairs, image_dir, out_dir / "pairs.txt", config.pairs, names, config.device)
    pairs_path = out_dir / "pairs.txt"
    anchor, _ = parse_matcher_name(config.match.matcher) if config.dense_mode else (None, None)
    if not config.dense_mode or anchor is not None:
        timed("extract", extract, config.extract_options(), image_dir, features_path, names, config.device)
    if config.dense_mode:
        timed("match", match_dense, config.match.backend_conf(), pairs_path, image_dir, features_path,
              matches_path, config.dense, config.device)
    else:
        timed("match", match, config.match, pairs_path, features_path, matches_path, config.device)
    sfm = timed("sfm", reconstruct, out_dir, image_dir, pairs_path, features_path, matches_path, config.sfm)
    written = timed("export", export, out_dir, config.export, image_dir)
    if config.train_splats:
        from .splat import splat

        splat_config = replace(config.splat, device=config.splat.device or config.device)
        written["splats"] = timed("splat", splat, out_dir, splat_config)

    result = RunResult(out_dir, len(names), pairs_plan.method, len(pairs_plan.pairs), sfm, dict(timed),
                       {fmt: str(path) for fmt, path in written.items()})
    record = {"image_dir": str(image_dir.resolve()), "config": to_dict(config), "result": sfm.to_dict(),
              "timings": dict(timed), "pairs_method": pairs_plan.method, "num_pairs": len(pairs_plan.pairs)}
    (out_dir / "run.json").write_text(json.dumps(record, indent=2, default=str))
    return result
