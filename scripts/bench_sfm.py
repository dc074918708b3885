"""SfM benchmark against ground truth: COLMAP's own pipeline (via pycolmap) vs `recon run`, same process.

For each ground-truth scene in ../shared/data (temple_ring, temple_ring_full, fountain_p11; missing ones are
skipped) both pipelines run at their defaults and once more at the same maximum image size, and each model is
scored with `recon.eval` (registered images, points, reprojection error, relative-pose AUC@1/3/5 deg over all
ground-truth pairs). Wall time is measured per stage: extract, match (pair planning, matching and geometric
verification, which COLMAP's match_exhaustive does in one call), map. "Default" means each pipeline's own
image size (COLMAP's SIFT: 3200 px; recon's SIFT: resize_max 1600). recon runs without its exports (they
follow the model and COLMAP has none); its finer timings go to results.json. COLMAP uses pycolmap's defaults
on the CPU (extract_features, match_exhaustive, incremental_mapping), with its largest model scored, except for the camera grouping: COLMAP's `CameraMode.AUTO` gives every
EXIF-less image its own camera, and on temple_ring_full that alone costs COLMAP half its AUC@1 (11.8 vs 20.9:
each view fits its own focal and a spurious radial term), so by default COLMAP gets one shared camera, the
same assumption as recon's default `--camera-mode single`. `--colmap-camera-mode auto` restores COLMAP's own.

    python scripts/bench_sfm.py                                 # all scenes, both methods, both settings
    python scripts/bench_sfm.py --scenes temple_ring_full --methods colmap --settings default
    python scripts/bench_sfm.py --scenes fountain_p11 --settings max --max-size 1600 --markdown

`--verifiers colmap magsac poselib` adds one recon row per geometric verifier (recon.verifiers; method
"recon/<verifier>"), with the same features and matches settings; the "verified" column counts the pairs each
verifier accepted (read from the run's COLMAP database).

    python scripts/bench_sfm.py --scenes temple_ring --methods colmap --verifiers colmap magsac poselib

A "max" row is skipped when every image of the scene is already within the size limit (it would repeat the
default run). Results are also written to OUT/results.json.

`--repeat N` runs the two pipelines N times, alternating, and reports per-stage medians, the range of the totals
and the ratio of the median totals: on a shared 2-core VM the same run varies by ±20 %, which one pair of runs
cannot tell from a real difference. Quality figures come from the run with the median total (recon's are
deterministic; COLMAP's AUC moves by a few tenths between runs).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pycolmap

from PIL import Image

from feature_backends.errors import ReconError
from feature_backends.images import list_images
from recon.eval import EvalResult, evaluate, load_ground_truth

import benchlib  # scripts/benchlib.py, next to this file

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
STAGES = ("extract", "match", "map")


@dataclass(frozen=True)
class Scene:
    name: str
    images: str  # relative to the scene folder
    gt: str  # relative to the scene folder


SCENES = {
    scene.name: scene
    for scene in (
        Scene("temple_ring", ".", "templeR_par.txt"),
        Scene("temple_ring_full", ".", "templeR_par.txt"),
        Scene("fountain_p11", "images", "gt_dense_cameras"),
    )
}


@dataclass
class BenchRow:
    scene: str
    method: str
    setting: str
    times: dict[str, float] = field(default_factory=dict)
    detail: dict[str, float] = field(default_factory=dict)  # the pipeline's own finer timings
    result: EvalResult | None = None
    error: str | None = None
    totals: list[float] = field(default_factory=list)  # one per repeat

    @property
    def total(self) -> float:
        if self.totals:
            return statistics.median(self.totals)
        return sum(self.times.values()) if self.times else math.nan


def median_row(runs: list[BenchRow]) -> BenchRow:
    """One row from repeated runs: per-stage median times, all totals, the median-total run's quality figures."""
    finished = [run for run in runs if run.result is not None]
    if not finished:
        return runs[-1]
    totals = [sum(run.times.values()) for run in finished]
    median_run = finished[benchlib.median_run(totals)]
    times = benchlib.median_fields([run.times for run in finished], list(median_run.times))
    return BenchRow(median_run.scene, median_run.method, median_run.setting, times, median_run.detail,
                    median_run.result, None, totals)


def max_image_side(image_dir: Path, names: list[str]) -> int:
    side = 0
    for name in names:
        with Image.open(image_dir / name) as image:  # reads the header only
            side = max(side, *image.size)
    return side


def largest_model(models_root: Path) -> Path | None:
    best, best_count = None, -1
    for model_dir in sorted(p for p in models_root.iterdir() if p.is_dir()):
        count = pycolmap.Reconstruction(model_dir).num_reg_images()
        if count > best_count:
            best, best_count = model_dir, count
    return best


