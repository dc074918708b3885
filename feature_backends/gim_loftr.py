"""GIM's LoFTR (Shen et al., ICLR 2024, `gim_loftr_50h.ckpt`): LoFTR with a ResNet-50 backbone on RGB input.

Facts checked against the official code (xuelunshen/gim `networks/loftr/{loftr,config}.py`,
`backbone/resnet.py`, `demo.py`):
- It is not kornia's (zju3dv's) LoFTR: the backbone `backbone.encode` is torchvision's ResNet-50 layout (stem
  conv 7x7 on 3 channels, Bottleneck layers [3, 4, 6], stride in the 3x3 convolution) without its max-pool, so
  layer1/2/3 give strides 2/4/8, and without layer4 and the classifier; the FPN on top has kornia's structure and
  names (layer3_outconv, layer2_outconv(2), layer1_outconv(2)) with block dims [64, 128, 196, 256, 512, 1024]:
  1024 → 256 at 1/8, 512 → 256 → 196 at 1/4, 256 → 196 → 128 at 1/2.
- The rest is LoFTR's: position encoding with `temp_bug_fix=False`, 4 x (self, cross) linear-attention coarse
  layers (d 256, 8 heads), dual-softmax coarse matching (temperature 0.1, threshold 0.2, border 2), a 5x5 fine
  window WITHOUT the coarse feature concatenated (`FINE_CONCAT_COARSE_FEAT = False`, so no `fine_preprocess`
  weights), one (self, cross) fine layer (d 128). Those modules are kornia's here (same names and arithmetic);
  only the backbone is written in this file.
- Input: RGB in [0, 1], no normalisation (`demo.py` feeds `color0`/`color1`), sides floored to multiples of 8.
  GIM's demo matches at the native resolution and its ZEB benchmark at up to 1240-1600 px; the coarse
  dual-softmax matrix grows with the 4th power of the side (1024 px: 12k x 12k cells, 0.6 GB per copy), so the
  default here is the 840 px of LoFTR's MegaDepth evaluation.
- Checkpoint: Lightning `{'state_dict': ...}`; GIM's `LoFTR.load_state_dict` strips a leading `model.` or
  `matcher.` from each key, and so does this loader, then loads strictly.

Measured during development (not in the test suite: GIM's repository is not installable): GIM's own
`networks/loftr` (commit f09105a) and this network have the same 375 state-dict keys and shapes; loaded with the
same random state dict they gave the same 115 matches on a 160x120 RGB pair, keypoints0 identical, keypoints1
within 3.8e-5 px, confidences within 1.2e-6.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import Conf
from .loftr import LoFTRMatcher, kornia_loftr_config
from .weights import WeightFile

GIM_LOFTR = WeightFile(
    "gim_loftr_50h.ckpt", "https://github.com/xuelunshen/gim/raw/main/weights/gim_loftr_50h.ckpt",
    note="committed in the GIM repository (git blob 490fcc53); mirror huggingface.co/Realcat/imcui_checkpoints gim/",
)


class GIMResNetFPN(nn.Module):
    """GIM's backbone: `encode` (ResNet-50 stem + layers 1-3, no max-pool) and an FPN to 1/8 (256) and 1/2 (128)."""

    def __init__(self, block_dims: tuple[int, ...] = (64, 128, 196, 256, 512, 1024)):
        super().__init__()
        from kornia.feature.loftr.backbone.resnet_fpn import conv1x1, conv3x3
        from torchvision.models import resnet50

        encode = resnet50(weights=None)
        del encode.layer4, encode.fc, encode.maxpool, encode.avgpool
        self.encode = encode
        self.layer3_outconv = conv1x1(block_dims[5], block_dims[3])
        self.layer2_outconv = conv1x1(block_dims[4], block_dims[3])
        self.layer2_outconv2 = nn.Sequential(conv3x3(block_dims[3], block_dims[3]), nn.BatchNorm2d(block_dims[3]),
                                             nn.LeakyReLU(), conv3x3(block_dims[3], block_dims[2]))
        self.layer1_outconv = conv1x1(block_dims[3], block_dims[2])
        self.layer1_outconv2 = nn.Sequential(conv3x3(block_dims[2], block_dims[2]), nn.BatchNorm2d(block_dims[2]),
                                             nn.LeakyReLU(), conv3x3(block_dims[2], block_dims[1]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.encode
        x1 = net.layer1(net.relu(net.bn1(net.conv1(x))))  # 1/2
        x2 = net.layer2(x1)  # 1/4
        x3 = net.layer3(x2)  # 1/8
        x3_out = self.layer3_outconv(x3)
        x3_up = F.interpolate(x3_out, scale_factor=2.0, mode="bilinear", align_corners=True)
        x2_out = self.layer2_outconv2(self.layer2_outconv(x2) + x3_up)
        x2_up = F.interpolate(x2_out, scale_factor=2.0, mode="bilinear", align_corners=True)
        x1_out = self.layer1_outconv2(self.layer1_outconv(x1) + x2_up)
        return [x3_out, x1_out]


def gim_loftr_network(match_threshold: float = 0.2) -> nn.Module:
    """kornia's LoFTR with GIM's configuration and GIM's backbone in place of the ResNet-18 FPN."""
    from kornia.feature import LoFTR

    config = kornia_loftr_config(temp_bug_fix=False, match_threshold=match_threshold, fine_concat_coarse_feat=False)
    network = LoFTR(pretrained=None, config=config)
    network.backbone = GIMResNetFPN()
    return network


class GIMLoFTR(LoFTRMatcher):
    """GIM's LoFTR checkpoint; RGB input, Lightning checkpoint with `model.`/`matcher.` prefixes."""

    default_conf: ClassVar[dict[str, Any]] = {"variant": "gim"}
    variants = {"gim": (GIM_LOFTR, False)}
    weight_files = {"gim": (GIM_LOFTR,)}
    checkpoint_prefixes = ("model.", "matcher.")
    grayscale = False

    def build_network(self, conf: Conf) -> nn.Module:
        return gim_loftr_network(conf.match_threshold)
