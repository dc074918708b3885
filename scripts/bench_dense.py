"""Dense matching benchmark: our RoMa path against romatch called directly, and the two keypoint modes.

1. Throughput, CPU (or --device), romatch's default resolution (coarse 560, upsample 864, symmetric, 10k
   matches), on a pair stream where images repeat as in every SfM pair list (all pairs of the first
   --stream-images images): our dense stage's path (each image decoded and encoded once into the stage's
   byte-budget cache, `RoMa.match_encoded` per pair, seeded bounded sampling) against romatch's own API
   (`match(path, path)` + `sample`, which encodes both images of every pair). Both in one process, same weights,
   alternating pair by pair and which goes first, after one uncounted warm-up pair each. Sampling alone is timed
   on one random 864x1728 warp. Without the official files (offline) both use the same random weights: speed and
   memory do not depend on the values.
2. Peak memory: each path alone in a fresh process, highest resident set sampled every 10 ms over the stream,
   minus the resident set after the warm-up pair.
3. Keypoint modes on a generated plane scene (recon.synthetic.make_plane_scene: textured planes, known cameras,
   occlusion), matched by its exact per-pixel warp (recon.oracles:PlaneOracle, sampled as RoMa samples),
   through `recon run` in quantised mode and anchored on SIFT without and with keypoint propagation: keypoints
   per image (of which added by propagation), matches, registered images,
   points, distinct images per 3D point, share of observations in an image the point is already observed in,
   observations per point (COLMAP's track length), reprojection error, pose AUC against the known cameras.

    python scripts/bench_dense.py --stream-images 3 --markdown            # everything (about 25 min on 2 cores)
    python scripts/bench_dense.py --skip-throughput --skip-memory         # keypoint modes only (about 4 min)

4. `--zoo [NAME ...]` (alone): the other dense backends (LoFTR, MINIMA's and GIM's LoFTR, XFeat*, RoMa v2) against
   their installable references with the same random weights: pairs/s and each side's peak resident memory, each
   measurement in a fresh process, the sides alternating (benchlib.alternate_children), as bench_features does.

    python scripts/bench_dense.py --zoo --stream-images 3 --markdown"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import benchlib  # scripts/benchlib.py, next to this file

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "temple_ring"
PLANE_ORACLE = "recon.oracles:PlaneOracle"  # a dense backend by dotted path: nothing registered


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
        from feature_backends.roma import ROMA_OUTDOOR
        from feature_backends.weights import DINOV2_VITL14, load_checkpoint

        return {"weights": load_checkpoint(ROMA_OUTDOOR, download=False),
                "dinov2": load_checkpoint(DINOV2_VITL14, download=False)}, "official"
    return random_roma_checkpoints(), "random"


def stream(images: list[Path], stream_images: int) -> tuple[list[tuple[Path, Path]], tuple[Path, Path]]:
    """Every pair of the first `stream_images` images (each image in several pairs, as in any SfM pair list) and
    a warm-up pair of two other images."""
    chosen = images[:stream_images]
    pairs = [(a, b) for i, a in enumerate(chosen) for b in chosen[i + 1:]]
    return pairs, (images[stream_images], images[stream_images + 1])


def build_path(path: str, checkpoints: dict, device: str, res: tuple[int, int] = (560, 864)):
    """(match one pair, start a new stream, timing counters) for our dense stage's path or romatch's own API."""
    counters = {"encodes": 0, "encode_s": 0.0}
    if path == "ours":
        from feature_backends.roma import RoMa
        from recon.dense.common import encoded_images

        model = RoMa.from_checkpoints(checkpoints, {"coarse_res": res[0], "upsample_res": res[1]}, device=device)
        encode = model.encode

        def timed_encode(image):
            start = time.perf_counter()
            result = encode(image)
            counters["encodes"] += 1
            counters["encode_s"] += time.perf_counter() - start
            return result

        model.encode = timed_encode
        state = {}

        def reset(folder: Path):  # what the dense stage does at its start: an empty cache of encodings
            state["cache"] = encoded_images(model, folder)

        def run(a: Path, b: Path):
            return model.match_encoded(state["cache"][a.name], state["cache"][b.name])

        return run, reset, counters
    from romatch.models.model_zoo.roma_models import roma_model

    model = roma_model(resolution=(res[0], res[0]), upsample_preds=True, upsample_res=(res[1], res[1]),
                       weights=checkpoints["weights"], dinov2_weights=checkpoints["dinov2"], device=device,
                       use_custom_corr=False, symmetric=True)

    def run(a: Path, b: Path):
        warp, certainty = model.match(str(a), str(b))
        matches, _ = model.sample(warp[0], certainty[0], num=10000)
        return model.to_pixel_coordinates(matches, 1, 1, 1, 1)

    return run, (lambda folder: None), counters


def worker(path: str, images: list[Path], stream_images: int, device: str, official: bool, res) -> dict:
    """One path alone in this process: peak resident memory over the stream, above the level after warm-up."""
    import torch

    checkpoints, kind = load_checkpoints(official)
    run, reset, counters = build_path(path, checkpoints, device, res)
    del checkpoints
    pairs, warm_up = stream(images, stream_images)
    reset(images[0].parent)
    run(*warm_up)  # first-call allocations, thread pools
    reset(images[0].parent)
    baseline = benchlib.resident_bytes()
    with benchlib.PeakSampler() as sampler:
        start = time.perf_counter()
        for a, b in pairs:
            run(a, b)
        seconds = time.perf_counter() - start
    return {"path": path, "weights": kind, "pairs": len(pairs), "seconds": seconds,
            "s_per_pair": seconds / len(pairs), "peak_mb": (sampler.peak - baseline) / 1e6,
            "threads": torch.get_num_threads()}


def interleaved(images: list[Path], stream_images: int, device: str, official: bool, res) -> dict:
    """Both paths in one process, alternating pair by pair (and which goes first), so that load from other
    processes on a shared machine hits both alike; also times sampling alone."""
    checkpoints, _ = load_checkpoints(official)
    paths = {name: build_path(name, checkpoints, device, res) for name in ("ours", "romatch")}
    del checkpoints
    pairs, warm_up = stream(images, stream_images)
    folder = images[0].parent
    for run, reset, counters in paths.values():  # warm-up pair, not counted, then a fresh stream
        reset(folder)
        run(*warm_up)
        reset(folder)
        counters.update(encodes=0, encode_s=0.0)
    per_pair = [{"pair": f"{a.stem}-{b.stem}"} for a, b in pairs]
    for index, name in benchlib.alternating(("ours", "romatch"), len(pairs), flip=True):
        start = time.perf_counter()
        paths[name][0](*pairs[index])
        per_pair[index][name] = time.perf_counter() - start
    seconds = {name: sum(row[name] for row in per_pair) for name in paths}
    return {"pairs": len(pairs), "per_pair": per_pair, **seconds, "ours_encodes": paths["ours"][2]["encodes"],
            "ours_encode_s": paths["ours"][2]["encode_s"]}


def sampling_times(device: str) -> dict:
    """romatch's sample() against our sampler on the same random symmetric warp at 864x864 (10k matches)."""
    import torch
    from romatch.models.matcher import RegressionMatcher

    from feature_backends.roma import split_romatch_warp

    generator = torch.Generator().manual_seed(0)
    warp = torch.rand(1, 864, 2 * 864, 4, generator=generator) * 2 - 1
    certainty = torch.rand(1, 864, 2 * 864, generator=generator)
    settings = SimpleNamespace(sample_mode="threshold_balanced", sample_thresh=0.05)  # all sample() reads
    start = time.perf_counter()
    RegressionMatcher.sample(settings, warp[0], certainty[0], num=10000)
    romatch_s = time.perf_counter() - start
    ours = split_romatch_warp(warp[0], certainty[0], symmetric=True)
    ours.size0 = ours.size1 = (640, 480)
    start = time.perf_counter()
    ours.sample(10000, 0.05, seed=0)
    return {"ours_sampling": time.perf_counter() - start, "romatch_sampling": romatch_s}


