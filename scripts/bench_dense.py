"""Dense matching benchmark: our RoMa path against romatch called directly, and the two keypoint modes.

1. Throughput and peak memory, CPU (or --device), default resolution (coarse 560, upsample 864, symmetric):
   `RoMa.match_images` (decode once, resize on device, seeded bounded sampling) against romatch's own API
   (`match(path, path)` + `sample`) on the same image pairs, same weights. Each path runs in a fresh process;
   peak memory is the highest resident set sampled every 10 ms during matching, minus the resident set after the
   model is built. Without the official files (offline), both use the same random weights: speed and memory do
   not depend on the values.
2. Keypoint modes on a generated scene (recon.synthetic): `recon run` with the scene's ground-truth matcher
   (tests/test_dense.py:SceneOracle) in quantised mode and anchored on SIFT; keypoints per image, matches, and
   the mean track length of the model.

    python scripts/bench_dense.py --pairs 2 --markdown
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "temple_ring"


def resident_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * 4096


class PeakSampler:
    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, resident_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def random_roma_checkpoints():
    """Random RoMa and DINOv2 state dicts in the official layouts (module init skipped: values are replaced)."""
    import contextlib
    from unittest import mock

    from romatch.models.matcher import RegressionMatcher
    from romatch.models.model_zoo.roma_models import roma_model
    from romatch.models.transformer import vit_large
    from romatch.models.transformer.dinov2 import DinoVisionTransformer

    from feature_backends.roma import random_state_dict

    with contextlib.ExitStack() as stack:
        for name in ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "zeros_", "ones_", "constant_"):
            stack.enter_context(mock.patch(f"torch.nn.init.{name}", lambda tensor, *a, **k: tensor))
        stack.enter_context(mock.patch.object(DinoVisionTransformer, "init_weights", lambda self: None))
        dinov2 = random_state_dict(vit_large(img_size=518, patch_size=14, init_values=1.0, ffn_layer="mlp",
                                             block_chunks=0), seed=1)
        with mock.patch.object(RegressionMatcher, "load_state_dict"):
            layout = roma_model(resolution=(560, 560), upsample_preds=False, weights=None, dinov2_weights=dinov2,
                                device="cpu", use_custom_corr=False)
        return {"weights": random_state_dict(layout, seed=2), "dinov2": dinov2}


def load_checkpoints(use_official: bool):
    if use_official:
        from feature_backends.roma import DINOV2_VITL14, ROMA_OUTDOOR
        from feature_backends.weights import load_checkpoint

        return {"weights": load_checkpoint(ROMA_OUTDOOR, download=False),
                "dinov2": load_checkpoint(DINOV2_VITL14, download=False)}, "official"
    return random_roma_checkpoints(), "random"


def worker(path: str, images: list[Path], num_pairs: int, device: str, official: bool) -> dict:
    import torch

    checkpoints, kind = load_checkpoints(official)
    pairs = [(images[i], images[i + 1]) for i in range(num_pairs)]
    if path == "ours":
        from feature_backends.images import read_image
        from feature_backends.roma import RoMa

        model = RoMa.from_checkpoints(checkpoints, {}, device=device)
        del checkpoints

        def run(a, b):
            return model.match_images(read_image(a), read_image(b))
    else:
        from romatch.models.model_zoo.roma_models import roma_model

        model = roma_model(resolution=(560, 560), upsample_preds=True, upsample_res=(864, 864),
                           weights=checkpoints["weights"], dinov2_weights=checkpoints["dinov2"], device=device,
                           use_custom_corr=False, symmetric=True)
        del checkpoints

        def run(a, b):
            warp, certainty = model.match(str(a), str(b))
            matches, _ = model.sample(warp[0], certainty[0], num=10000)
            return model.to_pixel_coordinates(matches, 1, 1, 1, 1)

    run(*pairs[0])  # warm-up (first-call allocations, thread pools)
    baseline = resident_bytes()
    with PeakSampler() as sampler:
        start = time.perf_counter()
        for a, b in pairs:
            run(a, b)
        seconds = time.perf_counter() - start
    return {"path": path, "weights": kind, "pairs": num_pairs, "seconds": seconds,
            "pairs_per_s": num_pairs / seconds, "peak_mb": (sampler.peak - baseline) / 1e6,
            "threads": torch.get_num_threads()}


def interleaved(images: list[Path], num_pairs: int, device: str, official: bool) -> dict:
    """Both paths in one process, pair by pair in alternation, so that load from other processes on a shared
    machine hits both equally; also times sampling alone (the only non-network step that differs)."""
    from romatch.models.model_zoo.roma_models import roma_model

    from feature_backends.images import read_image
    from feature_backends.roma import RoMa, split_romatch_warp

    checkpoints, _ = load_checkpoints(official)
    ours = RoMa.from_checkpoints(checkpoints, {}, device=device)
    reference = roma_model(resolution=(560, 560), upsample_preds=True, upsample_res=(864, 864),
                           weights=checkpoints["weights"], dinov2_weights=checkpoints["dinov2"], device=device,
                           use_custom_corr=False, symmetric=True)
    del checkpoints
    seconds = {"ours": 0.0, "romatch": 0.0, "ours_sampling": 0.0, "romatch_sampling": 0.0}
    pairs = [(images[i], images[i + 1]) for i in range(num_pairs + 1)]
    for index, (a, b) in enumerate(pairs):  # the first pair warms both up and is not counted
        start = time.perf_counter()
        ours.match_images(read_image(a), read_image(b))
        middle = time.perf_counter()
        warp, certainty = reference.match(str(a), str(b))
        matches, _ = reference.sample(warp[0], certainty[0], num=10000)
        end = time.perf_counter()
        if index:
            seconds["ours"] += middle - start
            seconds["romatch"] += end - middle
    start = time.perf_counter()
    reference.sample(warp[0], certainty[0], num=10000)
    seconds["romatch_sampling"] = time.perf_counter() - start
    ours_warp = split_romatch_warp(warp[0], certainty[0], symmetric=True)
    ours_warp.size0 = ours_warp.size1 = (640, 480)
    start = time.perf_counter()
    ours_warp.sample(10000, 0.05, seed=0)
    seconds["ours_sampling"] = time.perf_counter() - start
    return {"pairs": num_pairs, **seconds}


def throughput(images: list[Path], num_pairs: int, device: str, official: bool) -> list[dict]:
    results = []
    for path in ("ours", "romatch"):
        command = [sys.executable, __file__, "--worker", path, "--pairs", str(num_pairs), "--device", device,
                   "--images", str(images[0].parent)] + (["--official"] if official else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    return results


def track_statistics(model) -> dict:
    """Distinct images per 3D point (what a track length means to a user: in how many views a point is
    seen), and the share of observations that sit in an image the point already has an observation in.
    COLMAP merges tracks through any chain of matches, so inconsistent matches give one point several
    keypoints in one image; counting those as track length rewards the inconsistency."""
    import numpy as np

    distinct, duplicates, observations = [], 0, 0
    for point in model.points3D.values():
        images = [element.image_id for element in point.track.elements]
        distinct.append(len(set(images)))
        duplicates += len(images) - len(set(images))
        observations += len(images)
    return {"images_per_point": float(np.mean(distinct)) if distinct else 0.0,
            "shared_obs_pct": 100.0 * duplicates / max(1, observations)}


def keypoint_modes(num_frames: int, num_matches: int, radius: float) -> list[dict]:
    import pycolmap

    sys.path.insert(0, str(ROOT / "tests"))
    from feature_backends import registry
    from feature_backends.store import FeatureReader, MatchReader
    from pairs.io import read_pairs
    from recon.eval import evaluate
    from recon.pipeline import RunConfig, run
    from recon.synthetic import PlaneSceneSpec, make_plane_scene

    registry.BACKENDS["dense"]["plane-oracle"] = "test_dense:PlaneOracle"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scene = make_plane_scene(Path(tmp) / "scene", PlaneSceneSpec(num_frames=num_frames))
        conf = {"scene": str(scene), "num_matches": num_matches}
        for mode, matcher, extra in (("quantised", "plane-oracle", {}),
                                     ("anchored (SIFT)", "sift+plane-oracle", {"radius": radius})):
            out = Path(tmp) / matcher
            start = time.perf_counter()
            result = run(scene / "images", out, RunConfig(matcher=matcher, matcher_conf={**conf, **extra},
                                                         exports=()))
            with FeatureReader(out / "features.h5") as features:
                keypoints = [len(features.read_keypoints(n)) for n in features.names()]
            with MatchReader(out / "matches.h5") as matches:
                num_matches_found = sum(len(matches.read(*pair)[0]) for pair in read_pairs(out / "pairs.txt"))
            model = pycolmap.Reconstruction(result.sfm.sparse_dir)
            rows.append({"mode": mode, "keypoints_per_image": sum(keypoints) / len(keypoints),
                         "matches": num_matches_found, "registered": f"{result.sfm.num_registered}/{num_frames}",
                         "points": result.sfm.num_points, **track_statistics(model),
                         "observations_per_point": result.sfm.mean_track_length,
                         "reprojection_px": result.sfm.mean_reprojection_error,
                         "auc@1/3/5": "/".join(f"{a:.0f}" for a in evaluate(result.sfm.sparse_dir, scene / "gt").auc),
                         "seconds": time.perf_counter() - start})
    return rows


def table(rows: list[dict], markdown: bool) -> str:
    keys = list(rows[0])
    cells = [[f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda values: ("| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |") if markdown \
        else "  ".join(v.ljust(w) for v, w in zip(values, widths))  # noqa: E731
    out = [line(keys)]
    if markdown:
        out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out + [line(c) for c in cells])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of images matched in sequence")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--official", action="store_true", help="use the official weight files (no download)")
    parser.add_argument("--frames", type=int, default=12, help="frames of the generated plane scene")
    parser.add_argument("--oracle-matches", type=int, default=10000, help="samples per pair (RoMa's default)")
    parser.add_argument("--radius", type=float, default=3.0, help="anchored mode: match radius in px")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-modes", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--worker", choices=("ours", "romatch", "interleaved"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if args.worker == "interleaved":
        print(json.dumps(interleaved(images, args.pairs, args.device, args.official)))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, images, args.pairs, args.device, args.official)))
        return 0
    if not args.skip_throughput:
        if len(images) < args.pairs + 1:
            parser.error(f"need {args.pairs + 1} images in {args.images}")
        rows = throughput(images, args.pairs, args.device, args.official)
        print(f"RoMa outdoor, coarse 560, upsample 864, symmetric, 10000 matches, {args.device}, "
              f"{rows[0]['weights']} weights, {rows[0]['threads']} threads, images from {args.images}")
        print("Separate processes (peak memory; throughput exposed to other load on the machine):")
        print(table(rows, args.markdown))
        print(f"throughput ratio ours/romatch: {rows[0]['pairs_per_s'] / rows[1]['pairs_per_s']:.2f}, "
              f"peak memory ratio: {rows[0]['peak_mb'] / max(rows[1]['peak_mb'], 1e-9):.2f}\n")
        command = [sys.executable, __file__, "--worker", "interleaved", "--pairs", str(args.pairs), "--device",
                   args.device, "--images", str(args.images)] + (["--official"] if args.official else [])
        both = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        rows = [{"path": path, "pairs_per_s": both["pairs"] / both[path], "sampling_s": both[f"{path}_sampling"]}
                for path in ("ours", "romatch")]
        print("One process, paths alternating pair by pair (throughput):")
        print(table(rows, args.markdown))
        print(f"throughput ratio ours/romatch: {rows[0]['pairs_per_s'] / rows[1]['pairs_per_s']:.2f}\n")
    if not args.skip_modes:
        print(f"Keypoint modes, generated plane scene ({args.frames} frames, 640x480), exact dense warp, "
              f"{args.oracle_matches} samples per pair")
        print(table(keypoint_modes(args.frames, args.oracle_matches, args.radius), args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
