"""DISK (Tyszkiewicz et al. 2020) through kornia's `kornia.feature.DISK`, with recon's weight handling.

kornia's network and NMS are used as they are; `DISK.from_pretrained` would download, so the model is built
randomly initialised and the official checkpoint (a dict whose `extractor` entry is the state dict) is loaded
strictly. Defaults follow hloc's `disk` preset (5000 keypoints, longer side 1600); sides are floored to a multiple
of 16, the U-Net's stride, instead of being padded. kornia returns integer pixel maxima in hloc's convention
(pixel centres at integer coordinates) and L2-normalised descriptors. No official SHA-256 is published.
"""

from __future__ import annotations

from typing import Any, ClassVar

from kornia.feature import DISK as KorniaDISK

from .base import LocalFeatures
from .errors import ConfigError, WeightsError
from .weights import WeightFile, load_checkpoint, load_state_dict_strict

_DISK = "https://raw.githubusercontent.com/cvlab-epfl/disk/master"
DISK_WEIGHTS = {
    "depth": WeightFile("depth-save.pth", f"{_DISK}/depth-save.pth", note="trained with depth supervision (default)"),
    "epipolar": WeightFile("epipolar-save.pth", f"{_DISK}/epipolar-save.pth", note="trained with epipolar supervision"),
}


class DISK(LocalFeatures):
    default_conf = {
        "variant": "depth",
        "max_keypoints": 5000,
        "resize_max": 1600,
        "nms_window": 5,
        "score_threshold": 0.0,
        "weights": None,  # explicit checkpoint path
    }
    size_multiple = 16
    descriptor_family = "disk"
    weight_files: ClassVar[dict[str, Any]] = {name: (file,) for name, file in DISK_WEIGHTS.items()}

    def _init(self, conf) -> None:
        if conf.variant not in DISK_WEIGHTS:
            raise ConfigError(f"unknown DISK variant '{conf.variant}'; known: {', '.join(DISK_WEIGHTS)}")
        weight = DISK_WEIGHTS[conf.variant]
        checkpoint = load_checkpoint(weight, conf.weights)
        if not isinstance(checkpoint, dict) or "extractor" not in checkpoint:
            raise WeightsError(f"'{weight.filename}' is not a DISK checkpoint (no 'extractor' entry)")
        self.model = KorniaDISK()
        load_state_dict_strict(self.model, checkpoint["extractor"], weight.filename)
        self.model.eval().to(self.device)

    def _extract(self, image):
        if image.shape[1] != 3:
            raise ConfigError("DISK needs RGB images; do not set grayscale=true")
        features = self.model(image, n=self.conf.max_keypoints, window_size=self.conf.nms_window,
                              score_threshold=self.conf.score_threshold)[0]
        return {"keypoints": features.keypoints, "descriptors": features.descriptors,
                "scores": features.detection_scores}
