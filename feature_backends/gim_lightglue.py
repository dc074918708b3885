"""GIM's SuperPoint + LightGlue (gim_lightglue_100h.ckpt): one checkpoint, two backends.

`recon run --features gim-superpoint --matcher gim-lightglue`. The checkpoint is a PyTorch-Lightning file whose
'state_dict' holds SuperPoint under 'superpoint.' and LightGlue under 'model.' (GIM's demo splits it the same
way). LightGlue is kornia's, in its SuperPoint configuration (256-d descriptors, no scale/orientation), loaded
through feature_backends.lightglue's strict loader; GIM's LightGlue is glue-factory's implementation with the same
parameter names. GIM's extraction settings: max 2048 keypoints, NMS radius 3, detection threshold 0, LightGlue
filter threshold 0.1 without adaptive depth/width (GIM's demo disables neither explicitly; we disable both, as the
pruning only changes speed, and this keeps CPU and CUDA results identical).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from kornia.feature import LightGlue as KorniaLightGlue
from torch import nn

from .base import Conf, LocalFeatures, StateDictBackend
from .errors import WeightsError
from .lightglue import DERIVED_BUFFERS, LightGlue, rename_legacy_keys
from .weights import WeightFile, load_state_dict_strict, strip_prefix

GIM_LIGHTGLUE = WeightFile(
    "gim_lightglue_100h.ckpt", "https://github.com/xuelunshen/gim/raw/main/weights/gim_lightglue_100h.ckpt",
    note="one Lightning checkpoint: 'superpoint.*' = SuperPoint, 'model.*' = LightGlue (both needed)",
)


class SuperPointNet(nn.Module):
    """SuperPoint (DeTone et al. 2018) with the layer names of MagicLeap's release, cvg's and GIM's copies.

    kornia has no SuperPoint, hence this ~40-line network. Detection follows cvg's LightGlue extractor: softmax
    over 65 channels, depth-to-space to full resolution, non-maximum suppression, border removal, top-k;
    descriptors are sampled bilinearly at the keypoints from the L2-normalised 1/8-resolution map.
    """

    def __init__(self):
        super().__init__()
        def conv(inp: int, out: int, kernel: int = 3) -> nn.Conv2d:
            return nn.Conv2d(inp, out, kernel, padding=kernel // 2)

        self.conv1a, self.conv1b = conv(1, 64), conv(64, 64)
        self.conv2a, self.conv2b = conv(64, 64), conv(64, 64)
        self.conv3a, self.conv3b = conv(64, 128), conv(128, 128)
        self.conv4a, self.conv4b = conv(128, 128), conv(128, 128)
        self.convPa, self.convPb = conv(128, 256), conv(256, 65, 1)
        self.convDa, self.convDb = conv(128, 256), conv(256, 256, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gray (B, 1, H, W) → dense scores (B, H', W') at 8x the feature map and descriptors (B, 256, H/8, W/8)."""
        x = image
        for first, second, pool in ((self.conv1a, self.conv1b, True), (self.conv2a, self.conv2b, True),
                                    (self.conv3a, self.conv3b, True), (self.conv4a, self.conv4b, False)):
            x = F.relu(second(F.relu(first(x))))
            if pool:
                x = F.max_pool2d(x, 2, 2)
        scores = F.softmax(self.convPb(F.relu(self.convPa(x))), dim=1)[:, :-1]
        batch, _, height, width = scores.shape
        scores = scores.permute(0, 2, 3, 1).reshape(batch, height, width, 8, 8)
        scores = scores.permute(0, 1, 3, 2, 4).reshape(batch, height * 8, width * 8)
        descriptors = F.normalize(self.convDb(F.relu(self.convDa(x))), dim=1)
        return scores, descriptors


def _non_maximum_suppression(scores: torch.Tensor, radius: int) -> torch.Tensor:
    """Keep a score only where it is the maximum of its (2r+1)² window."""
    if radius <= 0:
        return scores
    local_max = F.max_pool2d(scores[:, None], 2 * radius + 1, stride=1, padding=radius)[:, 0]
    return torch.where(scores == local_max, scores, torch.zeros_like(scores))


