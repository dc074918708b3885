"""DaD keypoints ("Distilled Reinforcement Learning for Diverse Keypoint Detection"), described with DeDoDe.

There is no pip package for DaD, so the detector is assembled here from kornia's DeDoDe pieces, following the
official code (Parskatt/dad, `dad/detectors/dedode_detector.py`: `dedode_detector_S`, `DaD`, `load_DaD`; and
`dad/utils.py`: `sample_keypoints`), read through the code-search index:

- Network `dedode_detector_S`: a VGG11-BN encoder (torchvision `vgg11_bn().features[:22]`, features taken before
  each of the four max-pools, strides 1/2/4/8 with 64/128/256/512 channels) and a ConvRefiner decoder with
  3 hidden blocks per scale: "8": 512→512→257, "4": 512→256→129, "2": 256→64→33, "1": 96→32→2, one logit
  channel. kornia's `ConvRefiner`, `Decoder` and `DeDoDeDetector` have exactly the official module layout and
  forward pass, so only the VGG11 encoder is new (kornia's DeDoDe encoder is VGG19-only); it reuses kornia's
  VGG19 forward. The official checkpoints (`dad.pth`, `dad_light.pth`, `dad_dark.pth`) load strictly, unchanged:
  keys `encoder.layers.<i>.*` and `decoder.layers.<scale>.{block1,hidden_blocks.<j>,out_conv}.*`.
- Input: RGB, ImageNet-normalised; longer side 1024 keeping the aspect ratio, sides floored to a multiple of 8.
- Selection (ours, written from the official behaviour): softmax over all H*W logits → 3x3 NMS (a pixel survives
  when it equals the max of its 3x3 window) → optional 4-pixel border removal → the top-k by probability → sub-pixel
  refinement: a softmax of the raw logits of the 3x3 window at temperature 0.5 gives the expected offset in
  [-1, 1] px (logits outside the image count as 0, as the official zero-padded unfold does).

Departures from the official `detect`, all deliberate:
- Border removal: the official `DaD` class sets `remove_borders=False`; the 4-px removal exists in its
  `sample_keypoints` but is off for DaD. It is a conf key here, default off, to match the published model.
- Top-k is a stable sort (ties broken by raster order) instead of `torch.topk`, whose order among equal values is
  unspecified, and only NMS survivors are returned: the official top-k fills `num_keypoints` with suppressed
  pixels (probability 0) when an image has fewer maxima; those are not keypoints.
- Precision: the official ConvRefiner and VGG autocast to float16 on whatever device the model is on, CPU
  included. Here mixed precision runs on CUDA only (feature_backends.base), CPU stays float32.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from kornia.feature.dedode.decoder import ConvRefiner, Decoder
from kornia.feature.dedode.detector import DeDoDeDetector
from kornia.feature.dedode.encoder import VGG19
from kornia.feature.dedode.vgg import vgg11_bn
from torch import nn

from .dedode import DetectorDescriptorBackend
from .errors import ConfigError
from .weights import WeightFile

_DAD = "https://github.com/Parskatt/dad/releases/download/v0.1.0"
DAD_WEIGHTS: dict[str, WeightFile] = {
    "dad": WeightFile("dad.pth", f"{_DAD}/dad.pth", note="distilled DaD (default)"),
    "dad_light": WeightFile("dad_light.pth", f"{_DAD}/dad_light.pth", note="emergent detector for bright structures"),
    "dad_dark": WeightFile("dad_dark.pth", f"{_DAD}/dad_dark.pth", note="emergent detector for dark structures"),
}

# scale → (input, hidden, output) channels of the ConvRefiners of the official `dedode_detector_S`.
DETECTOR_S_LAYOUT = {"8": (512, 512, 256 + 1), "4": (256 + 256, 256, 128 + 1), "2": (128 + 128, 64, 32 + 1),
                     "1": (64 + 32, 32, 1 + 1)}
DETECTOR_S_HIDDEN_BLOCKS = 3


class VGG11Encoder(VGG19):
    """VGG11-BN features[:22] with kornia's VGG19 forward (maps before each max-pool)."""

    def __init__(self, amp: bool = True, amp_dtype: torch.dtype = torch.float16) -> None:
        nn.Module.__init__(self)  # VGG19.__init__ would build (and randomly initialise) a VGG19 first
        self.layers = nn.ModuleList(vgg11_bn().features[:22])
        self.amp = amp
        self.amp_dtype = amp_dtype


