"""`recon run`: pairs → features → matches → SfM → exports, chaining the stage functions only.

Output layout (OUT/):
    pairs.txt, global-feats.h5 (retrieval only), features.h5, matches.h5,
    sfm/database.db, sfm/colmap.log, sparse/0 (+ text), points3D.ply,
    undistorted/{images, sparse/0, transforms.json, sparse_pc.ply}, run.json (config, timings, summary)
Every stage resumes from what its output file already holds, so re-running a killed run finishes it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from feature_backends.images import list_images
from pairs.planner import PairOptions, plan, write_plan

from .export import EXPORT_FORMATS, export
from .sfm import SfMOptions, SfMResult, reconstruct
from .stages import extract, match

logger = logging.getLogger(__name__)

PairsMethod = Literal["auto", "exhaustive", "sequential", "retrieval", "spatial"]


@dataclass
class RunConfig:
    features: str = "sift"
    feature_conf: dict[str, Any] = field(default_factory=dict)
    matcher: str = "mnn"
    matcher_conf: dict[str, Any] = field(default_factory=dict)
    pairs: PairsMethod = "auto"
    #: "auto" matches exhaustively up to this many images and uses retrieval above.
    exhaustive_max_images: int = 50
    num_matched: int = 20
    overlap: int = 10
    quadratic_overlap: bool = True  # sequential: also frames i+2^k (COLMAP's default)
    loop_closure: bool = False  # sequential: add retrieval neighbours every `loop_every` frames
    loop_every: int = 10
    retrieval: str = "vlad"
    retrieval_conf: dict[str, Any] = field(default_factory=dict)
    query_list: list[str] | None = None  # retrieval: only these images query (default: all)
    database_list: list[str] | None = None  # retrieval: only these images are retrieved (default: all)
    min_similarity: float | None = None
    max_pairs_per_image: int | None = None
    gps_prior: bool = False  # retrieval / loop closure: only among EXIF-GPS neighbours
    spatial_max_neighbors: int = 50
    spatial_max_distance: float = 100.0  # metres
    sfm: SfMOptions = field(default_factory=SfMOptions)
    exports: tuple[str, ...] = EXPORT_FORMATS
    device: str | None = None
    image_list: list[str] | None = None


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


def plan_pairs(image_dir: Path, out_dir: Path, names: list[str], config: RunConfig,
               pairs_path: Path | None = None) -> tuple[Path, str, int]:
    """Write OUT/pairs.txt (and pairs-stats.json) with the configured (or automatically chosen) method."""
    method = config.pairs
    if method == "auto":
        method = "exhaustive" if len(names) <= config.exhaustive_max_images else "retrieval"
        logger.info("Pairs: %s for %d images (exhaustive up to %d)", method, len(names), config.exhaustive_max_images)
    options = PairOptions(
        method=method, num_matched=config.num_matched, query_list=config.query_list,
        database_list=config.database_list, min_similarity=config.min_similarity,
        max_pairs_per_image=config.max_pairs_per_image, overlap=config.overlap,
        quadratic_overlap=config.quadratic_overlap, loop_closure=config.loop_closure, loop_every=config.loop_every,
        gps_prior=config.gps_prior, spatial_max_neighbors=config.spatial_max_neighbors,
        spatial_max_distance=config.spatial_max_distance,
    )
    pairs_plan = plan(image_dir, names, options, out_dir / "global-feats.h5", config.retrieval,
                      config.retrieval_conf, config.device)
    path = write_plan(pairs_plan, pairs_path or out_dir / "pairs.txt")
    return path, method, len(pairs_plan.pairs)


def run(image_dir: str | Path, out_dir: str | Path, config: RunConfig | None = None) -> RunResult:
    config = config or RunConfig()
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    names = list_images(image_dir, config.image_list)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    from .dense import is_dense_matcher  # "roma", or anchored "sift+roma"

    dense = is_dense_matcher(config.matcher)

    start = time.perf_counter()
    pairs_path, method, num_pairs = plan_pairs(image_dir, out_dir, names, config)
    timings["pairs"] = time.perf_counter() - start

    features_path, matches_path = out_dir / "features.h5", out_dir / "matches.h5"
    if dense:
        from .dense import match_dense  # the dense matchers' stage: keypoints come from the matches

        start = time.perf_counter()
        match_dense({"name": config.matcher, **config.matcher_conf}, pairs_path, image_dir, features_path,
                    matches_path, features=config.features, feature_conf=config.feature_conf, device=config.device)
        timings["match"] = time.perf_counter() - start
    else:
        start = time.perf_counter()
        extract({"name": config.features, **config.feature_conf}, image_dir, features_path, names, config.device)
        timings["extract"] = time.perf_counter() - start
        start = time.perf_counter()
        match({"name": config.matcher, **config.matcher_conf}, pairs_path, features_path, matches_path,
              config.device)
        timings["match"] = time.perf_counter() - start

    start = time.perf_counter()
    sfm = reconstruct(out_dir / "sfm", image_dir, pairs_path, features_path, matches_path, config.sfm)
    timings["sfm"] = time.perf_counter() - start
    # The model users look for is OUT/sparse/0, as COLMAP and nerfstudio lay it out.
    sparse = out_dir / "sparse"
    shutil.rmtree(sparse, ignore_errors=True)
    shutil.copytree(sfm.sparse_dir.parent, sparse)
    sfm.sparse_dir = sparse / "0"

    start = time.perf_counter()
    written = export(out_dir, config.exports, image_dir)
    timings["export"] = time.perf_counter() - start

    result = RunResult(out_dir, len(names), method, num_pairs, sfm, timings,
                       {fmt: str(path) for fmt, path in written.items()})
    record = {"image_dir": str(image_dir.resolve()), "config": asdict(config),
              "result": {**asdict(sfm), "sparse_dir": str(sfm.sparse_dir)}, "timings": timings,
              "pairs_method": method, "num_pairs": num_pairs}
    (out_dir / "run.json").write_text(json.dumps(record, indent=2, default=str))
    return result
