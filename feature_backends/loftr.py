"""LoFTR (Sun et al., CVPR 2021) through kornia's `kornia.feature.LoFTR`: outdoor, indoor, indoor_new and MINIMA's
LoFTR checkpoint; the base for every LoFTR-style matcher (GIM's, feature_backends.gim_loftr).

LoFTR answers a pair with matches, not with a warp: coarse cells of image 0 (a 1/8 grid) matched by dual-softmax
mutual nearest neighbours, refined to sub-pixel positions in image 1. It therefore runs in the dense stage's
quantised mode only (`--matcher loftr`); the anchored mode (`sift+loftr`) maps keypoints through a warp, which LoFTR
does not predict, and recon.dense refuses it.

Facts checked against the sources (kornia 0.9.0 `kornia/feature/loftr/loftr.py`, zju3dv/LoFTR, LSXI7/MINIMA
`src/utils/load_model.py`, `src/config/default.py`, `src/utils/data_io_loftr.py`):
- Weights are Lightning-style `{'state_dict': ...}` files; kornia strips a leading `matcher.` (the training
  module's attribute) and loads strictly. The official files are the ones kornia downloads (its HuggingFace copy
  first, then its CTU mirror); here they go through feature_backends.weights like every other file.
- `temp_bug_fix` (the corrected sine position encoding, zju3dv/LoFTR issue 41): off for outdoor and indoor, on
  for indoor_new (kornia switches it for that checkpoint) and for MINIMA's checkpoint (MINIMA's loader turns it on
  for every file except the original outdoor_ds.ckpt). MINIMA otherwise uses LoFTR's default config: ResNet-18
  FPN (128, 196, 256), 4 x (self, cross) coarse layers, dual-softmax at temperature 0.1, threshold 0.2, border 2,
  fine window 5 with the coarse feature concatenated; that is kornia's default_cfg.
- Input: grayscale in [0, 1], sides multiples of 8. Official resolutions: MegaDepth evaluation at 840 px on the
  longer side (outdoor), ScanNet at 640x480 (indoor), MINIMA's inference at 640 px on the longer side, scaled up
  or down. hloc's match_dense feeds 1024 px.
- Coordinates: kornia's documented convention is that the pretrained models put the centre of pixel (x, y) at
  (x + 0.5, y + 0.5) (LoFTR's ground truth projects grid positions with COLMAP-convention intrinsics); recon's
  (hloc's) frame has pixel centres at integers, so a match q in the network image becomes q / scale - 0.5 in the
  original image (scale = network size / original size, per axis).

Why a wrapper and not kornia's model as is: images are encoded once per stage, not once per pair (kornia's
`extract_features`, cached by the dense stage like RoMa's encodings), weights load offline and strictly through
feature_backends.weights, and matches are converted to original-image pixels.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .base import Conf, DenseMatcher, StateDictBackend
from .errors import ConfigError, WeightsError
from .images import resize_image
from .weights import WeightFile, load_state_dict_strict

_KORNIA_HF = "https://huggingface.co/kornia/loftr/resolve/main"
_KORNIA_CTU = "https://cmp.felk.cvut.cz/~mishkdmy/models"
LOFTR_OUTDOOR = WeightFile(
    "loftr_outdoor.ckpt", f"{_KORNIA_HF}/loftr_outdoor.ckpt",
    note=f"LoFTR outdoor (MegaDepth), zju3dv outdoor_ds; kornia's mirror {_KORNIA_CTU}/loftr_outdoor.ckpt",
)
LOFTR_INDOOR = WeightFile(
    "loftr_indoor.ckpt", f"{_KORNIA_HF}/loftr_indoor.ckpt",
    note=f"LoFTR indoor (ScanNet); kornia's mirror {_KORNIA_CTU}/loftr_indoor.ckpt",
)
LOFTR_INDOOR_NEW = WeightFile(
    "loftr_indoor_ds_new.ckpt", f"{_KORNIA_HF}/loftr_indoor_ds_new.ckpt",
    note=f"LoFTR indoor retrained with the fixed position encoding; mirror {_KORNIA_CTU}/loftr_indoor_ds_new.ckpt",
)
MINIMA_LOFTR = WeightFile(
    "minima_loftr.ckpt", "https://github.com/LSXI7/storage/releases/download/MINIMA/minima_loftr.ckpt",
    note="MINIMA's LoFTR (cross-modal training); mirror huggingface.co/Realcat/imcui_checkpoints loftr/",
)


def unpack_lightning_state(checkpoint: Any, prefixes: tuple[str, ...], source: str) -> dict[str, torch.Tensor]:
    """A Lightning checkpoint (or a plain state dict) → the network's state dict: 'state_dict' taken if present and
    the first of `prefixes` that a key starts with stripped (kornia strips 'matcher.', GIM also 'model.')."""
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(
            f"'{source}' is not a state dict or a Lightning checkpoint (got {type(checkpoint).__name__})")
    state = checkpoint.get("state_dict", checkpoint)
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def kornia_loftr_config(temp_bug_fix: bool, match_threshold: float, fine_concat_coarse_feat: bool = True
                        ) -> dict[str, Any]:
    """kornia's (= zju3dv's) default LoFTR configuration with the flags that differ between checkpoints."""
    from kornia.feature.loftr.loftr import default_cfg

    config = copy.deepcopy(default_cfg)
    config["coarse"]["temp_bug_fix"] = bool(temp_bug_fix)
    config["match_coarse"]["thr"] = float(match_threshold)
    config["fine_concat_coarse_feat"] = bool(fine_concat_coarse_feat)
    return config


def original_pixels(points: torch.Tensor, scale: np.ndarray) -> np.ndarray:
    """LoFTR's match coordinates in the network image → original-image pixels (hloc convention, module docstring)."""
    return (points.detach().double().cpu().numpy() / np.asarray(scale, np.float64) - 0.5).astype(np.float32)