def dad_detector(amp_dtype: torch.dtype = torch.float16) -> DeDoDeDetector:
    refiners = nn.ModuleDict({
        scale: ConvRefiner(in_dim, hidden, out, hidden_blocks=DETECTOR_S_HIDDEN_BLOCKS, residual=True, amp=True,
                           amp_dtype=amp_dtype)
        for scale, (in_dim, hidden, out) in DETECTOR_S_LAYOUT.items()
    })
    return DeDoDeDetector(encoder=VGG11Encoder(amp_dtype=amp_dtype), decoder=Decoder(refiners, num_prototypes=1))


def select_keypoints(
    logits: torch.Tensor,
    num_keypoints: int | None,
    nms_size: int = 3,
    border: int = 0,
    subpixel_temperature: float | None = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DaD's keypoint selection on (B,1,H,W) logits.

    Returns keypoints (B,N,2) in hloc pixel coordinates and their probabilities (B,N), sorted by decreasing
    probability; N = min(num_keypoints, fewest NMS survivors in the batch).
    """
    batch, _, height, width = logits.shape
    logits = logits.float()
    probs = logits.reshape(batch, -1).softmax(dim=-1).reshape(batch, 1, height, width)
    if nms_size > 1:
        window_max = F.max_pool2d(probs, nms_size, stride=1, padding=nms_size // 2)
        probs = probs * (probs == window_max)
    if border > 0:
        frame = torch.zeros_like(probs)
        frame[..., border:height - border, border:width - border] = 1
        probs = probs * frame
    flat = probs.reshape(batch, -1)
    available = int((flat > 0).sum(dim=1).min())
    count = available if num_keypoints is None else min(num_keypoints, available)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :count]
    scores = flat.gather(1, order)
    rows, cols = order // width, order % width
    keypoints = torch.stack((cols, rows), dim=-1).to(logits.dtype)
    if subpixel_temperature:
        radius = nms_size // 2
        # (B, k*k, H*W) windows of raw logits, zero outside the image, row-major within the window.
        windows = F.unfold(logits, kernel_size=nms_size, padding=radius)
        patch = windows.gather(2, order[:, None, :].expand(-1, nms_size * nms_size, -1))
        weights = (patch / subpixel_temperature).softmax(dim=1)
        steps = torch.arange(-radius, radius + 1, device=logits.device, dtype=logits.dtype)
        offset_y, offset_x = torch.meshgrid(steps, steps, indexing="ij")
        offsets = torch.stack((offset_x.reshape(-1), offset_y.reshape(-1)), dim=-1)  # (k*k, 2)
        keypoints = keypoints + torch.einsum("bkn,kd->bnd", weights, offsets)
    return keypoints, scores


class DaD(DetectorDescriptorBackend):
    default_conf = {
        "detector": "dad",  # dad | dad_light | dad_dark
        "max_keypoints": 4096,
        "resize_max": 1024,
        "nms_size": 3,
        "remove_borders": False,  # official DaD default; True removes a 4-px frame as the official option does
        "subpixel_temperature": 0.5,  # None disables sub-pixel refinement
    }
    size_multiple = 8
    border_pixels: ClassVar[int] = 4
    detector_weights = DAD_WEIGHTS

    def _build_detector(self, conf, amp_dtype: torch.dtype) -> nn.Module:
        if conf.nms_size < 1 or conf.nms_size % 2 == 0:
            raise ConfigError(f"nms_size must be an odd positive integer, got {conf.nms_size}")
        return dad_detector(amp_dtype)

    def _select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return select_keypoints(
            logits, self.conf.max_keypoints, nms_size=self.conf.nms_size,
            border=self.border_pixels if self.conf.remove_borders else 0,
            subpixel_temperature=self.conf.subpixel_temperature,
        )