def in_child(worker: str, images: Path, stream_images: int, device: str, official: bool, res) -> dict:
    """This script's `--worker` in a fresh process (its own peak memory, no shared caches); its result."""
    argv = [__file__, "--worker", worker, "--stream-images", str(stream_images), "--device", device,
            "--images", str(images), "--res", *map(str, res)] + (["--official"] if official else [])
    return benchlib.run_child(argv)[0]


def throughput(images: list[Path], stream_images: int, device: str, official: bool, res) -> list[dict]:
    return [in_child(path, images[0].parent, stream_images, device, official, res) for path in ("ours", "romatch")]


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

    from feature_backends.store import FeatureReader, MatchReader
    from pairs.io import read_pairs
    from recon.dense import DenseOptions
    from recon.eval import evaluate
    from recon.export import ExportOptions
    from recon.match import MatchOptions
    from recon.pipeline import RunConfig, run
    from recon.synthetic import PlaneSceneSpec, make_plane_scene

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scene = make_plane_scene(Path(tmp) / "scene", PlaneSceneSpec(num_frames=num_frames))
        conf = {"scene": str(scene), "num_matches": num_matches}
        for mode, matcher, dense in (("quantised", PLANE_ORACLE, DenseOptions()),
                                     ("anchored (SIFT)", f"sift+{PLANE_ORACLE}",
                                      DenseOptions(radius=radius, propagate=False)),
                                     ("anchored (SIFT) + propagation", f"sift+{PLANE_ORACLE}",
                                      DenseOptions(radius=radius, propagate=True))):
            out = Path(tmp) / mode.replace(" ", "_")
            start = time.perf_counter()
            result = run(scene / "images", out, RunConfig(match=MatchOptions(matcher, conf), dense=dense,
                                                         export=ExportOptions(formats=())))
            with FeatureReader(out / "features.h5") as features:
                counts = [features.keypoint_counts(n) for n in features.names()]
            keypoints = [total for total, _ in counts]
            added = [total - detected for total, detected in counts]
            with MatchReader(out / "matches.h5") as matches:
                num_matches_found = sum(len(matches.read(*pair)[0]) for pair in read_pairs(out / "pairs.txt"))
            model = pycolmap.Reconstruction(result.sfm.sparse_dir)
            rows.append({"mode": mode, "keypoints_per_image": sum(keypoints) / len(keypoints),
                         "added_per_image": sum(added) / len(added),
                         "matches": num_matches_found, "registered": f"{result.sfm.num_registered}/{num_frames}",
                         "points": result.sfm.num_points, **track_statistics(model),
                         "observations_per_point": result.sfm.mean_track_length,
                         "reprojection_px": result.sfm.mean_reprojection_error,
                         "auc@1/3/5": "/".join(f"{a:.0f}" for a in evaluate(result.sfm.sparse_dir, scene / "gt").auc),
                         "seconds": time.perf_counter() - start})
    return rows


