"""`--mapper auto`: the global and the incremental mapper on the same database, the better model kept.

The rule:
1. Run the global mapper (with view-graph calibration when focal lengths are guesses), then the incremental one.
   Above `CHECK_MAX_IMAGES` images the incremental run is skipped when the global model registers every view
   (incremental mapping grows with N², the reason the global mapper exists).
2. Keep the model that registers the most views (largest model of each engine).
3. On a tie, keep the lower mean reprojection error, unless that model holds under `MIN_POINT_RATIO` of the
   other's 3D points: a global solution that lost most of its tracks fits the few left very well.

Why, measured on recon's default matches (the same features.h5 / matches.h5 for every engine; AUC@1 in percent,
registered views, reprojection error, mapping seconds on the shared 2-core VM where times vary by ±20 %):

| scene                  | incremental              | global (+ view-graph calib.) | global, no calib. | hierarchical |
|------------------------|--------------------------|------------------------------|-------------------|--------------|
| temple_ring (19)       | 34.0, 19, 0.275 px, 4 s  | **39.2**, 19, 0.250 px, 9 s  | 36.8, 19          | 34.0, 19     |
| temple_ring_full (47)  | **66.4**, 47, 0.289, 17 s| 8.2, 24 of 47 (3 models)     | 64.6, 47          | 66.2, 47     |
| fountain_p11 (11)      | **91.8**, 11, 0.359, 13 s| 91.4, 11, 0.317 px, 15-21 s  | 91.3, 11          | 91.8, 11     |
| demo scene (12, tests) | 86.0, 12, 0.592, 448 pts | 10.4, 12, 0.368 px, 124 pts  | **89.9**, 12      | 85.9, 12     |
| ring, 2 weak links (24)| 22.8, 12 of 24 (2 models)| **95.2**, 24                 | -                 | -            |

No single engine is safe: incremental first and alone keeps temple_ring 5 points below the global mapper and
splits the weakly linked ring; global alone splits temple_ring_full and returns a wrong model of the demo scene
whose every view is registered (only its point count gives it away), both after the view-graph calibration it
needs without EXIF focal lengths. Running both and applying rules 2-3 meets the best default engine on all five
(registered views, and AUC@1 within 1 point: 39.2, 66.4, 91.4, 86.0, 95.2) for the price of two mapping runs.
Splits are not merged: the only alignment pycolmap exposes (`align_reconstructions_via_*`) needs views common to
both models, which split models need not share (the two halves of the weakly linked ring share none), and it has
no call to merge the aligned points; the other engine's whole model is the remedy.

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

logger = logging.getLogger(__name__)

AUTO_ORDER = ("global", "incremental")
CHECK_MAX_IMAGES = 500  # above: no incremental check of a complete global model
MIN_POINT_RATIO = 0.8


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
    engines = AUTO_ORDER if mapper == "auto" else (mapper,)
    results: dict[str, list[pycolmap.Reconstruction]] = {}
    runs: dict[str, dict] = {}
    for engine in engines:
        if runs and num_images > CHECK_MAX_IMAGES and all(r["registered"] == num_images for r in runs.values()):
            break
        start = time.perf_counter()
        results[engine] = run_engine(engine, sections, database, image_dir, staging, num_images, calibrate)
        runs[engine] = _summary(results[engine], time.perf_counter() - start)
        logger.info("%s mapper: %d of %d views registered in its largest model (%d models, %.1f s)", engine,
                    runs[engine]["registered"], num_images, runs[engine]["models"], runs[engine]["seconds"])
    if mapper != "auto":
        return EngineChoice(mapper, "chosen with --mapper", results[mapper], runs)
    if len(runs) == 1:
        best, reason = engines[0], (f"{engines[0]} registered all {num_images} views; incremental check skipped "
                                    f"above {CHECK_MAX_IMAGES} images")
    else:
        best, reason = choose(runs)
    logger.info("auto mapper: %s (%s)", best, reason)
    return EngineChoice(best, reason, results[best], runs)
