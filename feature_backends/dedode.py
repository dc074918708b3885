"""DeDoDe v2 keypoints and DeDoDe descriptors (B or G), built from kornia's DeDoDe modules.

kornia's `kornia.feature.DeDoDe` reproduces the official networks (Parskatt/DeDoDe: VGG19-BN encoders,
ConvRefiner decoders, the same state-dict layout), so the networks are kornia's; this module adds what kornia
lacks for offline, reproducible use:

- Weights never come from kornia. `DeDoDe.from_pretrained` downloads, and merely constructing the G descriptor
  downloads DINOv2 (kornia's `FrozenDINOv2` fetches it when given no weights). Here every network is built with
  random initialisation and the resolved checkpoints are loaded strictly through feature_backends.weights; the
  DINOv2 state dict is resolved the same way and handed to kornia's `FrozenDINOv2`.
- Resolution. The official `detect_from_path` squashes every image to 784x784; kornia takes any size and pads to
  a multiple of 14. We keep the aspect ratio: longer side 784 (the official pixel budget along that side), sides
  floored to a multiple of 14 so neither the DINOv2 patch grid of G nor kornia's padding ever changes the image.
- Descriptors are read bilinearly at the keypoints (as kornia and the official code do) and, by default,
  L2-normalised so that the MNN matcher's distance and ratio test apply; the official dual-softmax matcher
  normalises anyway. LightGlue's DeDoDe weights were trained on the raw descriptors: extract with
  `normalize_descriptors=false` for it (the lightglue backend checks this).
- Keypoints come out in hloc's convention (centre of the top-left pixel at (0, 0)); DeDoDe's normalised grid puts
  pixel i at (2i + 1) / W - 1.

Selection is kornia's `sample_keypoints` (softmax over all pixels, coverage reweighting with a 51-tap Gaussian,
top-k without NMS), the same as the official DeDoDe detector. The `DetectorDescriptorBackend` base below is shared
with the DaD backend (feature_backends/dad.py), which swaps the detector and its selection but keeps the
descriptor, the weight handling and the coordinate conventions.

Variants (kornia's names): detectors L-upright (v1), L-C4, L-SO2 (rotation-steerer releases), L-C4-v2 (DeDoDe v2,
default); descriptors B-upright (default), G-upright, and the steerer descriptors B-C4, B-SO2, G-C4, G-SO2.
The steerer descriptors are published to be matched with a steerer (descriptor rotation search): the mnn and
dual-softmax matchers read the descriptor variant from features.h5 and steer accordingly (steerer files in
feature_backends.weights.STEERER_WEIGHTS; `--matcher-conf steerer=null` matches them as upright descriptors).

Official SHA-256 values are not published for any of these files (GitHub release pages list none for these
assets and neither kornia nor the official code pins them), so every entry is unpinned; `recon weights check`
prints the hash of the local copy so users can pin it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from kornia.feature.dedode.decoder import ConvRefiner, Decoder
from kornia.feature.dedode.dedode_models import dedode_descriptor_B, dedode_detector_L
from kornia.feature.dedode.descriptor import DeDoDeDescriptor
from kornia.feature.dedode.encoder import VGG19, VGG_DINOv2
from kornia.feature.dedode.utils import sample_keypoints
from torch import nn

from .base import LocalFeatures
from .errors import ConfigError, WeightsError
from .weights import DINOV2_VITL14, WeightFile, load_checkpoint, load_state_dict_strict

_DEDODE = "https://github.com/Parskatt/DeDoDe/releases/download"
_STEERERS = "https://github.com/georg-bn/rotation-steerers/releases/download/release-2"

DETECTOR_WEIGHTS: dict[str, WeightFile] = {
    "L-upright": WeightFile("dedode_detector_L.pth", f"{_DEDODE}/dedode_pretrained_models/dedode_detector_L.pth"),
    "L-C4": WeightFile("dedode_detector_C4.pth", f"{_STEERERS}/dedode_detector_C4.pth"),
    "L-SO2": WeightFile("dedode_detector_SO2.pth", f"{_STEERERS}/dedode_detector_SO2.pth"),
    "L-C4-v2": WeightFile("dedode_detector_L_v2.pth", f"{_DEDODE}/v2/dedode_detector_L_v2.pth"),
}
DESCRIPTOR_WEIGHTS: dict[str, WeightFile] = {
    "B-upright": WeightFile("dedode_descriptor_B.pth", f"{_DEDODE}/dedode_pretrained_models/dedode_descriptor_B.pth"),
    "B-C4": WeightFile("B_C4_Perm_descriptor_setting_C.pth", f"{_STEERERS}/B_C4_Perm_descriptor_setting_C.pth"),
    "B-SO2": WeightFile("B_SO2_Spread_descriptor_setting_C.pth", f"{_STEERERS}/B_SO2_Spread_descriptor_setting_C.pth"),
    "G-upright": WeightFile("dedode_descriptor_G.pth", f"{_DEDODE}/dedode_pretrained_models/dedode_descriptor_G.pth"),
    "G-C4": WeightFile("G_C4_Perm_descriptor_setting_C.pth", f"{_STEERERS}/G_C4_Perm_descriptor_setting_C.pth"),
    "G-SO2": WeightFile("G_SO2_Spread_descriptor_setting_C.pth", f"{_STEERERS}/G_SO2_Spread_descriptor_setting_C.pth"),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def descriptor_files(name: str) -> tuple[WeightFile, ...]:
    files = (DESCRIPTOR_WEIGHTS[name],)
    return files + (DINOV2_VITL14,) if name.startswith("G") else files


def build_descriptor_G(dinov2_state_dict: Mapping[str, torch.Tensor], amp_dtype: torch.dtype) -> DeDoDeDescriptor:
    """DeDoDe-G with kornia's modules, DINOv2 taken from the given state dict instead of a download.

    kornia's own `dedode_descriptor_G` passes no DINOv2 weights to `FrozenDINOv2`, which then downloads them;
    the decoder below has the channel layout of that factory (and of the official one).
    """
    prototypes, blocks = 256, 5
    layout = {"14": (1024, 768, 512), "8": (512 + 512, 512, 256), "4": (256 + 256, 256, 128),
              "2": (128 + 128, 64, 32), "1": (64 + 32, 32, 1)}
    refiners = nn.ModuleDict({
        scale: ConvRefiner(in_dim, hidden, out + prototypes, hidden_blocks=blocks, residual=True, amp=True,
                           amp_dtype=amp_dtype)
        for scale, (in_dim, hidden, out) in layout.items()
    })
    try:
        encoder = VGG_DINOv2(vgg_kwargs={"amp": True, "amp_dtype": amp_dtype},
                             dinov2_kwargs={"amp": True, "amp_dtype": amp_dtype,
                                            "dinov2_weights": dict(dinov2_state_dict)})
    except RuntimeError as error:  # FrozenDINOv2 loads strictly; a wrong file raises RuntimeError
        raise WeightsError(f"'{DINOV2_VITL14.filename}' does not fit DINOv2 ViT-L/14: {error}") from error
    return DeDoDeDescriptor(encoder=encoder, decoder=Decoder(refiners, num_prototypes=prototypes))


def _explicit_paths(weights: Any, roles: tuple[str, ...]) -> dict[str, Any]:
    """The `weights` conf: one path (for the first role, the detector) or a mapping role → path."""
    if weights is None:
        return {}
    if isinstance(weights, (str, bytes)) or hasattr(weights, "__fspath__"):
        return {roles[0]: weights}
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(roles))
        if unknown:
            raise ConfigError(f"unknown 'weights' entries {unknown}; expected a path or a mapping of {list(roles)}")
        return dict(weights)
    raise ConfigError(f"'weights' must be a path or a mapping of {list(roles)} to paths, got {type(weights).__name__}")


def _set_mixed_precision(module: nn.Module, enabled: bool) -> None:
    # kornia's DeDoDe modules autocast on CUDA by themselves; honour the backend's mixed_precision switch.
    for child in module.modules():
        if hasattr(child, "amp"):
            child.amp = enabled


class DetectorDescriptorBackend(LocalFeatures):
    """A dense-logit detector plus the DeDoDe descriptor; subclasses build the detector and select keypoints."""

    default_conf = {
        "descriptor": "B-upright",
        "normalize_descriptors": True,
        "weights": None,  # explicit path of the detector file, or {"detector"|"descriptor"|"dinov2": path}
    }
    detector_weights: ClassVar[dict[str, WeightFile]] = {}
    channels_last = True
    descriptor_family = "dedode"

    def _init(self, conf) -> None:
        amp_dtype = torch.float16
        # Resolve every file before building anything, so that a missing file fails fast.
        files = self.checkpoint_files(conf)
        (detector_file, _), (descriptor_file, _) = files["detector"], files["descriptor"]
        states = {role: self._load(weight, explicit) for role, (weight, explicit) in files.items()}
        detector_state, descriptor_state, dinov2_state = states["detector"], states["descriptor"], states.get("dinov2")
        self.detector = self._build_detector(conf, amp_dtype)
        load_state_dict_strict(self.detector, detector_state, detector_file.filename)
        if dinov2_state is not None:
            self.descriptor = build_descriptor_G(dinov2_state, amp_dtype)
        else:
            self.descriptor = dedode_descriptor_B(amp_dtype)
        load_state_dict_strict(self.descriptor, descriptor_state, descriptor_file.filename)
        for network in (self.detector, self.descriptor):
            _set_mixed_precision(network, conf.mixed_precision)
            # kornia's VGG encoders (also inside G's VGG_DINOv2) keep their layers in a ModuleList that forward()
            # walks in order.
            self.prepare_network(network, ordered_lists=tuple(m.layers for m in network.modules() if isinstance(m, VGG19)))
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @staticmethod
    def _load(weight: WeightFile, explicit: Any) -> dict[str, torch.Tensor]:
        state_dict = load_checkpoint(weight, explicit)
        if not isinstance(state_dict, Mapping):
            raise WeightsError(f"'{weight.filename}' is not a state dict (got {type(state_dict).__name__})")
        return dict(state_dict)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.detector_weights:  # every detector and descriptor file, for `recon weights list`
            cls.weight_files = cls.weight_table()

    @classmethod
    def weight_table(cls) -> dict[str, tuple[WeightFile, ...]]:
        return {
            **{f"detector {name}": (file,) for name, file in cls.detector_weights.items()},
            **{f"descriptor {name}": descriptor_files(name) for name in DESCRIPTOR_WEIGHTS},
        }

    @classmethod
    def checkpoint_files(cls, conf: Mapping[str, Any]) -> dict[str, tuple[WeightFile, Any]]:
        """{"detector"|"descriptor"|"dinov2": (file, explicit path or None)}: DINOv2 for the G descriptors only."""
        if conf["detector"] not in cls.detector_weights:
            raise ConfigError(f"unknown {cls.__name__} detector '{conf['detector']}'; "
                              f"known: {', '.join(cls.detector_weights)}")
        if conf["descriptor"] not in DESCRIPTOR_WEIGHTS:
            raise ConfigError(f"unknown DeDoDe descriptor '{conf['descriptor']}'; "
                              f"known: {', '.join(DESCRIPTOR_WEIGHTS)}")
        explicit = _explicit_paths(conf["weights"], ("detector", "descriptor", "dinov2"))
        roles = {"detector": cls.detector_weights[conf["detector"]],
                 "descriptor": DESCRIPTOR_WEIGHTS[conf["descriptor"]]}
        if conf["descriptor"].startswith("G"):
            roles["dinov2"] = DINOV2_VITL14
        return {role: (weight, explicit.get(role)) for role, weight in roles.items()}

    @classmethod
    def required_weights(cls, conf: Mapping[str, Any]) -> list[tuple[WeightFile, Any]]:
        return list(cls.checkpoint_files(conf).values())

    def _build_detector(self, conf, amp_dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    def _select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1,1,H,W) detector logits → keypoints (1,N,2) in hloc pixel coordinates and scores (1,N)."""
        raise NotImplementedError

    def _extract(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if image.shape[1] != 3:
            raise ConfigError(f"{type(self).__name__} needs RGB images; do not set grayscale=true")
        normalized = (image - self._mean) / self._std
        logits = self.detector(normalized).float()
        keypoints, scores = self._select(logits)
        descriptors = self.describe(normalized, keypoints)
        return {"keypoints": keypoints[0], "descriptors": descriptors[0], "scores": scores[0]}

    def describe(self, normalized: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        """Descriptors (1,N,D) read bilinearly at hloc-convention keypoints (1,N,2) of an ImageNet-normalised image."""
        height, width = normalized.shape[-2:]
        dense = self.descriptor(normalized).float()
        size = keypoints.new_tensor([width, height])
        grid = (keypoints + 0.5) * 2 / size - 1  # align_corners=False: pixel centres at (2i + 1) / W - 1
        descriptors = F.grid_sample(dense, grid[:, None], mode="bilinear", align_corners=False)[:, :, 0].mT
        if self.conf.normalize_descriptors:
            descriptors = F.normalize(descriptors, dim=-1)
        return descriptors


class DeDoDe(DetectorDescriptorBackend):
    default_conf = {
        "detector": "L-C4-v2",
        "max_keypoints": 4096,  # kornia / official default is 10000; 4096 keeps CPU matching affordable
        "resize_max": 784,
    }
    size_multiple = 14
    detector_weights = DETECTOR_WEIGHTS

    def _build_detector(self, conf, amp_dtype: torch.dtype) -> nn.Module:
        return dedode_detector_L(amp_dtype)

    def _select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, height, width = logits.shape
        probs = logits.reshape(batch, height * width).softmax(dim=-1).reshape(batch, height, width)
        num = self.conf.max_keypoints or height * width
        keypoints, scores = sample_keypoints(probs, num_samples=num)
        size = keypoints.new_tensor([width, height])
        return (keypoints + 1) * size / 2 - 0.5, scores
