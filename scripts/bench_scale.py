"""Scale benchmark: how each stage's time and peak memory grow with the number of images, per mapping engine.

Generated scenes (`recon.synthetic.make_scene`: 150 points, 640x480, known poses) of N images; recon's default
pairs (exhaustive up to 50 images, VLAD retrieval with 20 neighbours above), SIFT features and matches, then the
SfM stage once per engine on the same matches. Every stage runs in its own Python process, so its peak resident
memory (`ru_maxrss` of that process, from os.wait4) is the stage's own: flat in N for extraction, matching and
import means they stream (never all features in memory). Each model is scored against the known poses
(`recon.eval`: registered views, relative-pose AUC@1/3/5).

    python scripts/bench_scale.py --sizes 50 200 --engines incremental global hierarchical auto
    python scripts/bench_scale.py --sizes 1000 --engines global hierarchical --out /tmp/scale --markdown

Results also go to OUT/results.json. Wrap timing runs in `flock /tmp/cpu.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import table

REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("incremental", "global", "hierarchical", "auto")

_SFM = """
import json, logging, sys
from pathlib import Path
# recon's step lines (mapping, principal points, writing) with times in N/log.txt: a long step never looks hung
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
from recon.eval import evaluate
from recon.sfm import SfMOptions, reconstruct
out, images, work, engine = (Path(a) for a in sys.argv[1:5])
result = reconstruct(out, images, work / "pairs.txt", work / "features.h5", work / "matches.h5",
                     SfMOptions(mapper=str(engine), fresh_process=False))
scores = evaluate(result.sparse_dir, work.parent / "gt")
(out / "bench.json").write_text(json.dumps({"sfm": result.to_dict(), "eval": scores.to_dict()}))
"""


def run_stage(args: list[str], log: Path) -> tuple[float, float]:
    """Run one stage in a child process; return (seconds, peak RSS in MB of that process)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    with log.open("a") as sink:
        process = subprocess.Popen([sys.executable, *args], stdout=sink, stderr=sink, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        shown = " ".join(arg if len(arg) < 80 else "<script>" for arg in args[:5])
        raise RuntimeError(f"stage '{shown}' failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    return seconds, usage.ru_maxrss / 1024.0


def bench_size(num_images: int, engines: list[str], root: Path) -> list[dict]:
    from recon.synthetic import SceneSpec, make_scene

    scene = root / f"n{num_images}"
    start = time.perf_counter()
    make_scene(scene, SceneSpec(num_frames=num_images))
    print(f"[N={num_images}] scene generated in {time.perf_counter() - start:.1f}s", flush=True)
    images, work, log = scene / "images", scene / "work", scene / "log.txt"
    work.mkdir(exist_ok=True)
    cli = ["-m", "recon.cli"]
    rows = []
    for stage, args in [
        ("pairs", [*cli, "pairs", str(images), str(work / "pairs.txt")]),
        ("extract", [*cli, "extract", str(images), str(work / "features.h5")]),
        ("match", [*cli, "match", str(work / "pairs.txt"), str(work / "features.h5"), str(work / "matches.h5")]),
    ]:
        seconds, rss = run_stage(args, log)
        rows.append({"N": num_images, "stage": stage, "seconds": seconds, "rss_mb": rss})
        print(f"[N={num_images}] {stage}: {seconds:.1f}s, peak RSS {rss:.0f} MB", flush=True)
    num_pairs = sum(1 for _ in (work / "pairs.txt").open())
    for engine in engines:
        out = scene / f"sfm-{engine}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        try:
            seconds, rss = run_stage(["-c", _SFM, str(out), str(images), str(work), engine], log)
        except RuntimeError as error:
            rows.append({"N": num_images, "stage": f"sfm {engine}", "error": str(error)})
            print(f"[N={num_images}] sfm {engine}: {error}", flush=True)
            continue
        record = json.loads((out / "bench.json").read_text())
        sfm, scores = record["sfm"], record["eval"]
        rows.append({"N": num_images, "stage": f"sfm {engine}", "seconds": seconds, "rss_mb": rss,
                     "timings": sfm["timings"], "engine": sfm["engine"], "registered": scores["num_registered"],
                     "num_models": sfm["num_models"], "auc": [scores[f"auc@{t:g}"] for t in (1, 3, 5)],
                     "pairs": num_pairs})
        print(f"[N={num_images}] sfm {engine}: {seconds:.1f}s ({_timings(sfm['timings'])}), peak RSS {rss:.0f} MB, "
              f"{scores['num_registered']}/{num_images} registered, AUC@1 {scores['auc@1']:.1f}", flush=True)
    return rows


def _timings(timings: dict) -> str:
    return ", ".join(f"{key} {value:.1f}" for key, value in timings.items())


def format_table(rows: list[dict], markdown: bool) -> str:
    header = ["N", "stage", "time s", "peak RSS MB", "detail", "registered", "AUC@1/3/5"]
    body = []
    for row in rows:
        if "error" in row:
            body.append([str(row["N"]), row["stage"], "-", "-", row["error"], "", ""])
            continue
        detail = _timings(row.get("timings", {}))
        if row.get("engine") and row["stage"] == "sfm auto":
            detail += f"; kept {row['engine']}"
        registered = ""
        if "registered" in row:
            registered = f"{row['registered']}/{row['N']}" + (f" ({row['num_models']} models)"
                                                               if row["num_models"] > 1 else "")
        body.append([str(row["N"]), row["stage"], f"{row['seconds']:.1f}", f"{row['rss_mb']:.0f}", detail, registered,
                     "/".join(f"{a:.1f}" for a in row["auc"]) if "auc" in row else ""])
    return table(body, header, markdown=markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, deleted)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    try:
        for size in args.sizes:
            rows += bench_size(size, args.engines, root)
            (root / "results.json").write_text(json.dumps(rows, indent=2))
        print()
        print(format_table(rows, args.markdown))
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
