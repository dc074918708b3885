"""RoMa (outdoor, indoor, MINIMA's weights) and tiny RoMa, through the official `romatch` package.

The network is romatch's own (`roma_model`, `tiny_roma_v1_model`, `RegressionMatcher.match`), so results are
romatch's; what this wrapper changes is around it:
- Weights never download implicitly. romatch's convenience constructors fetch DINOv2 (and tiny RoMa fetches
  XFeat through torch.hub) whenever a state dict is not passed; here every file goes through
  feature_backends.weights (explicit path → $RECON_WEIGHTS_DIR → torch hub cache → official URL) and the state
  dicts are passed in. Tiny RoMa's XFeat architecture comes from kornia (`XFeatModel`, same module names as
  verlab's); its weights are inside the tiny checkpoint (`xfeat.0.*`).
- Images enter as tensors already in memory: the image is decoded once (feature_backends.images: EXIF, 16-bit,
  grayscale handled) and resized on the device, where romatch's path API decodes each file twice with PIL (coarse
  and upsampled pass) and refuses 16-bit images. Resizing is bicubic with antialiasing, which is PIL's filter, so
  our inputs agree with romatch's to within PIL's 8-bit rounding; the parity test measures the effect.
- ImageNet normalisation is explicit (`normalize`): romatch applies it only on its PIL path and uses tensors
  as given, and GIM's RoMa must not be normalised at all (feature_backends.gim).
- `use_custom_corr` is on only when the optional `fused-local-corr` kernel is importable; romatch defaults it
  to on and then fails with ImportError on Linux without that extra.
- Each image is encoded once per stage, not once per pair: romatch's match() runs the encoder (VGG pyramid and
  DINOv2 at the coarse resolution, VGG again at the upsampling one) on both images of every pair, 2 x 7.8 s of
  a pair's ~80 s at 560/864 on our 2-core CPU (scripts/bench_dense.py). `encode` returns those features (about
  0.5 GB per image at 560/864 in float32) for the dense stage's cache, on the device (a GPU's within half its
  free memory, spilling over to host memory: feature_backends.dense_warp.EncodedWarpMatcher, recon.dense.common),
  and `warp_encoded` feeds them to romatch's own match() in place of its encoder, so the decoder and everything
  after it is romatch's code; the result is bit for bit romatch's with its encoder run one image at a time (the
  parity test), and within float rounding (certainty 1.3e-5) of its batch-of-two encoder. GIM's and MINIMA's
  RoMa inherit this.
- Sampling is feature_backends.dense_warp's seeded, memory-bounded reimplementation of romatch's
  threshold_balanced sampling (see that module for why).

romatch is installed without its declared dependencies: inference needs only einops, loguru, kornia (tiny RoMa's
XFeat), torchvision, opencv and PIL; poselib, wandb, albumentations, timm, h5py and matplotlib are for its
training and benchmark scripts.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .base import Conf, StateDictBackend
from .dense_warp import EncodedWarpMatcher, Warp, WarpMatcher
from .errors import ConfigError, WeightsError
from .weights import DINOV2_VITL14, WeightFile, load_state_dict_strict

ROMA_OUTDOOR = WeightFile(
    "roma_outdoor.pth", "https://github.com/Parskatt/storage/releases/download/roma/roma_outdoor.pth",
    note="RoMa outdoor (MegaDepth); DINOv2 is not inside, see dinov2_vitl14_pretrain.pth",
)
ROMA_INDOOR = WeightFile(
    "roma_indoor.pth", "https://github.com/Parskatt/storage/releases/download/roma/roma_indoor.pth",
    note="RoMa indoor (ScanNet)",
)
TINY_ROMA_OUTDOOR = WeightFile(
    "tiny_roma_v1_outdoor.pth",
    "https://github.com/Parskatt/storage/releases/download/roma/tiny_roma_v1_outdoor.pth",
    note="tiny RoMa v1 with its XFeat backbone inside",
)
MINIMA_ROMA = WeightFile(
    "minima_roma.pth", "https://github.com/LSXI7/storage/releases/download/MINIMA/minima_roma.pth",
    note="MINIMA's RoMa (plain RoMa state dict, cross-modal training)",
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def fused_local_corr_available() -> bool:
    return importlib.util.find_spec("local_corr") is not None


def resolution(value: int | tuple[int, int] | list[int], name: str, multiple: int = 1) -> tuple[int, int]:
    """A conf resolution (int = square, or [h, w]) as (h, w), checked against `multiple`."""
    height, width = (value, value) if isinstance(value, int) else tuple(value)
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ConfigError(f"{name} must be positive multiples of {multiple}, got {value}")
    return int(height), int(width)


def resize_tensor(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic with antialiasing (PIL's filter) to (h, w), clamped back to [0, 1]."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def build_roma(
    state_dict: Mapping[str, torch.Tensor],
    dinov2_state_dict: Mapping[str, torch.Tensor],
    coarse_res: tuple[int, int],
    upsample_res: tuple[int, int] | None,
    symmetric: bool,
    device: torch.device,
    amp_dtype: torch.dtype = torch.float16,
    source: str = "RoMa weights",
):
    """romatch's RegressionMatcher with the given weights; a layout mismatch raises WeightsError."""
    from romatch.models.model_zoo.roma_models import roma_model

    try:
        model = roma_model(
            resolution=coarse_res, upsample_preds=upsample_res is not None, upsample_res=upsample_res,
            weights=dict(state_dict), dinov2_weights=dict(dinov2_state_dict), device=device,
            amp_dtype=amp_dtype if device.type == "cuda" else torch.float32, symmetric=symmetric,
            use_custom_corr=fused_local_corr_available(),
        )
    except RuntimeError as error:  # load_state_dict(strict=True) inside romatch
        first = str(error).splitlines()
        raise WeightsError(f"'{source}' does not fit romatch's RoMa: {' '.join(first[:3])}") from error
    return model.eval()


