"""ALIKED (Zhao et al. 2023) through kornia's `kornia.feature.ALIKED`, with recon's weight handling.

`ALIKED.from_pretrained` downloads and loads with `strict=False`; here the model is built randomly initialised
and the official checkpoint (Shiaoming/ALIKED `models/<name>.pth`, the file LightGlue's ALIKED also loads, strictly)
is loaded strictly. Defaults follow LightGlue's extractor (threshold 0.2, NMS radius 2, longer side 1024) with
a keypoint cap; any image size works (kornia pads internally). Keypoints are sub-pixel in hloc's convention,
descriptors L2-normalised. No official SHA-256 is published.
"""

from __future__ import annotations

from typing import Any, ClassVar

from kornia.feature import ALIKED as KorniaALIKED

from .base import LocalFeatures
from .errors import ConfigError
from .weights import WeightFile, load_checkpoint, load_state_dict_strict

_ALIKED = "https://github.com/Shiaoming/ALIKED/raw/main/models"
ALIKED_WEIGHTS = {name: WeightFile(f"{name}.pth", f"{_ALIKED}/{name}.pth")
                  for name in ("aliked-n16", "aliked-n16rot", "aliked-n32", "aliked-t16")}


class ALIKED(LocalFeatures):
    default_conf = {
        "variant": "aliked-n16",
        "max_keypoints": 4096,
        "resize_max": 1024,
        "detection_threshold": 0.2,  # > 0: maxima above it (at most max_keypoints); <= 0: top-k
        "nms_radius": 2,
        "weights": None,  # explicit checkpoint path
    }
    weight_files: ClassVar[dict[str, Any]] = {name: (file,) for name, file in ALIKED_WEIGHTS.items()}
    channels_last = True
    descriptor_family = "aliked"

    def _init(self, conf) -> None:
        if conf.variant not in ALIKED_WEIGHTS:
            raise ConfigError(f"unknown ALIKED variant '{conf.variant}'; known: {', '.join(ALIKED_WEIGHTS)}")
        weight = ALIKED_WEIGHTS[conf.variant]
        self.model = KorniaALIKED(conf.variant, max_num_keypoints=conf.max_keypoints or -1,
                                  detection_threshold=conf.detection_threshold, nms_radius=conf.nms_radius)
        load_state_dict_strict(self.model, load_checkpoint(weight, conf.weights), weight.filename)
        self.prepare_network(self.model)

    def _extract(self, image):
        features = self.model(image)[0]
        return {"keypoints": features.keypoints, "descriptors": features.descriptors,
                "scores": features.keypoint_scores}
