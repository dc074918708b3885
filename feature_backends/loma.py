"""LoMa: DaD keypoints, DeDoDe descriptors and the LoMa matcher, as COLMAP 4.2 runs them (ONNX, onnxruntime).

Which recon kinds: a features backend (`loma`: detector + descriptor graphs) and a sparse matcher (`loma`: the
matcher graph). LoMa is a keypoint matcher: it reads keypoints and descriptors only, never the images, so the
per-image work is done once per image and cached in features.h5 like every other detector/descriptor, and the
pair work is the matcher alone. That is also how COLMAP splits it (LomaFeatureExtractor, LomaFeatureMatcher), so
recon's features and COLMAP's are the same arrays; a DenseMatcher would re-run the detector for every pair.

The files and their SHA-256 are those COLMAP pins (colmap/colmap `src/colmap/feature/resources.h`, LoMa commit
0262ac1; the same URL;name;hash strings are compiled into pycolmap 4.2.1's `_core` module, read with `strings`),
so these are the first recon weights verified against a published hash: a file that differs is refused.

The contract, from COLMAP's `loma.cc` (checked when a graph opens, see feature_backends.onnx_models):
- detector: image (1,3,H,W) RGB in [0,1] at the extraction resolution (COLMAP: longer side <= 1600) and
  num_keypoints (1,) int64 → keypoints (1,K,2) in [-1,1] and keypoint_probs (1,K). The DaD network, its
  ImageNet normalisation and its selection are inside the graph.
- descriptor: image (1,3,784,784) (the same image squashed to 784x784, as COLMAP does; "do not change") and the
  detector's keypoints → (1,K,D). DeDoDe-G ("G", COLMAP's LOMA_B) or DeDoDe-B ("B", LOMA_B128).
- matcher: kpts0/kpts1 (1,N,2) in [-1,1] and desc0/desc1 (1,N,D) → m0 (1,N0) int64 (-1 unmatched) and mscores0
  (1,N0) (also m1, mscores1). Variants B, R, L, G match "G" features, B128 matches "B" features.
Normalised coordinates have the image corners at ±1: COLMAP maps x_n to 0.5 (x_n + 1) W with pixel corners at
integers, i.e. hloc's x = 0.5 (x_n + 1) W - 0.5.

Defaults are COLMAP's: 2048 keypoints, min_score 0 for keypoints, 0.1 for matches, fp32 graphs (bf16 ones are
listed). Departure: the descriptor image is resized with OpenCV's INTER_AREA (COLMAP: its Bitmap::Rescale filter,
or OIIO bilinear with use_fast_resize); the two differ by resampling noise only.

What is proven here without the real graphs (tests/test_loma.py): small graphs with exactly these names and
shapes, built in the test, run through the backends and the matching stage; coordinates survive the round trip
to within 1e-4 px; a file with another hash is refused. Not proven: numerical parity with the published LoMa
networks (their graphs could not be downloaded here). With the files, parity against recon's torch backends is
partial by construction: the detector graph is DaD (compare `loma` keypoints with `dad` at the same resolution
and max_keypoints, 0.01 px on the official dad.pth, once its weights and the graph's are the same release), the
descriptors are DeDoDe-G/B (compare with `dedode`'s descriptor on the 784x784 squashed image at the same
keypoints); the LoMa matcher itself has no torch counterpart in recon.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import cv2
import numpy as np
import torch

from .base import LocalFeatures, SparseMatcher
from .errors import ConfigError
from .onnx_models import OnnxGraph, normalized_to_pixels, pixels_to_normalized
from .weights import WeightFile

_LOMA = "https://github.com/davnords/storage/releases/download/loma"


def _file(name: str, sha256: str, note: str) -> WeightFile:
    return WeightFile(name, f"{_LOMA}/{name}", sha256=sha256, note=note)


DETECTOR = _file("loma_detector.onnx", "b6af99c5e730034ac9b675d1ebe05d0679af4569a3c26f10a6a50f91e02dc512",
                 "DaD detector (all LoMa variants)")
#: descriptor variant → (fp32, bf16 or None)
DESCRIPTORS: dict[str, tuple[WeightFile, WeightFile | None]] = {
    "G": (_file("loma_descriptor_dedode_g.onnx", "5a7b9eaf7425d4513c5d7feae86080bae7ed3aceae7fb1b9f059d0752e2ad564",
                "DeDoDe-G descriptor (COLMAP LOMA_B)"),
          _file("loma_descriptor_dedode_g_bf16.onnx",
                "679b3ead5385b2bf0424548ed027edd48f96eb8b7cddcb42344e899cf0d97e7b", "DeDoDe-G descriptor, bf16")),
    "B": (_file("loma_descriptor_dedode_b.onnx", "82660a364299013618fe649092ebc4f617559f6a77e1ab5a3412be62a47ddc2d",
                "DeDoDe-B descriptor (COLMAP LOMA_B128)"), None),
}
_MATCHER_HASHES = {
    "B": ("ba5a2773b29cace19f1240e14e5a080cca3eaf9f69a7adb829a1d470557001c7",
          "e61751cdbac6f305efa0d5b2ddc8f8c8e095b1b7196bfac3ed8d4e29b007f625"),
    "B128": ("e71ad490d13713374433a7ef99a7b4f4877d09338e40f347b7e64cc90150ee16",
             "7dec0563c0955400a7bef18ba0c62a70772c9c5c3bf2734372c32de5f1876c32"),
    "R": ("6c55247068568861d983b6005d9c401a4c62b8f8ea75d1a6925f13b0211407b5",
          "172d214a91e5c12126acc7c7c66804c22ec47b9a8fc572b10ba9711714386e43"),
    "L": ("918da5427f37c3d9e05264a58a4d05729f87d459c3d5d69add7ce72eeacea66d",
          "bab859300bbec88af30705021356f526a374d48ac7917b135d979686ade0ed23"),
    "G": ("62134cde779ed1031982c13c2c1952ed14856d715e97072364821a91f6276cf9",
          "2d21420e1e0e3bcd085cd9a7d33be1f990e820d6b13ffbbddc73d9d04713b6c6"),
}
#: matcher variant → (fp32, bf16)
MATCHERS: dict[str, tuple[WeightFile, WeightFile]] = {
    variant: (_file(f"loma_matcher_{variant}.onnx", fp32, f"LoMa-{variant} matcher"),
              _file(f"loma_matcher_{variant}_bf16.onnx", bf16, f"LoMa-{variant} matcher, bf16"))
    for variant, (fp32, bf16) in _MATCHER_HASHES.items()
}
#: which descriptor each matcher was trained on (COLMAP: LOMA_B128 takes LOMA_B128 features, the rest LOMA_B)
MATCHER_DESCRIPTOR = {"B": "G", "R": "G", "L": "G", "G": "G", "B128": "B"}
DESCRIPTOR_SIZE = 784  # the descriptor graph's fixed input side (COLMAP: "Do not change")


def _explicit(weights: Any, roles: tuple[str, ...]) -> dict[str, Any]:
    if weights is None:
        return {}
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(roles))
        if unknown:
            raise ConfigError(f"unknown 'weights' entries {unknown}; expected a mapping of {list(roles)} to paths")
        return dict(weights)
    if len(roles) == 1:
        return {roles[0]: weights}
    raise ConfigError(f"'weights' must be a mapping of {list(roles)} to paths")


class LoMaFeatures(LocalFeatures):
    default_conf = {
        "descriptor": "G",  # G (DeDoDe-G, COLMAP LOMA_B) | B (DeDoDe-B, LOMA_B128)
        "bf16": False,  # the bf16 descriptor graph (G only), faster on hardware with bf16 kernels
        "max_keypoints": 2048,  # COLMAP's default (2048 or 4096 recommended)
        "resize_max": 1600,  # COLMAP's maximum image size for LoMa
        "min_score": 0.0,  # COLMAP's: DaD's probabilities are not thresholded
        "num_threads": None,  # onnxruntime intra-op threads; None: onnxruntime's default
        "weights": None,  # {"detector": path, "descriptor": path}
    }
    weight_files: ClassVar[dict[str, Any]] = {
        "detector": (DETECTOR,),
        **{f"descriptor {name}": tuple(f for f in files if f) for name, files in DESCRIPTORS.items()},
    }

    @classmethod
    def required_weights(cls, conf):
        if conf.get("descriptor") not in DESCRIPTORS:
            return [(DETECTOR, None)]
        fp32, bf16 = DESCRIPTORS[conf["descriptor"]]
        explicit = _explicit(conf.get("weights"), ("detector", "descriptor"))
        descriptor = bf16 if conf.get("bf16") and bf16 is not None else fp32
        return [(DETECTOR, explicit.get("detector")), (descriptor, explicit.get("descriptor"))]

    def _init(self, conf) -> None:
        if conf.descriptor not in DESCRIPTORS:
            raise ConfigError(f"unknown LoMa descriptor '{conf.descriptor}'; known: {', '.join(DESCRIPTORS)}")
        fp32, bf16 = DESCRIPTORS[conf.descriptor]
        if conf.bf16 and bf16 is None:
            raise ConfigError(f"LoMa descriptor '{conf.descriptor}' has no bf16 graph; set bf16=false")
        if not conf.max_keypoints or conf.max_keypoints < 1:
            raise ConfigError("LoMa's detector needs max_keypoints >= 1 (it returns exactly that many)")
        explicit = _explicit(conf.weights, ("detector", "descriptor"))
        self.detector = OnnxGraph(
            DETECTOR, {"image": (1, 3, None, None), "num_keypoints": (1,)},
            {"keypoints": (1, None, 2), "keypoint_probs": (1, None)},
            explicit.get("detector"), self.device, conf.num_threads)
        descriptor_file = bf16 if conf.bf16 else fp32
        self.descriptor = OnnxGraph(
            descriptor_file, {"image": (1, 3, DESCRIPTOR_SIZE, DESCRIPTOR_SIZE), "keypoints": (1, None, 2)},
            (1, None, None),
            explicit.get("descriptor"), self.device, conf.num_threads)

    def _extract_image(self, image: np.ndarray) -> dict[str, np.ndarray]:
        if image.shape[2] != 3:
            raise ConfigError("LoMa needs RGB images; do not set grayscale=true")
        height, width = image.shape[:2]
        tensor = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)
        detected = self.detector.run(image=tensor, num_keypoints=np.array([self.conf.max_keypoints], np.int64))
        normalized, scores = detected["keypoints"][0], detected["keypoint_probs"][0]
        keep = scores >= self.conf.min_score
        normalized, scores = normalized[keep], scores[keep]
        square = cv2.resize(image, (DESCRIPTOR_SIZE, DESCRIPTOR_SIZE), interpolation=cv2.INTER_AREA
                            if max(height, width) > DESCRIPTOR_SIZE else cv2.INTER_LINEAR)
        square = np.ascontiguousarray(square.transpose(2, 0, 1)[None], dtype=np.float32)
        output = self.descriptor.outputs[0]
        descriptors = self.descriptor.run(image=square, keypoints=np.ascontiguousarray(normalized[None]))[output][0]
        return {"keypoints": normalized_to_pixels(normalized, (width, height)), "descriptors": descriptors,
                "scores": scores}


class LoMaMatcher(SparseMatcher):
    default_conf = {
        "variant": "B",  # B | R | L | G (DeDoDe-G features), B128 (DeDoDe-B features); COLMAP's LOMA_* matchers
        "bf16": False,
        "min_score": 0.1,  # COLMAP's ("matches LG")
        "num_threads": None,
        "weights": None,  # explicit path of the matcher graph
    }
    weight_files: ClassVar[dict[str, Any]] = {name: files for name, files in MATCHERS.items()}
    required_inputs = ("keypoints", "descriptors", "image_size")

    @classmethod
    def conf_for_features(cls, record):
        if record and record.get("backend") == "loma" and (record.get("conf") or {}).get("descriptor") == "B":
            return {"variant": "B128"}
        return {}

    @classmethod
    def required_weights(cls, conf):
        if conf.get("variant") not in MATCHERS:
            return []
        weight = MATCHERS[conf["variant"]][1 if conf.get("bf16") else 0]
        return [(weight, _explicit(conf.get("weights"), ("matcher",)).get("matcher"))]

    def _init(self, conf) -> None:
        if conf.variant not in MATCHERS:
            raise ConfigError(f"unknown LoMa matcher '{conf.variant}'; known: {', '.join(MATCHERS)}")
        weight = MATCHERS[conf.variant][1 if conf.bf16 else 0]
        self.graph = OnnxGraph(
            weight, {"kpts0": (1, None, 2), "kpts1": (1, None, 2), "desc0": (1, None, None), "desc1": (1, None, None)},
            {"m0": (1, None), "mscores0": (1, None)}, _explicit(conf.weights, ("matcher",)).get("matcher"),
            self.device, conf.num_threads)
        self.descriptor_dim = self.graph.input_shapes["desc0"][2]

    def _match(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = {}
        for i in "01":
            descriptors = data[f"descriptors{i}"][0].T.float().cpu().numpy()
            if self.descriptor_dim is not None and descriptors.shape[1] != self.descriptor_dim:
                raise ConfigError(
                    f"LoMa-{self.conf.variant} takes {self.descriptor_dim}-D descriptors, these are "
                    f"{descriptors.shape[1]}-D: extract with --features loma --conf "
                    f"descriptor={MATCHER_DESCRIPTOR[self.conf.variant]}")
            size = data[f"image_size{i}"][0].float().cpu().numpy()
            feeds[f"kpts{i}"] = pixels_to_normalized(data[f"keypoints{i}"][0].cpu().numpy(), size)[None]
            feeds[f"desc{i}"] = np.ascontiguousarray(descriptors[None], dtype=np.float32)
        out = self.graph.run(**feeds)
        matches, scores = out["m0"][0].astype(np.int64), out["mscores0"][0].astype(np.float32)
        matches = np.where((matches >= 0) & (scores >= self.conf.min_score), matches, -1)
        scores = np.where(matches >= 0, scores, 0.0).astype(np.float32)
        return {"matches0": torch.from_numpy(matches)[None], "matching_scores0": torch.from_numpy(scores)[None]}
