"""DaD keypoints ("Distilled Reinforcement Learning for Diverse Keypoint Detection"), described with DeDoDe.

The detector is assembled from kornia's DeDoDe pieces; its defaults are those of the authors' entry point
`dad.load_DaD()` in the official package (PyPI `dad-detector` 0.2.2, module `dad`; `dad/detectors/dedode_detector.py`
and `dad/utils.py`), which the parity test runs with the same random weights:

- Network `dedode_detector_S`: a VGG11-BN encoder (torchvision `vgg11_bn().features[:22]`, features taken before
  each of the four max-pools, strides 1/2/4/8 with 64/128/256/512 channels) and a ConvRefiner decoder with
  3 hidden blocks per scale: "8": 512→512→257, "4": 512→256→129, "2": 256→64→33, "1": 96→32→2, one logit
  channel. kornia's `ConvRefiner`, `Decoder` and `DeDoDeDetector` have exactly the official module layout and
  forward pass, so only the VGG11 encoder is new (kornia's DeDoDe encoder is VGG19-only); it reuses kornia's
  VGG19 forward. The official checkpoints (`dad.pth`, `dad_light.pth`, `dad_dark.pth`) load strictly, unchanged:
  keys `encoder.layers.<i>.*` and `decoder.layers.<scale>.{block1,hidden_blocks.<j>,out_conv}.*`.
- Input, as the official `load_image`: every image is resized, up or down, so that its longer side is 1024:
  scale = 1024 / max(W, H), each side `int((scale * side) // 8 * 8)` (floored in float arithmetic, so a side may
  come out 8 px short of 1024), resampled by PIL's `Image.resize` default (bicubic, antialiased when shrinking)
  on the 8-bit RGB image, then /255 and ImageNet mean/std. Here the decoded float image is brought back to 8 bit
  (exact for 8-bit files) for that resize, which is why DaD overrides `resize`. One difference remains: recon
  applies the EXIF orientation (feature_backends.images), the official loader does not.
- Selection, as the official `sample_keypoints` under `load_DaD`'s defaults: softmax over all H*W logits → 3x3 NMS
  (a pixel survives when it equals the max of its 3x3 window) → 4-pixel border removal (`load_DaD` sets
  `remove_borders=True`; the bare `DaD` class defaults to False) → the top-k by probability → sub-pixel
  refinement: a softmax of the raw logits of the 3x3 window at temperature 0.5 gives the expected offset in
  [-1, 1] px (logits outside the image count as 0, as the official zero-padded unfold does). No coverage
  reweighting. Keypoints come out in hloc's convention; the official normalised coordinates with `topleft=0.5`
  are the same points.

Departures from the official `detect`, all deliberate:
- Top-k is a stable sort (ties broken by raster order) instead of `torch.topk`, whose order among equal values is
  unspecified, and only NMS survivors are returned: the official top-k fills `num_keypoints` with suppressed
  pixels (probability 0) when an image has fewer maxima; those are not keypoints.
- Precision: the official ConvRefiner and VGG autocast to float16 on whatever device the model is on, CPU
  included. Here mixed precision runs on CUDA only (feature_backends.base), CPU stays float32 (the parity test
  switches the official autocast off to compare like with like).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from kornia.feature.dedode.decoder import ConvRefiner, Decoder
from kornia.feature.dedode.detector import DeDoDeDetector
from kornia.feature.dedode.encoder import VGG19
from kornia.feature.dedode.vgg import vgg11_bn
from PIL import Image
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


def official_resize(
    image: np.ndarray, resize_max: int | None, force: bool = True, multiple: int = 8
) -> tuple[np.ndarray, tuple[float, float]]:
    """DaD's `load_image` size rule and PIL bicubic resampling on 8-bit RGB; returns the image in [0, 1] and the
    per-axis scale (new / old) as (sx, sy)."""
    height, width = image.shape[:2]
    scale = 1.0
    if resize_max:
        scale = resize_max / max(width, height)
        if not force:
            scale = min(scale, 1.0)
    new_w, new_h = (max(multiple, int((scale * side) // multiple * multiple)) for side in (width, height))
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    if (new_w, new_h) != (width, height):
        # One-channel input stays one channel (the detector then refuses it: DaD needs RGB).
        mode = "RGB" if pixels.shape[2] == 3 else "L"
        resized = Image.fromarray(pixels if mode == "RGB" else pixels[..., 0], mode)
        pixels = np.asarray(resized.resize((new_w, new_h), Image.Resampling.BICUBIC)).reshape(new_h, new_w, -1)
    return pixels.astype(np.float32) / 255.0, (new_w / width, new_h / height)


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
        "resize_max": 1024,  # longer side; None keeps the size (sides still floored to a multiple of 8)
        "resize_force": True,  # the official loader also upscales; False only shrinks
        "nms_size": 3,
        "remove_borders": True,  # a 4-px frame, as `dad.load_DaD()` (the bare official `DaD` class: False)
        "subpixel_temperature": 0.5,  # None disables sub-pixel refinement
    }
    size_multiple = 8
    border_pixels: ClassVar[int] = 4
    detector_weights = DAD_WEIGHTS

    def resize(self, image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
        """The official `load_image` resize (see the module docstring) on the (H,W,3) float image."""
        return official_resize(image, self.conf.resize_max, self.conf.resize_force, self.size_multiple)

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
