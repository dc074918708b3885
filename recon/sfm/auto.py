"""`--mapper auto` (the default): the incremental mapper, and the global one only when it leaves views out.

The rule:
1. Map with the incremental mapper, or above the hierarchical mapper's cluster size (`leaf_max_num_images`, 500)
   with the hierarchical one, which maps clusters in parallel and merges them instead of growing one model at N²
   cost (below that size it is the incremental mapper).
2. If its largest model holds every view, keep it: one mapping run, the common case.
3. Otherwise run the global mapper (view-graph calibration first when focal lengths are guesses) and keep the
   model that registers the most views (largest model of each engine); on a tie the lower mean reprojection
   error, unless that model holds under `MIN_POINT_RATIO` of the other's 3D points (a global solution that lost
   most of its tracks fits the few left very well).
Every engine's model then goes through the same outlier filter and bundle adjustment (recon.sfm.refinement) and
the principal-point step.

Why, measured on recon's default matches (the same features.h5 / matches.h5 for every engine, each model refined
as above; AUC@1 in percent, registered views, mapping seconds on the shared 2-core VM, ±20 %), 2026-11-30:

| scene                   | incremental      | global (+ view-graph calib. when guessed) | hierarchical | auto          |
|-------------------------|------------------|-------------------------------------------|--------------|---------------|
| temple_ring (19)        | 37.9, 19, 4.3 s  | **38.4**, 19, 8.4 s                       | 38.0, 19     | 37.9 (incr.)  |
| temple_ring_full (47)   | **77.8**, 47, 17 s | 15.4, 47 (a wrong model), 29 s          | 77.3, 47     | 77.8 (incr.)  |
| fountain_p11 (11)       | 94.2, 11, 9.6 s  | **94.3**, 11, 8.6-11 s                    | 94.2, 11     | 94.2 (incr.)  |
| demo scene (12, README) | 91.9, 12         | **92.6**, 12                              | 91.9, 12     | 91.9 (incr.)  |
| ring, 2 weak links (24) | 12 of 24 (2 models) | **24**, AUC@1 > 90                     | -            | global, 24    |

Without the refinement step the global mapper led temple_ring by 5 points (39.2 against 34.0) and an earlier
rule ran both engines on every scene to catch it; with it the engines agree within 0.7 points wherever both
register everything, so the second run is kept for what only it fixes: views left out (the weakly linked ring,
tests/test_sfm_engines.py). Global first would be wrong: it returns complete but wrong models (temple_ring_full
above; the guessed-focal ring of the tests splits) and is the slower engine below a few hundred views.

Split models that share views are merged after every engine (recon.sfm.merging), so rule 2 sees the merged model.
pycolmap's alignment (`align_reconstructions_via_*`) needs views common to both models, which split models need
not share (the two halves of the weakly linked ring share none): there the other engine's whole model is the
remedy.

The choice and the reason are logged and returned, and reach run.json through SfMResult.engine /
engine_reason / engine_runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pycolmap

from .mapping import run_engine
from .merging import merge_overlapping

logger = logging.getLogger(__name__)

MIN_POINT_RATIO = 0.8


def first_engine(sections: dict[str, Any], num_images: int) -> str:
    """incremental up to the hierarchical mapper's cluster size (where it would make one cluster, i.e. be the
    incremental mapper), hierarchical above."""
    leaf = sections["hierarchical"].clustering_options.leaf_max_num_images
    return "incremental" if num_images <= leaf else "hierarchical"


@dataclass
class EngineChoice:
    engine: str
    reason: str
    models: list[pycolmap.Reconstruction]
    runs: dict[str, dict]  # engine -> registered, models, points, reprojection error, seconds


def _summary(models: list[pycolmap.Reconstruction], seconds: float) -> dict:
    best = models[0] if models else None
    return {
        "registered": best.num_reg_images() if best else 0,
        "models": len(models),
        "points": best.num_points3D() if best else 0,
        "reprojection_error": (round(best.compute_mean_reprojection_error(), 4)
                               if best and best.num_points3D() else None),
        "seconds": round(seconds, 2),
    }


def _triangulation(sections: dict[str, Any], engine: str) -> pycolmap.IncrementalTriangulatorOptions | None:
    """The triangulation options of the incremental mapper `engine` ran (with the user's overrides), else None."""
    if engine == "hierarchical":
        return sections["hierarchical"].incremental_options.triangulation
    return sections["incremental"].triangulation if "incremental" in sections else None


def choose(runs: dict[str, dict]) -> tuple[str, str]:
    """The engine whose model to keep, and why (rules 2-3 of the module docstring)."""
    most = max(run["registered"] for run in runs.values())
    tied = [engine for engine, run in runs.items() if run["registered"] == most]
    counts = ", ".join(f"{engine} {run['registered']}" for engine, run in runs.items())
    if len(tied) == 1:
        return tied[0], f"registered views: {counts}; kept {tied[0]} (more views)"
    by_error = sorted(tied, key=lambda engine: runs[engine]["reprojection_error"] or float("inf"))
    best, other = by_error[0], by_error[1]
    if runs[best]["points"] < MIN_POINT_RATIO * runs[other]["points"]:
        return other, (f"registered views: {counts}; kept {other}: {best} has the lower reprojection error but "
                       f"only {runs[best]['points']} points against {runs[other]['points']}")
    errors = ", ".join(f"{engine} {runs[engine]['reprojection_error']} px" for engine in tied)
    return best, f"registered views: {counts}; kept {best} (lower reprojection error: {errors})"


def map_scene(mapper: str, sections: dict[str, Any], database: Path, image_dir: Path, staging: Path,
              num_images: int, calibrate: str = "auto") -> EngineChoice:
    """Run `mapper` (an engine, or 'auto' as described in the module docstring)."""
    first = first_engine(sections, num_images) if mapper == "auto" else mapper
    results: dict[str, list[pycolmap.Reconstruction]] = {}
    runs: dict[str, dict] = {}
    for engine in (first, "global") if mapper == "auto" else (first,):
        if runs and runs[first]["registered"] == num_images:
            break
        start = time.perf_counter()
        models, merges = merge_overlapping(
            run_engine(engine, sections, database, image_dir, staging, num_images, calibrate), database,
            _triangulation(sections, engine))
        results[engine] = models
        runs[engine] = _summary(models, time.perf_counter() - start)
        if merges:
            runs[engine]["merged"] = [merge.to_dict() for merge in merges]
        logger.info("%s mapper: %d of %d views registered in its largest model (%d models, %.1f s)", engine,
                    runs[engine]["registered"], num_images, runs[engine]["models"], runs[engine]["seconds"])
    if mapper != "auto":
        return EngineChoice(mapper, "chosen with --mapper", results[mapper], runs)
    if len(runs) == 1:
        best, reason = first, f"{first} registered all {num_images} views in one model; global mapper not needed"
    else:
        best, reason = choose(runs)
    logger.info("auto mapper: %s (%s)", best, reason)
    return EngineChoice(best, reason, results[best], runs)
