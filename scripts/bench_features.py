"""Throughput and peak memory of recon's learned sparse backends against the reference implementation (kornia).

    python scripts/bench_features.py [--images DIR] [--num-images 3] [--markdown] [--weights-dir DIR]

Per backend, on CPU at the backend's default resolution: extraction images/s, matching pairs/s and peak resident
memory, for recon's backend and for the reference called directly in the same run, with the ratio ours/reference.
Every measurement runs in a fresh subprocess, so peak memory is that process's own high-water mark (VmHWM;
tracemalloc does not see torch's allocations, and a child's ru_maxrss starts at its parent's size, see
benchlib.peak_rss_mb) and no measurement inherits another's caches. Both sides get the same image, resized the
same way, and the same weights; the reference timing includes the same resize and tensor conversion.

Ours and the reference alternate, each `--repeats` times (default 3), and the table reports the median rate and
the median peak memory of each side: on this shared 2-core machine single runs vary by ±5 % in speed and ±100 MB
in peak RSS (glibc arenas), more than the differences being measured.

Matching is measured on features extracted beforehand in another process and loaded from an .npz file, so the
matcher's peak memory is not buried under the extractor's (DISK at 1600 px alone peaks at ~4 GB).

Without `--weights-dir` the networks get random weights of the official shapes (this machine has no pretrained
files): speed and memory do not depend on the weight values, only on the keypoint counts, which random detectors
still fill to `max_keypoints`. References: kornia for DeDoDe, DISK, ALIKED, XFeat, LightGlue (also LighterGlue and
MINIMA's LightGlue, which is LightGlue's SuperPoint configuration with other weights) and MNN (`match_smnn`); for SuperPoint, cvg's copy inside the `dad-detector` wheel;
for dual-softmax, the official `DualSoftMaxMatcher.match` rule written out in torch as the official code runs it
(einsum, both softmaxes, `nonzero` of the mutual-max mask), since DeDoDe's matcher ships only in its git
repository and kornia has no sparse dual-softmax. For DaD, the authors' package (`dad-detector`, `dad.load_DaD()`
with its float16 CPU autocast switched off, as ours runs float32 on CPU) detects and kornia's DeDoDe-B describes,
on the same PIL-resized input.

Not here: the dense matchers (LoFTR family, XFeat*, RoMa, RoMa v2) are in bench_dense.py; `loma` and `omniglue` run
published ONNX graphs with onnxruntime, which have no torch reference to compare with and could not be downloaded
here (a benchmark on the tests' stand-in graphs would measure nothing of the real networks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # scripts/benchlib.py, next to this file

REPO = Path(__file__).resolve().parents[1]

EXTRACTORS = ("dedode", "dad", "disk", "aliked", "superpoint", "xfeat")
# (matcher, features it runs on, matcher conf, features conf)
MATCHERS = (
    ("mnn", "disk", {}, {}),
    ("dual-softmax", "dedode", {}, {}),
    ("lightglue", "disk", {"features": "disk"}, {}),
    ("lightglue", "superpoint", {"features": "superpoint"}, {}),
    ("lighterglue", "xfeat", {}, {}),
    ("minima-lightglue", "superpoint", {}, {}),
)
#: kornia's LightGlue configuration each matcher runs on a features type
LIGHTGLUE_FEATURES = {("lightglue", "disk"): "disk", ("lightglue", "superpoint"): "superpoint",
                      ("lighterglue", "xfeat"): "xfeat", ("minima-lightglue", "superpoint"): "superpoint"}
#: (matcher, kornia configuration) → its weight file
LIGHTGLUE_FILES = {("lightglue", "disk"): "disk_lightglue.pth", ("lightglue", "superpoint"): "superpoint_lightglue.pth",
                   ("lighterglue", "xfeat"): "xfeat-lighterglue.pt",
                   ("minima-lightglue", "superpoint"): "minima_lightglue.pth"}


def random_xfeat_state() -> dict:
    """Unit-scale random XFeat weights with keypoint logits x3: fills 4096 keypoints at 1200 px (PyTorch's default
    initialisation leaves every heatmap value under XFeat's 0.05 threshold, i.e. no keypoint at all)."""
    from kornia.feature import XFeatModel

    from feature_backends.roma import random_state_dict

    state = random_state_dict(XFeatModel(), seed=0)
    state["keypoint_head.3.weight"] *= 3
    return state


def make_random_weights(folder: Path) -> None:
    import torch
    from kornia.feature import ALIKED, DISK
    from kornia.feature import LightGlue as KorniaLightGlue
    from kornia.feature.dedode.dedode_models import dedode_descriptor_B, dedode_detector_L

    from feature_backends.dad import dad_detector
    from feature_backends.superpoint import SuperPointNet

    def lightglue(features: str) -> dict:
        preset = {k: v for k, v in KorniaLightGlue.features[features].items() if k != "weights"}
        return KorniaLightGlue(features=None, **preset).state_dict()

    torch.manual_seed(0)
    files = {
        "dedode_detector_L_v2.pth": lambda: dedode_detector_L().state_dict(),
        "dedode_descriptor_B.pth": lambda: dedode_descriptor_B().state_dict(),
        "dad.pth": lambda: dad_detector().state_dict(),
        "depth-save.pth": lambda: {"extractor": DISK().state_dict()},
        "aliked-n16.pth": lambda: ALIKED("aliked-n16").state_dict(),
        "superpoint_v1.pth": lambda: SuperPointNet().state_dict(),
        "xfeat.pt": random_xfeat_state,
        **{file: (lambda f=features: lightglue(f)) for (_, features), file in LIGHTGLUE_FILES.items()},
    }
    for name, build in files.items():
        if not (folder / name).exists():
            torch.save(build(), folder / name)


def list_images(folder: Path, count: int) -> list[Path]:
    from feature_backends.images import list_images as names

    return [folder / name for name in names(folder)[:count]]


# --- measurements, each run in its own process ------------------------------------------------------------------

def _ours_extract(name: str, conf: dict):
    from feature_backends.registry import get_backend

    model = get_backend("features", name, conf, device="cpu")
    return model.extract, model.conf


def _reference_extract(name: str, conf: dict):
    """kornia (cvg's SuperPoint from the dad-detector wheel) called directly, with the same resize; returns
    (callable(image), conf)."""
    import torch
    from kornia.feature import ALIKED, DISK, DeDoDe, XFeat

    from feature_backends.images import resize_image
    from feature_backends.registry import resolve

    cls, _ = resolve("features", name)
    defaults = cls.full_default_conf()
    weights = Path(os.environ["RECON_WEIGHTS_DIR"])
    resize, max_keypoints, multiple = defaults["resize_max"], defaults["max_keypoints"], cls.size_multiple
    if name == "dedode":
        model = DeDoDe("L", "B", amp_dtype=torch.float32)
        model.detector.load_state_dict(torch.load(weights / "dedode_detector_L_v2.pth"))
        model.descriptor.load_state_dict(torch.load(weights / "dedode_descriptor_B.pth"))
        run = lambda x: model(x, n=max_keypoints)  # noqa: E731
    elif name == "disk":
        model = DISK()
        model.load_state_dict(torch.load(weights / "depth-save.pth")["extractor"])
        run = lambda x: model(x, n=max_keypoints, pad_if_not_divisible=True)  # noqa: E731
    elif name == "aliked":
        model = ALIKED("aliked-n16", max_num_keypoints=max_keypoints, detection_threshold=0.2)
        model.load_state_dict(torch.load(weights / "aliked-n16.pth"))
        run = model
    elif name == "dad":
        return _reference_dad(defaults, weights)
    elif name == "superpoint":
        try:
            from dad.detectors.third_party.lightglue.superpoint import SuperPoint
        except ImportError:
            return None, None
        state = torch.load(weights / "superpoint_v1.pth")
        torch.hub.load_state_dict_from_url = lambda *args, **kwargs: state  # its constructor would download
        model = SuperPoint(nms_radius=defaults["nms_radius"], detection_threshold=defaults["detection_threshold"],
                           max_num_keypoints=max_keypoints)
        run = lambda x: model({"image": x})  # noqa: E731
    elif name == "xfeat":
        model = XFeat(top_k=max_keypoints)
        model.net.load_state_dict(torch.load(weights / "xfeat.pt"))
        run = model.detectAndCompute
    else:
        return None, None
    model.eval()

    def extract(image):
        resized, _ = resize_image(image, resize, False, multiple)
        with torch.inference_mode():
            return run(torch.from_numpy(resized.transpose(2, 0, 1).copy())[None])

    return extract, defaults


def _reference_dad(defaults: dict, weights: Path):
    """The official DaD detector (PyPI `dad-detector`) + kornia's DeDoDe-B descriptor at its keypoints."""
    import dad
    import torch
    import torch.nn.functional as F
    from kornia.feature.dedode.dedode_models import dedode_descriptor_B

    from feature_backends.dad import official_resize

    detector = dad.load_DaD(resize=defaults["resize_max"], pretrained=False).to("cpu").eval()
    detector.load_state_dict(torch.load(weights / "dad.pth"))
    for module in detector.modules():
        if hasattr(module, "amp"):
            module.amp = False
    descriptor = dedode_descriptor_B(amp_dtype=torch.float32).eval()
    descriptor.load_state_dict(torch.load(weights / "dedode_descriptor_B.pth"))

    def extract(image):
        resized, _ = official_resize(image, defaults["resize_max"])
        with torch.inference_mode():
            x = detector.normalizer(torch.from_numpy(resized.transpose(2, 0, 1).copy()))[None]
            keypoints = detector.detect({"image": x}, num_keypoints=defaults["max_keypoints"])["keypoints"]
            return F.grid_sample(descriptor(x), keypoints[:, None], mode="bilinear", align_corners=False)

    return extract, defaults


def measure_extraction(side: str, name: str, images: list[str], warmup: int) -> dict:
    from feature_backends.images import read_image

    extract, conf = (_ours_extract if side == "ours" else _reference_extract)(name, {})
    if extract is None:
        return {}
    decoded = [read_image(path) for path in images]
    for image in decoded[:warmup]:
        extract(image)
    start = time.perf_counter()
    for image in decoded:
        extract(image)
    seconds = time.perf_counter() - start
    return {"rate": len(decoded) / seconds, "resize_max": conf["resize_max"], "max_keypoints": conf["max_keypoints"]}


def extract_for_matching(features: str, images: list[str], features_file: str) -> None:
    import numpy as np

    from feature_backends.images import read_image
    from feature_backends.registry import get_backend

    extractor = get_backend("features", features, {"normalize_descriptors": False} if features == "dedode" else {},
                            device="cpu")
    arrays = {}
    for i, path in enumerate(images):
        for key, value in extractor.extract(read_image(path)).items():
            arrays[f"{i}/{key}"] = value
    np.savez(features_file, **arrays)


def measure_matching(side: str, matcher: str, features: str, matcher_conf: dict, images: list[str],
                     warmup: int, features_file: str) -> dict:
    import itertools

    import numpy as np
    import torch

    from feature_backends.registry import get_backend

    with np.load(features_file) as stored:
        feats = [{key.split("/", 1)[1]: stored[key] for key in stored.files if key.startswith(f"{i}/")}
                 for i in range(len(images))]
    pairs = list(itertools.combinations(range(len(feats)), 2))
    if side == "ours":
        model = get_backend("matcher", matcher, matcher_conf, device="cpu")
        run = lambda a, b: model.match(a, b)  # noqa: E731
    elif (matcher, features) in LIGHTGLUE_FEATURES:
        from kornia.feature import LightGlue

        kind = LIGHTGLUE_FEATURES[matcher, features]
        model = LightGlue(features=None, **{k: v for k, v in LightGlue.features[kind].items() if k != "weights"})
        model.load_state_dict(torch.load(Path(os.environ["RECON_WEIGHTS_DIR"]) / LIGHTGLUE_FILES[matcher, kind]),
                              strict=False)
        model.eval()

        def run(a, b):
            data = {f"image{i}": {"keypoints": torch.from_numpy(f["keypoints"])[None],
                                  "descriptors": torch.from_numpy(np.ascontiguousarray(f["descriptors"].T))[None],
                                  "image_size": torch.from_numpy(f["image_size"]).float()[None]}
                    for i, f in enumerate((a, b))}
            with torch.inference_mode():
                return model(data)
    elif matcher == "mnn":
        from kornia.feature import match_smnn

        def run(a, b):
            with torch.inference_mode():
                return match_smnn(torch.from_numpy(a["descriptors"].T), torch.from_numpy(b["descriptors"].T), 0.8)
    elif matcher == "dual-softmax":
        def run(a, b):
            # Official DualSoftMaxMatcher.match(normalize=True, inv_temp=20, threshold=0.1) on one pair.
            with torch.inference_mode():
                d0 = torch.from_numpy(np.ascontiguousarray(a["descriptors"].T))[None]
                d1 = torch.from_numpy(np.ascontiguousarray(b["descriptors"].T))[None]
                d0, d1 = d0 / d0.norm(dim=-1, keepdim=True), d1 / d1.norm(dim=-1, keepdim=True)
                corr = torch.einsum("bnd,bmd->bnm", d0, d1) * 20
                p = corr.softmax(dim=-2) * corr.softmax(dim=-1)
                mask = (p == p.max(dim=-1, keepdim=True).values) & (p == p.max(dim=-2, keepdim=True).values) & (p > 0.1)
                return torch.nonzero(mask)
    else:
        return {}
    for i, j in pairs[:warmup]:
        run(feats[i], feats[j])
    start = time.perf_counter()
    for i, j in pairs:
        run(feats[i], feats[j])
    return {"rate": len(pairs) / (time.perf_counter() - start)}


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["task"] == "extract":
        result = measure_extraction(spec["side"], spec["name"], spec["images"], spec["warmup"])
    elif spec["task"] == "prepare":
        extract_for_matching(spec["features"], spec["images"], spec["features_file"])
        result = {"done": True}
    else:
        result = measure_matching(spec["side"], spec["name"], spec["features"], spec["matcher_conf"],
                                  spec["images"], spec["warmup"], spec["features_file"])
    benchlib.emit_result(result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "fountain_p11" / "images")
    parser.add_argument("--num-images", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side; medians are reported")
    parser.add_argument("--weights-dir", type=Path, help="folder with the real weight files (default: random)")
    parser.add_argument("--random-weights", type=Path,
                        help="folder of the random weight files, made where missing and reused by later runs "
                             "(default: a fresh temporary folder)")
    parser.add_argument("--only", nargs="*", help="backends to run, a matcher also as MATCHER:FEATURES (default: all)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0

    images = [str(p) for p in list_images(args.images, args.num_images)]
    weights_dir = args.weights_dir or args.random_weights or Path(tempfile.mkdtemp(prefix="recon-bench-weights-"))
    if not args.weights_dir:
        weights_dir.mkdir(parents=True, exist_ok=True)
        make_random_weights(weights_dir)
    env = {**os.environ, "RECON_WEIGHTS_DIR": str(weights_dir), "RECON_OFFLINE": "1"}
    rows = []
    common = {"images": images, "warmup": args.warmup, "threads": args.threads}

    def alternate(spec: dict) -> tuple[dict, dict]:
        """Ours and the reference in alternation, `--repeats` times; medians of rate and peak memory."""
        medians = benchlib.alternate_children(
            lambda side: [__file__, "--child", json.dumps({**spec, "side": side})], args.repeats, env)
        return medians["ours"], medians["reference"]

    for name in EXTRACTORS:
        if args.only and name not in args.only:
            continue
        ours, ref = alternate({**common, "task": "extract", "name": name})
        rows.append((f"{name} (extract)", f"{ours['resize_max']} px, {ours['max_keypoints']} kp", "img/s", ours, ref))
    features_dir = Path(tempfile.mkdtemp(prefix="recon-bench-features-"))
    for matcher, features, matcher_conf, _ in MATCHERS:
        if args.only and matcher not in args.only and f"{matcher}:{features}" not in args.only:
            continue
        features_file = str(features_dir / f"{features}.npz")
        if not Path(features_file).exists():
            benchlib.run_child([__file__, "--child", json.dumps(
                {**common, "task": "prepare", "side": "ours", "name": features, "features": features,
                 "features_file": features_file})], env)
        ours, ref = alternate({**common, "task": "match", "name": matcher, "features": features,
                               "matcher_conf": matcher_conf, "features_file": features_file})
        rows.append((f"{matcher} (match)", f"on {features}", "pairs/s", ours, ref))

    print(f"CPU, {args.threads} threads, {len(images)} images from {args.images}, medians of {args.repeats} "
          f"alternating runs, "
          f"{'weights from ' + str(args.weights_dir) if args.weights_dir else 'random weights'}")
    print(benchlib.comparison_table(rows, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