# --- the rest of the dense zoo against its references ---------------------------------------------------------------

#: row → (backend, conf for ours, the reference's label). RoMa v2 runs its `turbo` setting (320², one direction):
#: its default `precise` (800² + 1280², both directions) takes minutes per pair on 2 CPU cores. Its "warp" row
#: leaves sampling out on both sides (ours `warp_images`, romav2 `match`): the samplers differ (romav2's KDE
#: compares 4 x 10000 candidates with each other).
ZOO = {
    "loftr": ("loftr", {}, "kornia LoFTR"),
    "minima-loftr": ("minima-loftr", {}, "kornia LoFTR"),
    "gim-loftr": ("gim-loftr", {}, "kornia LoFTR forward, GIM backbone (recon's; GIM not installable)"),
    "xfeat-star": ("xfeat-star", {}, "kornia XFeat.match_xfeat_star"),
    "romav2": ("romav2", {"setting": "turbo"}, "romav2 RoMaV2.match + sample (own constructor)"),
    "romav2-warp": ("romav2", {"setting": "turbo"}, "romav2 RoMaV2.match (own constructor)"),
}
ZOO_FILES = {"loftr": "loftr_outdoor.ckpt", "minima-loftr": "minima_loftr.ckpt", "gim-loftr": "gim_loftr_50h.ckpt",
             "xfeat-star": "xfeat.pt", "romav2": "romav2.0.1.pt"}
WARP_ONLY = {"romav2-warp"}


