"""Pair-planner benchmark: how many pairs each method produces and how long planning takes, for N = 50, 200, 1000
images, and the within-scene precision@K of each global descriptor on real photos.

Part 1, scale (generated descriptors, so planning is timed alone and N can reach 1000 on a laptop): N frames of a
simulated video that loops back on itself; each frame's 4096-D descriptor is a fixed random projection of its
position on the loop plus noise, L2-normalised. Timed: exhaustive, sequential (overlap 10, quadratic, COLMAP's
defaults), sequential + loop closure (every 10th frame, K neighbours), retrieval (top-K, de-duplicated), and
retrieval with a per-image cap. Descriptor extraction is not part of these times (see part 2).

Part 2, quality (real photos): the scenes of ../shared/data mixed in one folder (fountain_p11, sacre_coeur,
sceaux_castle, temple_ring: 51 images), downscaled to 640 px in a temporary folder (VLAD describes at 640 px
anyway; `--full-resolution` links the originals instead). For each descriptor whose weights are present
(vlad always; netvlad / cosplace when their files are found by feature_backends.weights), precision@K is the
fraction of retrieved (query, neighbour) pairs from the same scene; "chance" is that fraction for random pairs.

    python scripts/bench_pairs.py                 # both parts
    python scripts/bench_pairs.py --sizes 50 200 1000 --num-matched 20 --markdown
    python scripts/bench_pairs.py --skip-quality  # part 1 only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from feature_backends import registry
from feature_backends.base import merge_conf
from feature_backends.errors import ReconError
from feature_backends.weights import find_weights
from pairs.exhaustive import exhaustive_pairs
from pairs.retrieval import cap_per_image, extract_global_descriptors, retrieve
from pairs.sequential import loop_frames, sequential_pairs
from recon.synthetic import MIXED_SCENES, mixed_scenes

import benchlib  # scripts/benchlib.py, next to this file

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def generated_video(count: int, dim: int = 4096, laps: float = 2.0, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    angle = 2 * np.pi * laps * np.arange(count) / count
    position = np.stack([np.cos(angle), np.sin(angle), np.cos(2 * angle), np.sin(2 * angle)], 1)
    projection = rng.standard_normal((4, dim)).astype(np.float32)
    descriptors = position @ projection + 0.3 * rng.standard_normal((count, dim)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    return [f"frame{i:05d}.jpg" for i in range(count)], descriptors.astype(np.float32)


def timed(function, repeat: int = 3):
    best, result = math.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return result, best


def scale_rows(sizes: list[int], num_matched: int, cap: int) -> list[dict]:
    rows = []
    for count in sizes:
        names, desc = generated_video(count)

        def loop_closure():
            window = sequential_pairs(names, 10, True)
            queries = loop_frames(names, 10)
            rows_of = {name: i for i, name in enumerate(names)}
            scored = retrieve(queries, desc[[rows_of[q] for q in queries]], names, desc, num_matched)
            return window + [pair[:2] for pair in cap_per_image(scored, None)]

        methods = {
            "exhaustive": lambda: exhaustive_pairs(names),
            "sequential (W=10, quadratic)": lambda: sequential_pairs(names, 10, True),
            f"sequential + loop closure (L=10, K={num_matched})": lambda: _dedup(loop_closure()),
            f"retrieval (K={num_matched})":
                lambda: cap_per_image(retrieve(names, desc, names, desc, num_matched), None),
            f"retrieval (K={num_matched}, cap {cap}/image)":
                lambda: cap_per_image(retrieve(names, desc, names, desc, num_matched), cap),
        }
        for method, function in methods.items():
            pairs, seconds = timed(function, repeat=1 if method == "exhaustive" and count > 500 else 3)
            rows.append({"N": count, "method": method, "pairs": len(pairs), "pairs_per_image": len(pairs) / count,
                         "seconds": seconds})
    return rows


def _dedup(pairs):
    from pairs.io import deduplicate

    return deduplicate(pairs)


def weights_present(name: str) -> tuple[bool, str]:
    """Whether every file the backend's default configuration loads is here, and the files' names."""
    cls, preset = registry.resolve("global", name)
    files = [weight for weight, _ in cls.required_weights(merge_conf(cls.full_default_conf(), preset))]
    return all(find_weights(weight) is not None for weight in files), ", ".join(w.filename for w in files)


def quality_rows(folder: Path, out: Path, ks: list[int], device: str | None) -> list[dict]:
    from feature_backends.store import read_global_descriptors

    rows = []
    names_all = sorted(p.name for p in folder.iterdir())
    scenes = [name.split("__")[0] for name in names_all]
    sizes = {scene: scenes.count(scene) for scene in set(scenes)}
    n = len(names_all)
    chance = sum(s * (s - 1) for s in sizes.values()) / (n * (n - 1))
    rows.append({"descriptor": "chance (random pairs)", **{f"P@{k}": chance for k in ks}, "seconds": 0.0,
                 "note": f"{n} images, scenes of {sorted(sizes.values())}"})
    for name in registry.names("global"):
        present, filename = weights_present(name)
        if not present:
            rows.append({"descriptor": name, **{f"P@{k}": None for k in ks}, "seconds": None,
                         "note": f"weights {filename} not available here"})
            continue
        start = time.perf_counter()
        try:
            path = extract_global_descriptors(folder, out / f"global-{name}.h5", name, device=device)
        except ReconError as error:
            rows.append({"descriptor": name, **{f"P@{k}": None for k in ks}, "seconds": None, "note": str(error)})
            continue
        seconds = time.perf_counter() - start
        names, desc = read_global_descriptors(path)
        row = {"descriptor": name, "seconds": seconds, "note": f"{desc.shape[1]}-D"}
        for k in ks:
            scored = retrieve(names, desc, names, desc, k)
            row[f"P@{k}"] = float(np.mean([a.split("__")[0] == b.split("__")[0] for a, b, _ in scored]))
        rows.append(row)
    return rows


def number(value) -> str:
    """Pair counts as they are, fractions with 3 decimals, seconds under 10 with 4 (planning takes milliseconds)."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.3f}" if value < 100 else f"{value:.0f}"