def run_colmap(image_dir: Path, names: list[str], work: Path, max_size: int | None,
               camera_mode: pycolmap.CameraMode = pycolmap.CameraMode.AUTO) -> tuple[Path | None, dict, dict]:
    database = work / "database.db"
    models_root = work / "sparse"
    models_root.mkdir(parents=True)
    extraction = pycolmap.FeatureExtractionOptions()
    if max_size is not None:
        extraction.max_image_size = max_size
    times = {}
    start = time.perf_counter()
    pycolmap.extract_features(database, image_dir, image_names=names, camera_mode=camera_mode,
                              extraction_options=extraction, device=pycolmap.Device.cpu)
    times["extract"] = time.perf_counter() - start
    start = time.perf_counter()
    pycolmap.match_exhaustive(database, device=pycolmap.Device.cpu)
    times["match"] = time.perf_counter() - start
    start = time.perf_counter()
    pycolmap.incremental_mapping(database, image_dir, models_root)
    times["map"] = time.perf_counter() - start
    return largest_model(models_root), times, {"verified_pairs": verified_pairs(database)}


def verified_pairs(database: Path) -> int | None:
    if not database.is_file():
        return None
    with pycolmap.Database.open(database) as db:
        return db.num_verified_image_pairs()


def run_recon(image_dir: Path, names: list[str], work: Path, max_size: int | None,
              verifier: str | None = None, mapper: str | None = None) -> tuple[Path | None, dict, dict]:
    """`recon run` at its defaults (or with another geometric verifier or mapper), minus the exports (they come
    after the model and COLMAP has none)."""
    from recon.export import ExportOptions  # imported lazily: the COLMAP half works without recon
    from recon.extract import ExtractOptions
    from recon.pipeline import RunConfig, run
    from recon.sfm import SfMOptions

    # None: recon's default (a fixed verifier here once kept the benchmark on COLMAP's after the default changed)
    sfm = SfMOptions(**{key: value for key, value in (("verifier", verifier), ("mapper", mapper)) if value})
    config = RunConfig(extract=ExtractOptions(resize_max=max_size), export=ExportOptions(formats=()),
                       image_list=names, sfm=sfm)
    result = run(image_dir, work, config)
    timings, sfm_timings = result.timings, result.sfm.timings
    times = {
        "extract": timings.get("extract", 0.0),
        # COLMAP's match_exhaustive plans the pairs, matches and verifies: charge recon the same steps
        "match": timings.get("pairs", 0.0) + timings.get("match", 0.0)
        + sfm_timings.get("import", 0.0) + sfm_timings.get("verify", 0.0),
        # the rest of the SfM stage's wall time counts as mapping: the mapper, the outlier filter's and the
        # principal point's bundle adjustments, and what the stage's own timings leave out (starting its fresh
        # process, ~0.4 s; writing the model), so recon is charged every second of the stage
        "map": timings.get("sfm", 0.0) - sfm_timings.get("import", 0.0) - sfm_timings.get("verify", 0.0),
    }
    model_dir = Path(result.sfm.sparse_dir)
    detail = {**timings, **{f"sfm.{key}": value for key, value in sfm_timings.items()},
              "verified_pairs": verified_pairs(work / "sfm" / "database.db")}
    return (model_dir if model_dir.is_dir() else None), times, detail


def bench_scene(scene: Scene, data_dir: Path, out_dir: Path, runners: dict[str, Callable], settings: list[str],
                max_size: int, repeat: int = 1) -> list[BenchRow]:
    scene_dir = data_dir / scene.name
    image_dir = (scene_dir / scene.images).resolve()
    names = list_images(image_dir)
    gt = load_ground_truth(scene_dir / scene.gt)
    gt = {name: cam for name, cam in gt.items() if name in set(names)}
    rows = []
    largest_side = max_image_side(image_dir, names)
    for setting in settings:
        limit = None if setting == "default" else max_size
        label = "default" if limit is None else f"max {limit}px"
        if limit is not None and largest_side <= limit:
            print(f"[{scene.name}] skipping '{label}': images are already {largest_side}px or smaller", flush=True)
            continue
        runs: dict[str, list[BenchRow]] = {method: [] for method in runners}
        for attempt, method in benchlib.alternating(list(runners), repeat):
            row = BenchRow(scene.name, method, label)
            work = out_dir / scene.name / f"{method}-{setting}"
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            print(f"[{scene.name}] {method} ({label}) on {len(names)} images, run {attempt + 1}/{repeat} ...",
                  flush=True)
            try:
                model_dir, row.times, row.detail = runners[method](image_dir, names, work, limit)
                if model_dir is None:
                    row.error = "no model"
                else:
                    row.result = evaluate(model_dir, gt)
            except ImportError as error:
                row.error = f"unavailable ({error})"
            except (ReconError, RuntimeError) as error:  # one failed run must not lose the others' rows
                row.error = f"failed: {error}"
            print(f"[{scene.name}] {method} ({label}): " + _summary(row), flush=True)
            runs[method].append(row)
        rows += [median_row(method_runs) for method_runs in runs.values()]
    return rows