class LoFTRMatcher(DenseMatcher, StateDictBackend):
    """A LoFTR-style dense matcher (quantised mode only: no warp). Subclasses change `variants`, the input
    (`grayscale`), the checkpoint prefixes and `build_network`; everything around the network is shared."""

    default_conf = {
        "variant": "outdoor",
        "weights": None,  # explicit path to the checkpoint
        "resize_max": 840,  # longer side fed to the network (MegaDepth evaluation); None keeps the original size
        "resize_force": False,  # also upscale smaller images (MINIMA's inference does)
        "match_threshold": 0.2,  # coarse dual-softmax confidence (LoFTR's `thr`)
        "max_matches": None,  # keep only the most confident matches per pair (None: all)
    }
    #: variant → (weight file, temp_bug_fix of its position encoding)
    variants: ClassVar[dict[str, tuple[WeightFile, bool]]] = {
        "outdoor": (LOFTR_OUTDOOR, False),
        "indoor": (LOFTR_INDOOR, False),
        "indoor_new": (LOFTR_INDOOR_NEW, True),
        "minima": (MINIMA_LOFTR, True),
    }
    weight_files = {name: (weight,) for name, (weight, _) in variants.items()}
    #: Prefixes a checkpoint's keys may carry (Lightning module attributes).
    checkpoint_prefixes: ClassVar[tuple[str, ...]] = ("matcher.",)
    #: LoFTR's backbone reads one grayscale channel; GIM's reads RGB.
    grayscale: ClassVar[bool] = True
    size_multiple: ClassVar[int] = 8

    @classmethod
    def checkpoint_files(cls, conf: Conf) -> dict[str, tuple[WeightFile, str | None]]:
        if conf.variant not in cls.variants:
            raise ConfigError(f"unknown {cls.__name__} variant '{conf.variant}'; known: {', '.join(cls.variants)}")
        return {"weights": (cls.variants[conf.variant][0], conf.weights)}

    def build_network(self, conf: Conf) -> nn.Module:
        from kornia.feature import LoFTR

        temp_bug_fix = self.variants[conf.variant][1]
        return LoFTR(pretrained=None, config=kornia_loftr_config(temp_bug_fix, conf.match_threshold))

    def _init(self, conf: Conf) -> None:
        if conf.max_matches is not None and int(conf.max_matches) < 1:
            raise ConfigError(f"max_matches must be positive or None, got {conf.max_matches}")
        checkpoint = self.load_checkpoints(conf)["weights"]
        source = f"{type(self).__name__} {conf.variant} weights"
        network = self.build_network(conf)
        load_state_dict_strict(network, unpack_lightning_state(checkpoint, self.checkpoint_prefixes, source), source)
        self.network = network.eval().requires_grad_(False).to(self.device)

    def network_input(self, image: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """(H, W, 1|3) image in [0, 1] → the network's (1, C, h, w) tensor (sides multiples of 8) and the per-axis
        scale (sx, sy) = network size / original size. Grayscale uses the luma weights of OpenCV's
        IMREAD_GRAYSCALE, with which the official demos read their images."""
        if image.ndim != 3 or image.shape[2] not in (1, 3):
            raise ConfigError(f"{type(self).__name__} expects (H, W, 1|3) images, got shape {image.shape}")
        if self.grayscale and image.shape[2] == 3:
            image = image @ np.array([0.299, 0.587, 0.114], np.float32)
            image = image[..., None]
        elif not self.grayscale and image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        resized, scale = resize_image(image.astype(np.float32), self.conf.resize_max, self.conf.resize_force,
                                      self.size_multiple)
        return self.to_tensor(np.clip(resized, 0, 1)), np.asarray(scale, np.float64)

    def encode(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """The per-image part of LoFTR (backbone + position encoding, kornia's `extract_features`), kept by the dense
        stage for every pair of the image: about 70 MB at 840x630 (the 1/2-resolution fine map dominates). On
        other devices the image itself is returned (the cache weighs host memory only, as for RoMa)."""
        if self.device.type != "cpu":
            return {"image": image}
        tensor, scale = self.network_input(image)
        with torch.inference_mode(), self.autocast():
            features = self.network.extract_features(tensor)
        return {"coarse": features["coarse"].float().numpy(), "fine": features["fine"].float().numpy(),
                "scale": scale, "size": np.array([image.shape[1], image.shape[0]])}

    def _features(self, encoded: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray]:
        if "image" in encoded:
            image = encoded["image"]
            tensor, scale = self.network_input(image)
            return self.network.extract_features(tensor), scale, np.array([image.shape[1], image.shape[0]])
        features = {k: torch.from_numpy(encoded[k]).to(self.device) for k in ("coarse", "fine")}
        return features, encoded["scale"], encoded["size"]

    def match_encoded(self, encoded0: Mapping[str, np.ndarray], encoded1: Mapping[str, np.ndarray]
                      ) -> dict[str, np.ndarray]:
        """Matches of one pair in original-image pixels: keypoints0, keypoints1 (M, 2) and scores (M,) = LoFTR's
        coarse confidence. Matches whose refined position leaves image 1 (the fine window reaches 4 network pixels
        past a border cell) are dropped: they are not pixels of the image."""
        with torch.inference_mode(), self.autocast():
            (features0, scale0, size0), (features1, scale1, size1) = self._features(encoded0), self._features(encoded1)
            out = self.network({"features0": features0, "features1": features1})
        points0, points1 = original_pixels(out["keypoints0"], scale0), original_pixels(out["keypoints1"], scale1)
        scores = out["confidence"].float().cpu().numpy().astype(np.float32)
        inside = _inside(points0, size0) & _inside(points1, size1)
        points0, points1, scores = points0[inside], points1[inside], scores[inside]
        if self.conf.max_matches is not None and len(scores) > self.conf.max_matches:
            keep = np.sort(np.argsort(-scores, kind="stable")[: int(self.conf.max_matches)])
            points0, points1, scores = points0[keep], points1[keep], scores[keep]
        return {"keypoints0": points0.reshape(-1, 2), "keypoints1": points1.reshape(-1, 2), "scores": scores}

    def match_images(self, image0: np.ndarray, image1: np.ndarray) -> dict[str, np.ndarray]:
        return self.match_encoded(self.encode(image0), self.encode(image1))


def _inside(points: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Points on an image of `size` = (width, height) in the hloc convention: [-0.5, size - 0.5)."""
    return (points >= -0.5).all(axis=1) & (points[:, 0] < size[0] - 0.5) & (points[:, 1] < size[1] - 0.5)