def seconds_cell(value) -> str:
    return f"{value:.4f}" if value < 10 else number(value)


def table(rows: list[dict], columns: list[str], markdown: bool) -> str:
    formats = {c: seconds_cell if c == "seconds" else number for c in columns}
    return benchlib.table(rows, columns, markdown=markdown, formats=formats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--num-matched", type=int, default=20)
    parser.add_argument("--cap", type=int, default=15, help="per-image cap for the capped retrieval row")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="folder holding the scenes")
    parser.add_argument("--full-resolution", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, help="keep descriptors and results.json here (default: temporary)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    results: dict = {}
    rows = scale_rows(args.sizes, args.num_matched, args.cap)
    results["scale"] = rows
    print("Part 1 - planning on generated 4096-D descriptors (extraction not included)")
    print(table(rows, ["N", "method", "pairs", "pairs_per_image", "seconds"], args.markdown))
    retrieval = [r for r in rows if r["method"] == f"retrieval (K={args.num_matched})"]
    if len(retrieval) > 1:
        ratios = ", ".join(f"{r['pairs'] / r['N']:.2f}" for r in retrieval)
        exhaustive = ", ".join(f"{(r['N'] - 1) / 2:.1f}" for r in retrieval)
        print(f"\nretrieval pairs / N: {ratios} (constant: linear in N, bounded by K = {args.num_matched}); "
              f"exhaustive pairs / N: {exhaustive}")

    if not args.skip_quality:
        if not args.data.is_dir():
            print(f"\nPart 2 skipped: {args.data} not present")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                out = args.out or Path(tmp)
                out.mkdir(parents=True, exist_ok=True)
                folder = mixed_scenes(args.data, Path(tmp) / "mixed", MIXED_SCENES,
                                      None if args.full_resolution else 640)
                quality = quality_rows(folder, out, args.ks, args.device)
            results["quality"] = quality
            print("\nPart 2 - within-scene precision@K on the mixed real folder")
            print(table(quality, ["descriptor", *[f"P@{k}" for k in args.ks], "seconds", "note"], args.markdown))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