def informative_xfeat_state(image: Path) -> dict:
    """bench_features' random XFeat weights made to match: the descriptor head's input (after a ReLU) shares one
    large component at every cell, so every coarse descriptor has the same nearest neighbour (1 mutual match per
    pair); it is projected out of the last fusion convolution (calibrated on `image`), and the fine matcher's
    logits are sharpened x10 so that matches pass XFeat*'s 0.25 confidence (88 matches on two temple images)."""
    import torch
    from kornia.feature import XFeatModel

    from bench_features import random_xfeat_state
    from feature_backends.images import read_image

    state = random_xfeat_state()
    network = XFeatModel()
    network.load_state_dict(state)
    captured = {}
    network.eval().block_fusion[2].register_forward_hook(lambda m, i, o: captured.update(x=i[0]))
    with torch.no_grad():
        network(torch.from_numpy(read_image(image)).permute(2, 0, 1)[None])
    common = torch.nn.functional.normalize(captured["x"].mean(dim=(0, 2, 3)), dim=0)
    weight = state["block_fusion.2.weight"]
    state["block_fusion.2.weight"] = weight - torch.einsum("oikl,i->okl", weight, common)[:, None] * common[
        None, :, None, None]
    state["block_fusion.2.bias"] = torch.zeros_like(state["block_fusion.2.bias"])
    state["fine_matcher.12.weight"] = state["fine_matcher.12.weight"] * 10
    return state


def zoo_weights(name: str, folder: Path, image: Path) -> None:
    """Random weights in the official layout of `name`'s file, saved under its official name in `folder`. LoFTR
    weights are recon.references' `informative_loftr_state` (plain random LoFTR weights give 0-3 matches per pair,
    which would leave the fine stage idle), calibrated on `image`; XFeat's likewise (`informative_xfeat_state`)."""
    import torch

    path = folder / ZOO_FILES[name]
    if path.exists():
        return
    if name in ("loftr", "minima-loftr", "gim-loftr"):
        from kornia.feature import LoFTR

        from feature_backends.gim_loftr import gim_loftr_network
        from feature_backends.images import read_image
        from feature_backends.loftr import kornia_loftr_config

        from recon.references import informative_loftr_state

        decoded = read_image(image, grayscale=name != "gim-loftr")
        tensor = torch.from_numpy(decoded).permute(2, 0, 1)[None].contiguous()
        if name == "gim-loftr":
            network = gim_loftr_network()
        else:
            network = LoFTR(pretrained=None, config=kornia_loftr_config(False, 0.2))
        state = informative_loftr_state(network, tensor, seed=len(name))
        torch.save({"state_dict": state}, path)
    elif name == "xfeat-star":
        torch.save(informative_xfeat_state(image), path)
    else:
        from recon.references import official_romav2, random_romav2_checkpoint

        torch.save(random_romav2_checkpoint(official_romav2()), path)