class RoMa(EncodedWarpMatcher, StateDictBackend):
    """RoMa through romatch. Variants: outdoor (default), indoor, minima (MINIMA's RoMa weights)."""

    default_conf = {
        "variant": "outdoor",
        "weights": None,  # explicit path to the RoMa checkpoint
        "dinov2_weights": None,  # explicit path to dinov2_vitl14_pretrain.pth
        "coarse_res": 560,  # int or [h, w], multiples of 14 (DINOv2 patches)
        "upsample_res": 864,  # int or [h, w]: second, refining pass at this resolution
        "upsample": True,
        "symmetric": True,  # predict both directions (warp A→B and B→A)
        "normalize": True,  # ImageNet mean/std, as RoMa was trained
    }
    variants: ClassVar[dict[str, WeightFile]] = {
        "outdoor": ROMA_OUTDOOR, "indoor": ROMA_INDOOR, "minima": MINIMA_ROMA,
    }
    weight_files = {name: (weight, DINOV2_VITL14) for name, weight in variants.items()}

    @classmethod
    def checkpoint_files(cls, conf: Conf) -> dict[str, tuple[WeightFile, str | None]]:
        if conf.variant not in cls.variants:
            raise ConfigError(f"unknown {cls.__name__} variant '{conf.variant}'; "
                              f"known: {', '.join(cls.variants)}")
        return {"weights": (cls.variants[conf.variant], conf.weights),
                "dinov2": (DINOV2_VITL14, conf.dinov2_weights)}

    def unpack_checkpoint(self, checkpoint: Any) -> Mapping[str, torch.Tensor]:
        """The RoMa state dict inside a checkpoint file (plain for RoMa and MINIMA)."""
        return checkpoint

    def _init(self, conf: Conf) -> None:
        self.coarse_res = resolution(conf.coarse_res, "coarse_res", multiple=14)
        self.upsample_res = resolution(conf.upsample_res, "upsample_res") if conf.upsample else None
        checkpoints = self.load_checkpoints(conf)
        self.model = build_roma(
            self.unpack_checkpoint(checkpoints["weights"]), checkpoints["dinov2"], self.coarse_res,
            self.upsample_res, conf.symmetric, self.device,
            amp_dtype=torch.float16 if conf.mixed_precision else torch.float32,
            source=f"{type(self).__name__} {conf.variant} weights",
        )
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self._mean, self._std = mean.view(1, 3, 1, 1).to(self.device), std.view(1, 3, 1, 1).to(self.device)
        # romatch's match() reaches the encoder through this one method only; on our instance it hands over the
        # per-image features of the pair being matched, and everything after the encoder (decoder, certainty
        # attenuation, symmetric split) stays romatch's code.
        self._pair: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
        self.model.extract_backbone_features = self._pair_features

    def preprocess(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        image = resize_tensor(image, size)
        return (image - self._mean) / self._std if self.conf.normalize else image

    def _encoder_features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """romatch's encoder on one image: VGG pyramid + DINOv2 at the coarse resolution, VGG pyramid at the
        upsampling resolution (romatch re-encodes for its refining pass), as {"coarse.<stride>": ..., ...}."""
        features = {}
        passes = [("coarse", self.coarse_res, False)] + ([("fine", self.upsample_res, True)]
                                                         if self.upsample_res is not None else [])
        for name, size, upsample in passes:
            pyramid = self.model.encoder(self.preprocess(image, size), upsample=upsample)
            features.update({f"{name}.{stride}": value for stride, value in pyramid.items()})
        return features

    def _decode(self, features0: dict[str, torch.Tensor], features1: dict[str, torch.Tensor]) -> Warp:
        """romatch's match() on two encodings (its encoder bypassed through `_pair_features`)."""
        # romatch reads only the shapes of its image arguments once the encoder is bypassed.
        placeholder = torch.zeros(1, 1, 1, 1, device=self.device)
        high_res = {}
        if self.upsample_res is not None:
            fine = placeholder.expand(1, 3, *self.upsample_res)
            high_res = {"im_A_high_res": fine, "im_B_high_res": fine}
        coarse = placeholder.expand(1, 3, *self.coarse_res)
        self._pair = (features0, features1)
        try:
            warp, certainty = self.model.match(coarse, coarse, **high_res)
        finally:
            self._pair = None
        return split_romatch_warp(warp[0], certainty[0], self.conf.symmetric)

    def _pair_features(self, batch, batched: bool = True, upsample: bool = False) -> dict[int, torch.Tensor]:
        prefix = "fine." if upsample else "coarse."
        features0, features1 = self._pair
        return {int(key[len(prefix):]): torch.cat((features0[key], features1[key]))
                for key in features0 if key.startswith(prefix)}


def split_romatch_warp(warp: torch.Tensor, certainty: torch.Tensor, symmetric: bool) -> Warp:
    """romatch's (H, W, 4) or symmetric (H, 2W, 4) warp → a Warp (sizes are filled in by the caller)."""
    warp, certainty = warp.float(), certainty.float()
    if not symmetric:
        return Warp(warp[..., 2:], certainty, (0, 0), (0, 0))
    width = warp.shape[1] // 2
    return Warp(warp[:, :width, 2:], certainty[:, :width], (0, 0), (0, 0),
                backward=warp[:, width:, :2], backward_certainty=certainty[:, width:])


class TinyRoMa(WarpMatcher, StateDictBackend):
    """Tiny RoMa v1 (XFeat backbone): grayscale, near-native resolution, one direction."""

    default_conf = {
        "weights": None,
        # Longer side fed to the network (rounded down to a multiple of 32 inside tiny RoMa). Its coarse
        # correlation volume grows with the 4th power of this: 640 px needs ~0.1 GB, 1600 px ~3.6 GB.
        "resize_max": 640,
        "num_matches": 5000,  # tiny RoMa's default
        "exact_softmax": False,
    }
    weight_files = {"outdoor": (TINY_ROMA_OUTDOOR,)}

    @classmethod
    def checkpoint_files(cls, conf: Conf) -> dict[str, tuple[WeightFile, str | None]]:
        return {"weights": (TINY_ROMA_OUTDOOR, conf.weights)}

    def _init(self, conf: Conf) -> None:
        from kornia.feature.xfeat import XFeatModel
        from romatch.models.tiny import TinyRoMa as RomatchTinyRoMa

        state_dict = self.load_checkpoints(conf)["weights"]
        model = RomatchTinyRoMa(xfeat=XFeatModel(), freeze_xfeat=False, exact_softmax=conf.exact_softmax)
        load_state_dict_strict(model, state_dict, "tiny RoMa weights")
        self.model = model.eval().to(self.device)

    def _warp(self, image0: torch.Tensor, image1: torch.Tensor) -> Warp:
        resized = []
        for image in (image0, image1):
            height, width = image.shape[-2:]
            factor = min(1.0, self.conf.resize_max / max(height, width)) if self.conf.resize_max else 1.0
            size = (max(32, math.floor(height * factor)), max(32, math.floor(width * factor)))
            resized.append(resize_tensor(image, size))
        warp, certainty = self.model.match(resized[0], resized[1], batched=True)
        return split_romatch_warp(warp[0], certainty[0], symmetric=False)


def random_state_dict(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values in `module`'s exact key layout, for offline tests of strict loading and parity.

    Weights are scaled by 1/sqrt(fan-in) and normalisation layers get unit statistics, so a random network keeps
    unit-scale activations and its output depends on its input (0.02-std weights make RoMa's warp constant).
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in module.state_dict().items():
        shape = tuple(value.shape)
        if not value.is_floating_point():
            out[key] = torch.zeros(shape, dtype=value.dtype)
        elif key.endswith("running_var"):
            out[key] = torch.ones(shape)
        elif key.endswith("running_mean") or key.endswith("bias"):
            out[key] = torch.randn(shape, generator=generator) * 0.1 if key.endswith("bias") else torch.zeros(shape)
        elif len(shape) <= 1:  # norm scales, LayerScale gammas
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif shape[0] == 1:  # embeddings and tokens (pos_embed, cls_token, ...)
            out[key] = torch.randn(shape, generator=generator) * 0.02
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            out[key] = torch.randn(shape, generator=generator) / fan_in**0.5
    return out
