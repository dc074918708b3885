"""CosPlace (Berton et al., CVPR 2022): a torchvision backbone, then L2 → GeM → Linear → L2.

The network mirrors the official `GeoLocalizationNet` module for module, so the released checkpoints
(`{backbone}_{dim}_cosplace.pth`, a plain state dict) load with strict=True and no renaming: `backbone.<i>.*` is an
nn.Sequential of the torchvision model's children without avgpool/fc (for VGG16: `features` without its last ReLU
and max-pool), `aggregation.1.p` is the GeM exponent and `aggregation.3.{weight,bias}` the projection.
The official constructor first downloads torchvision's ImageNet weights; here the backbone is built with
weights=None since the checkpoint overwrites every parameter anyway, so nothing but the checkpoint is fetched.

Input: RGB in [0,1] normalised with ImageNet mean/std (as hloc's wrapper does); hloc-style `resize_max` 1024.
The published (backbone, dim) pairs are the only ones with weights, so any other combination is refused.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from .errors import ConfigError
from .global_learned import LearnedGlobalDescriptor
from .weights import WeightFile, load_checkpoint, load_state_dict_strict

RELEASE_URL = "https://github.com/gmberton/CosPlace/releases/download/v1.0"

#: backbone → (channels of its last conv layer, descriptor dims with released weights), from the official hubconf.
BACKBONES: dict[str, tuple[int, tuple[int, ...]]] = {
    "ResNet18": (512, (32, 64, 128, 256, 512)),
    "ResNet50": (2048, (32, 64, 128, 256, 512, 1024, 2048)),
    "ResNet101": (2048, (32, 64, 128, 256, 512, 1024, 2048)),
    "ResNet152": (2048, (32, 64, 128, 256, 512, 1024, 2048)),
    "VGG16": (512, (64, 128, 256, 512)),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def weight_file(backbone: str, dim: int) -> WeightFile:
    filename = f"{backbone}_{dim}_cosplace.pth"
    # The release page publishes no checksums, hence unpinned.
    return WeightFile(filename, f"{RELEASE_URL}/{filename}", None, note="CosPlace, trained on SF-XL (MIT)")


class GeM(nn.Module):
    """Generalised-mean pooling with a learned exponent `p` (checkpoint key `aggregation.1.p`)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), p))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1)


def build_backbone(name: str) -> nn.Sequential:
    """The official backbone layout from an untrained torchvision model (no ImageNet download)."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown CosPlace backbone '{name}'; choose one of {', '.join(BACKBONES)}")
    model = getattr(torchvision.models, name.lower())(weights=None)
    if name == "VGG16":
        layers = list(model.features.children())[:-2]
    else:
        layers = list(model.children())[:-2]
    return nn.Sequential(*layers)


class GeoLocalizationNet(nn.Module):
    def __init__(self, backbone: str, dim: int):
        super().__init__()
        channels, _ = BACKBONES[backbone]
        self.backbone = build_backbone(backbone)
        # Indices matter: they are the checkpoint keys (GeM at 1, Linear at 3); GeM already drops H and W, so
        # the official Flatten at 2 is an identity here.
        self.aggregation = nn.Sequential(L2Normalize(), GeM(), nn.Identity(), nn.Linear(channels, dim), L2Normalize())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregation(self.backbone(x))


class CosPlace(LearnedGlobalDescriptor):
    default_conf = {"backbone": "ResNet50", "dim": 2048, "resize_max": 1024}
    weight_files = {
        f"{backbone}-{dim}": (weight_file(backbone, dim),) for backbone, (_, dims) in BACKBONES.items() for dim in dims
    }

    @classmethod
    def required_weights(cls, conf):
        known = conf.get("backbone") in BACKBONES and conf.get("dim") in BACKBONES[conf["backbone"]][1]
        return [(weight_file(conf["backbone"], conf["dim"]), conf.get("weights"))] if known else []

    def _build(self, conf) -> nn.Module:
        if conf.backbone not in BACKBONES:
            raise ConfigError(f"unknown CosPlace backbone '{conf.backbone}'; choose one of {', '.join(BACKBONES)}")
        dims = BACKBONES[conf.backbone][1]
        if conf.dim not in dims:
            raise ConfigError(
                f"CosPlace {conf.backbone} has released weights for dim {', '.join(map(str, dims))}, not {conf.dim}"
            )
        net = GeoLocalizationNet(conf.backbone, conf.dim)
        weight = weight_file(conf.backbone, conf.dim)
        load_state_dict_strict(net, load_checkpoint(weight, conf.weights), conf.weights or weight.filename)
        self.register_normalisation()
        return net

    def register_normalisation(self) -> None:
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def _describe(self, image: torch.Tensor) -> torch.Tensor:
        return self.net((image - self.mean) / self.std)
