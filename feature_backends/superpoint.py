"""SuperPoint (DeTone et al. 2018) with MagicLeap's v1 weights, as hloc and LightGlue run it.

`recon run --features superpoint --matcher lightglue` is hloc's `superpoint_aachen` + `superpoint+lightglue`
configuration. kornia has no SuperPoint, hence this ~40-line network (`SuperPointNet`, the layer names of
MagicLeap's release, which cvg's, hloc's, GIM's and MINIMA's copies share) and the detection rule below; GIM's
SuperPoint (feature_backends.gim_lightglue) reuses both with its own weights.

Detection follows cvg's LightGlue extractor and hloc's (MagicLeap's SuperGlue code), which agree: softmax over 65
channels, depth-to-space to full resolution, NMS by max-pooling with two rounds of suppression (so a maximum next
to a suppressed one survives), scores of the `remove_borders` outer pixels set to -1, threshold, top-k by score;
descriptors are sampled bilinearly at the keypoints from the L2-normalised 1/8-resolution map with the "legacy"
cell-centre mapping both use (hloc's `fix_sampling` is off by default), then renormalised. On CPU the network runs
in channels_last layout (base.LocalFeatures), which changes its arithmetic in rounding only.

Defaults are hloc's `superpoint_aachen` preset over hloc's SuperPoint defaults: 4096 keypoints, NMS radius 3,
threshold 0.005, 4-pixel border, grayscale, longer side 1024 (INTER_AREA, no rounding of the sides, as hloc).
LightGlue's own extractor differs in threshold (0.0005) and NMS radius (4); pass them with --conf to reproduce it.

Weights: `superpoint_v1.pth`, the file cvg's LightGlue downloads from its v0.1_arxiv release (the same MagicLeap
weights hloc loads from the SuperGluePretrainedNetwork submodule); a plain state dict, loaded strictly. No
official SHA-256 is published. Licence: MagicLeap's weights are for non-commercial research use only.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import Conf, LocalFeatures
from .weights import WeightFile, load_checkpoint, load_state_dict_strict

SUPERPOINT_V1 = WeightFile(
    "superpoint_v1.pth", "https://github.com/cvg/LightGlue/releases/download/v0.1_arxiv/superpoint_v1.pth",
    note="MagicLeap SuperPoint v1 (non-commercial licence)",
)


class SuperPointNet(nn.Module):
    """SuperPoint's VGG encoder and its two heads, with the layer names of MagicLeap's release."""

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
        """Gray (B, 1, H, W) → dense scores (B, 8*(H//8), 8*(W//8)) and descriptors (B, 256, H//8, W//8)."""
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


def non_maximum_suppression(scores: torch.Tensor, radius: int) -> torch.Tensor:
    """SuperPoint's max-pool NMS on (B, H, W): maxima of their (2r+1)² window, then two rounds in which maxima
    of what is left outside the suppressed zones are added; everything else becomes 0."""
    if radius <= 0:
        return scores

    def max_pool(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2 * radius + 1, stride=1, padding=radius)

    zeros = torch.zeros_like(scores)
    is_max = scores == max_pool(scores)
    for _ in range(2):
        suppressed = max_pool(is_max.float()) > 0
        remaining = torch.where(suppressed, zeros, scores)
        is_max = is_max | ((remaining == max_pool(remaining)) & ~suppressed)
    return torch.where(is_max, scores, zeros)


def sample_descriptors(descriptors: torch.Tensor, keypoints: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """(1, D, h, w) map sampled at (N, 2) pixel keypoints → (N, D) unit vectors.

    The "legacy" mapping of MagicLeap, cvg and hloc: pixel `cell/2 - 0.5` is the first map column and
    `w*cell - cell/2 - 0.5` the last, sampled with align_corners=True (the pretrained heads expect it)."""
    height, width = descriptors.shape[-2:]
    span = torch.tensor([width * cell - cell / 2 - 0.5, height * cell - cell / 2 - 0.5], device=keypoints.device)
    grid = (keypoints - cell / 2 + 0.5) / span * 2 - 1
    sampled = F.grid_sample(descriptors, grid[None, None].to(descriptors.dtype), mode="bilinear",
                            align_corners=True)
    return F.normalize(sampled[0, :, 0], dim=0).T


class SuperPoint(LocalFeatures):
    default_conf = {
        "weights": None,  # explicit checkpoint path
        "max_keypoints": 4096,
        "resize_max": 1024,
        "grayscale": True,
        "nms_radius": 3,
        "detection_threshold": 0.005,
        "remove_borders": 4,
    }
    descriptor_family = "superpoint"
    weight_files: ClassVar[dict[str, Any]] = {"v1": (SUPERPOINT_V1,)}
    #: oneDNN's direct NHWC convolutions: the network at 1024 px on 2 threads 1.41 → 0.92 s
    channels_last = True

    def _init(self, conf: Conf) -> None:
        self.model = SuperPointNet()
        load_state_dict_strict(self.model, load_checkpoint(SUPERPOINT_V1, conf.weights), SUPERPOINT_V1.filename)
        self.prepare_network(self.model)

    def _extract(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if image.shape[1] == 3:  # the weights of cvg's and hloc's RGB → gray conversion
            image = (image * image.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        scores, descriptors = self.model(image)
        scores = non_maximum_suppression(scores, self.conf.nms_radius)[0]
        border = self.conf.remove_borders
        if border:
            scores[:border], scores[-border:], scores[:, :border], scores[:, -border:] = -1, -1, -1, -1
        ys, xs = torch.nonzero(scores > self.conf.detection_threshold, as_tuple=True)
        values = scores[ys, xs]
        if self.conf.max_keypoints is not None and len(values) > self.conf.max_keypoints:
            values, order = values.topk(self.conf.max_keypoints)
            ys, xs = ys[order], xs[order]
        keypoints = torch.stack([xs, ys], dim=-1).float()
        return {"keypoints": keypoints, "descriptors": sample_descriptors(descriptors, keypoints), "scores": values}