def _summary(row: BenchRow) -> str:
    if row.result is None:
        return row.error or "failed"
    r = row.result
    return (f"{r.num_registered}/{r.num_gt_images} registered, AUC@1 {r.auc[0]:.1f}, "
            f"total {row.total:.1f}s")


def table_rows(rows: list[BenchRow]) -> tuple[list[str], list[list[str]]]:
    header = ["scene", "method", "setting", "verified", "registered", "points", "reproj px", "AUC@1", "AUC@3", "AUC@5",
              "extract s", "match s", "map s", "total s", "recon/COLMAP", "verify s"]
    colmap_total = {(r.scene, r.setting): r.total for r in rows if r.method == "colmap" and r.result}
    body = []
    for row in rows:
        r = row.result
        if r is None:
            metrics = [row.error or "failed", "", "", "", "", ""]
        else:
            metrics = [f"{r.num_registered}/{r.num_gt_images}", f"{r.num_points}",
                       f"{r.mean_reprojection_error:.2f}"] + [f"{a:.1f}" for a in r.auc[:3]]
        times = [f"{row.times[s]:.1f}" if s in row.times and not math.isnan(row.times[s]) else "-"
                 for s in STAGES]
        total = f"{row.total:.1f}" if row.times else "-"
        if len(row.totals) > 1:
            total += f" ({min(row.totals):.1f}-{max(row.totals):.1f})"
        ratio = ""
        reference = colmap_total.get((row.scene, row.setting))
        if row.method != "colmap" and reference and row.times:
            ratio = f"{row.total / reference:.2f}"
        verified = row.detail.get("verified_pairs")
        verify = row.detail.get("sfm.verify")  # recon's verification alone (inside "match s")
        body.append([row.scene, row.method, row.setting, "-" if verified is None else str(verified), *metrics,
                     *times, total, ratio, "-" if verify is None else f"{verify:.2f}"])
    return header, body


def format_table(rows: list[BenchRow], markdown: bool) -> str:
    header, body = table_rows(rows)
    return benchlib.table(body, header, markdown=markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="folder holding the scenes")
    parser.add_argument("--scenes", nargs="+", default=list(SCENES), choices=list(SCENES))
    parser.add_argument("--methods", nargs="+", default=["colmap", "recon"], choices=["colmap", "recon"])
    parser.add_argument("--settings", nargs="+", default=["default", "max"], choices=["default", "max"],
                        help="'default': each pipeline's own defaults; 'max': both at --max-size")
    parser.add_argument("--max-size", type=int, default=1600, help="maximum image side for the 'max' setting")
    parser.add_argument("--colmap-camera-mode", default="single", choices=["auto", "single", "per_folder", "per_image"],
                        help="COLMAP's camera grouping (default: single, as recon's default; see the module docstring)")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, deleted)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (README-ready)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each pipeline N times, alternating; report medians and the range of the totals")
    parser.add_argument("--verifiers", nargs="+", default=[], choices=["colmap", "magsac", "poselib"],
                        help="add a recon row per geometric verifier (method 'recon/<verifier>')")
    parser.add_argument("--verbose", action="store_true", help="keep COLMAP's INFO log on stderr")
    parser.add_argument("--engines", nargs="*", default=[], choices=["incremental", "global", "hierarchical", "auto"],
                        help="also run recon with each of these mappers (rows 'recon[ENGINE]'; 'recon' is recon's default, "
                             "incremental)")
    args = parser.parse_args(argv)

    camera_mode = getattr(pycolmap.CameraMode, args.colmap_camera_mode.upper())
    runners = {"colmap": functools.partial(run_colmap, camera_mode=camera_mode), "recon": run_recon}
    runners = {name: runners[name] for name in args.methods}
    runners.update({f"recon/{name}": functools.partial(run_recon, verifier=name) for name in args.verifiers})
    runners.update({f"recon[{engine}]": functools.partial(run_recon, mapper=engine) for engine in args.engines})
    if not args.verbose:
        pycolmap.logging.minloglevel = 1  # COLMAP's per-image INFO lines would bury the table
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="bench_sfm_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[BenchRow] = []
    try:
        for name in args.scenes:
            if not (args.data / name).is_dir():
                print(f"[{name}] not found in {args.data}, skipped", flush=True)
                continue
            rows += bench_scene(SCENES[name], args.data, out_dir, runners, args.settings, args.max_size, args.repeat)
        (out_dir / "results.json").write_text(json.dumps(
            [{"scene": r.scene, "method": r.method, "setting": r.setting, "times": r.times, "total": r.total,
              "totals": r.totals, "detail": r.detail, "error": r.error,
              "eval": r.result.to_dict() if r.result else None} for r in rows], indent=2))
        print()
        print(f"COLMAP camera mode: {args.colmap_camera_mode}; 'max' setting: {args.max_size}px; times in seconds"
              + (f", medians of {args.repeat} alternating runs (range of the totals)" if args.repeat > 1 else ""))
        print(format_table(rows, args.markdown))
    finally:
        if args.out is None:
            shutil.rmtree(out_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