class GIMSuperPoint(StateDictBackend, LocalFeatures):
    """SuperPoint with GIM's weights (the 'superpoint.' half of gim_lightglue_100h.ckpt); GIM's settings."""

    default_conf = {
        "weights": None,
        "max_keypoints": 2048,
        "resize_max": 1024,
        "grayscale": True,
        "nms_radius": 3,
        "detection_threshold": 0.0,
        "remove_borders": 4,
    }
    size_multiple = 8
    #: GIM trained SuperPoint and LightGlue together: its descriptors fit GIM's LightGlue only.
    descriptor_family = "gim-superpoint"
    weight_files = {"gim": (GIM_LIGHTGLUE,)}

    @classmethod
    def checkpoint_files(cls, conf: Conf) -> dict[str, tuple[WeightFile, str | None]]:
        return {"weights": (GIM_LIGHTGLUE, conf.weights)}

    def _init(self, conf: Conf) -> None:
        checkpoint = self.load_checkpoints(conf)["weights"]
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
        if state is None:
            raise WeightsError("the GIM LightGlue checkpoint is not a dict")
        self.model = SuperPointNet()
        load_state_dict_strict(self.model, strip_prefix(state, "superpoint."), "GIM SuperPoint weights")
        self.model.eval().to(self.device)

    def _extract(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        scores, descriptors = self.model(image)
        scores = _non_maximum_suppression(scores, self.conf.nms_radius)[0]
        border = self.conf.remove_borders
        if border:
            scores[:border], scores[-border:], scores[:, :border], scores[:, -border:] = -1, -1, -1, -1
        ys, xs = torch.nonzero(scores > self.conf.detection_threshold, as_tuple=True)
        values = scores[ys, xs]
        if self.conf.max_keypoints is not None and len(values) > self.conf.max_keypoints:
            values, order = values.topk(self.conf.max_keypoints)
            ys, xs = ys[order], xs[order]
        keypoints = torch.stack([xs, ys], dim=-1).float()
        # Descriptor cell centres: the map's pixel i covers image pixels 8i..8i+7 (cvg's sampling).
        height, width = descriptors.shape[-2:]
        grid = (keypoints - 3.5) / torch.tensor([width * 8 - 4.5, height * 8 - 4.5], device=keypoints.device)
        sampled = F.grid_sample(descriptors, (grid * 2 - 1)[None, None], mode="bilinear", align_corners=True)
        sampled = F.normalize(sampled[0, :, 0], dim=0)
        return {"keypoints": keypoints, "descriptors": sampled.T, "scores": values}


class GIMLightGlue(LightGlue, StateDictBackend):
    """kornia's LightGlue (SuperPoint configuration) with the 'model.' half of GIM's checkpoint."""

    default_conf = {"features": "superpoint", "depth_confidence": -1, "width_confidence": -1}
    weight_files = {"gim": (GIM_LIGHTGLUE,)}

    @classmethod
    def checkpoint_files(cls, conf: Conf) -> dict[str, tuple[WeightFile, str | None]]:
        return {"weights": (GIM_LIGHTGLUE, conf.weights)}

    def _init(self, conf: Conf) -> None:
        self.features = "superpoint"
        preset = {k: v for k, v in KorniaLightGlue.features["superpoint"].items() if k != "weights"}
        self.model = KorniaLightGlue(
            features=None, **preset, filter_threshold=conf.filter_threshold,
            depth_confidence=conf.depth_confidence, width_confidence=conf.width_confidence, flash=conf.flash,
            mp=self.device.type == "cuda" and conf.mixed_precision,
        )
        checkpoint = self.load_checkpoints(conf)["weights"]
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else {}
        lightglue = rename_legacy_keys(strip_prefix(state, "model."), self.model.conf.n_layers)
        load_state_dict_strict(self.model, lightglue, GIM_LIGHTGLUE.filename, derived=DERIVED_BUFFERS)
        self.model.eval().to(self.device)