def _zoo_reference(name: str, conf: dict, weights: Path, warp_only: bool = False):
    """`name`'s reference, called directly: a function of two decoded images → number of matches (of warp
    cells with `warp_only`)."""
    import numpy as np
    import torch

    from feature_backends.images import resize_image
    from feature_backends.registry import resolve

    cls, preset = resolve("dense", name)
    conf = {**cls.full_default_conf(), **preset, **conf}
    state = torch.load(weights / ZOO_FILES[name], weights_only=True)
    if name == "romav2":
        from recon.references import official_romav2

        model = official_romav2()
        torch.nn.Module.load_state_dict(model, state)
        model.eval().apply_setting(conf["setting"])
        tensor = lambda image: torch.from_numpy(image).permute(2, 0, 1)[None]  # noqa: E731

        def run(image0, image1):
            preds = model.match(tensor(image0), tensor(image1))
            return preds["warp_AB"][0, ..., 0].numel() if warp_only else len(model.sample(preds, conf["num_matches"])[0])
        return run
    if name == "xfeat-star":
        from kornia.feature import XFeat

        model = XFeat(top_k=conf["top_k"])
        model.net.load_state_dict(state)
        model.eval()

        def resized(image):
            image, _ = resize_image(image, conf["resize_max"], False, 32)
            return torch.from_numpy(image.transpose(2, 0, 1).copy())[None]

        return lambda image0, image1: len(model.match_xfeat_star(resized(image0), resized(image1))[0])
    from kornia.feature import LoFTR

    from feature_backends.gim_loftr import gim_loftr_network
    from feature_backends.loftr import kornia_loftr_config

    if name == "gim-loftr":
        network = gim_loftr_network(conf["match_threshold"])
    else:
        temp_bug_fix = cls.variants[conf["variant"]][1]
        network = LoFTR(pretrained=None, config=kornia_loftr_config(temp_bug_fix, conf["match_threshold"]))
    network.load_state_dict(state["state_dict"])
    network.eval()

    def prepare(image):
        if cls.grayscale:
            image = (image @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        resized, _ = resize_image(image, conf["resize_max"], conf["resize_force"], cls.size_multiple)
        return torch.from_numpy(resized.transpose(2, 0, 1).copy())[None]

    def run(image0, image1):
        with torch.inference_mode():
            return len(network({"image0": prepare(image0), "image1": prepare(image1)})["confidence"])
    return run


def zoo_measure(side: str, row: str, images: list[str], stream_images: int) -> dict:
    """Pairs/s over every pair of the first `stream_images` images after one warm-up pair of two others. Ours is
    the dense stage's path: each image encoded once (`encode`, kept for all its pairs), `match_encoded` per pair
    (`warp_encoded` for a warp-only row); the reference is called per pair on both images, as its API works."""
    import os

    from feature_backends.images import read_image
    from feature_backends.registry import get_backend

    name, conf, _ = ZOO[row]
    warp_only = row in WARP_ONLY
    if side == "ours":
        model = get_backend("dense", name, conf, device="cpu")
        cache: dict[int, dict] = {}

        def run(i, j):
            for k in (i, j):
                if k not in cache:
                    cache[k] = model.encode(decoded[k])
            if warp_only:
                return model.warp_encoded(cache[i], cache[j]).certainty.numel()
            return len(model.match_encoded(cache[i], cache[j])["scores"])
    else:
        reference = _zoo_reference(name, conf, Path(os.environ["RECON_WEIGHTS_DIR"]), warp_only)
        run = lambda i, j: reference(decoded[i], decoded[j])  # noqa: E731
    decoded = [read_image(path) for path in images]
    run(stream_images, stream_images + 1)
    pairs = [(i, j) for i in range(stream_images) for j in range(i + 1, stream_images)]
    start = time.perf_counter()
    counts = [run(i, j) for i, j in pairs]
    return {"rate": len(pairs) / (time.perf_counter() - start), "matches": sum(counts) / len(counts)}


def zoo(names: list[str], images: list[Path], stream_images: int, repeats: int, threads: int,
        weights: Path | None) -> list[tuple]:
    """Every named backend against its reference: each side alone in a fresh process (its own peak memory), the
    sides alternating `repeats` times; medians. Random weight files are made in `weights` where missing (default:
    a fresh temporary folder). Each row is also printed as soon as it is measured."""
    import json
    import os
    import sys

    weights = weights or Path(tempfile.mkdtemp(prefix="recon-bench-zoo-"))
    weights.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RECON_WEIGHTS_DIR": str(weights), "RECON_OFFLINE": "1"}
    chosen = [str(path) for path in images[:stream_images + 2]]
    rows = []
    for row in names:
        name, conf, label = ZOO[row]
        benchlib.run_child([__file__, "--zoo-child", json.dumps({"task": "weights", "name": name,
                                                                 "folder": str(weights), "image": chosen[0]})], env)
        spec = {"task": "measure", "row": row, "images": chosen, "stream_images": stream_images, "threads": threads}
        medians = benchlib.alternate_children(
            lambda side: [__file__, "--zoo-child", json.dumps({**spec, "side": side})], repeats, env,
            keys=("rate", "peak_mb", "matches"))
        setting = ", ".join(f"{k}={v}" for k, v in conf.items()) or "defaults"
        rows.append((row, f"{setting}; ref: {label}", "pairs/s", medians["ours"], medians["reference"]))
        print(benchlib.comparison_table(rows[-1:], extra=("matches",)).splitlines()[-1], file=sys.stderr, flush=True)
    return rows


def zoo_child(spec: dict) -> None:
    import torch

    if spec["task"] == "weights":
        zoo_weights(spec["name"], Path(spec["folder"]), Path(spec["image"]))
        benchlib.emit_result({"done": True})
        return
    torch.set_num_threads(spec["threads"])
    benchlib.emit_result(zoo_measure(spec["side"], spec["row"], spec["images"], spec["stream_images"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of images (sorted by name)")
    parser.add_argument("--stream-images", type=int, default=3,
                        help="throughput on every pair of the first K images (K(K-1)/2 pairs, each image in K-1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--res", type=int, nargs=2, default=(560, 864), metavar=("COARSE", "UPSAMPLE"),
                        help="RoMa resolutions (romatch's defaults; smaller only to try the script out)")
    parser.add_argument("--official", action="store_true", help="use the official weight files (no download)")
    parser.add_argument("--frames", type=int, default=12, help="frames of the generated plane scene")
    parser.add_argument("--oracle-matches", type=int, default=10000, help="samples per pair (RoMa's default)")
    parser.add_argument("--radius", type=float, default=3.0, help="anchored mode: match radius in px")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true", help="skip the separate-process memory runs")
    parser.add_argument("--skip-modes", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--zoo", nargs="*", choices=sorted(ZOO), metavar="NAME",
                        help=f"instead of the above: these backends against their references (none given: all of "
                             f"{', '.join(ZOO)}), medians of --repeats alternating runs in fresh processes")
    parser.add_argument("--repeats", type=int, default=3, help="--zoo: alternating runs per side")
    parser.add_argument("--threads", type=int, default=2, help="--zoo: torch threads")
    parser.add_argument("--zoo-weights", type=Path, help="--zoo: folder of random weight files, made where missing "
                                                           "(default: a fresh temporary folder)")
    parser.add_argument("--worker", choices=("ours", "romatch", "interleaved"), help=argparse.SUPPRESS)
    parser.add_argument("--zoo-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.zoo_child:
        zoo_child(__import__("json").loads(args.zoo_child))
        return 0
    if args.zoo is not None:
        images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        rows = zoo(args.zoo or list(ZOO), images, args.stream_images, args.repeats, args.threads, args.zoo_weights)
        pairs = args.stream_images * (args.stream_images - 1) // 2
        print(f"CPU, {args.threads} threads, every pair of the first {args.stream_images} images of {args.images} "
              f"({pairs} pairs) after one warm-up pair, one fresh process per measurement (peak = its VmHWM), "
              f"medians of {args.repeats} alternating runs, random weights; matches = mean per pair (warp cells for a warp row), ours/reference")
        print(benchlib.comparison_table(rows, markdown=args.markdown, extra=("matches",)))
        return 0
    measures_roma = args.worker or not (args.skip_throughput and args.skip_memory)
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")) \
        if measures_roma else []  # the keypoint modes run on a generated scene
    if args.worker:
        measure = interleaved if args.worker == "interleaved" else functools.partial(worker, args.worker)
        benchlib.emit_result(measure(images, args.stream_images, args.device, args.official, args.res))
        return 0
    if measures_roma and len(images) < args.stream_images + 2:
        parser.error(f"need {args.stream_images + 2} images in {args.images} (stream + warm-up pair)")
    pairs = args.stream_images * (args.stream_images - 1) // 2
    setting = (f"RoMa outdoor, coarse {args.res[0]}, upsample {args.res[1]}, symmetric, 10000 matches, {args.device}, "
               f"{'official' if args.official else 'random'} weights, every pair of the first {args.stream_images} "
               f"images of {args.images} ({pairs} pairs) after one warm-up pair")
    if not args.skip_throughput:
        both = in_child("interleaved", args.images, args.stream_images, args.device, args.official, args.res)
        print(setting)
        print("One process, the two paths alternating pair by pair (and which goes first):")
        rows = [{**row, "ratio": row["romatch"] / row["ours"]} for row in both["per_pair"]]
        print(benchlib.table(rows, markdown=args.markdown))
        print(f"total: ours {both['ours']:.1f} s ({both['ours_encodes']} images encoded in "
              f"{both['ours_encode_s']:.1f} s), romatch {both['romatch']:.1f} s ({2 * both['pairs']} encodings); "
              f"throughput ratio ours/romatch: {both['romatch'] / both['ours']:.2f}\n")
        times = sampling_times(args.device)
        print(f"sampling 10000 matches from an 864x1728 symmetric warp: ours {times['ours_sampling']:.2f} s, "
              f"romatch {times['romatch_sampling']:.2f} s\n")
    if not args.skip_memory:
        rows = throughput(images, args.stream_images, args.device, args.official, args.res)
        print(setting)
        print("Separate processes (peak memory above the level after warm-up):")
        print(benchlib.table(rows, markdown=args.markdown))
        print(f"peak memory ratio ours/romatch: {rows[0]['peak_mb'] / max(rows[1]['peak_mb'], 1e-9):.2f}\n")
    if not args.skip_modes:
        print(f"Keypoint modes, generated plane scene ({args.frames} frames, 640x480), exact dense warp, "
              f"{args.oracle_matches} samples per pair")
        print(benchlib.table(keypoint_modes(args.frames, args.oracle_matches, args.radius), markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
