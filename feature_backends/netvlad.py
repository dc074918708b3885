"""NetVLAD (Arandjelović et al., CVPR 2016): VGG16 conv5_3 → NetVLAD (64 clusters) → PCA whitening → 4096-D.

Weights: the MatConvNet release exported to plain MATLAB structs (uzh-rpg/netvlad_tf_open), the same
`Pitts30K_struct.mat` / `TokyoTM_struct.mat` files hloc downloads, read unchanged with `scipy.io.loadmat` (a MATLAB v5
file is parsed, never executed, so the weights_only guarantee holds). Layout of `net.layers` (0-based):
    0-28  VGG16 up to conv5_3 (no final ReLU/pool); conv weights S×S×IN×OUT, biases OUT
    29    preL2 (normalise each local descriptor)
    30    vlad_core: weights {assignment D×K, centres D×K stored negated: MATLAB computes x + c}
    31-32 intra-normalisation, then flatten (descriptor-major: index d·K + k) and L2
    33    WPCA: weights {1×1×(D·K)×4096, 4096}
    34    final L2
`meta.normalization.averageImage` holds the RGB mean subtracted from the 0-255 input.
The file is converted to a state dict of `NetVLADNet` and loaded strictly, so a file with another layout or other
shapes is refused instead of half-loaded. hloc keeps its copy at `<torch hub>/netvlad/VGG16-NetVLAD-Pitts30K.mat`;
that copy is used when no other is configured, so hloc users do not fetch it twice (the whitening alone is
4096 x 32768 floats, 0.5 GB).

The VLAD sum is computed as A·Xᵀ − (Σₙ A)·C rather than hloc's explicit (B,D,K,N) residual tensor: the same
value without that tensor, which for one 1024x768 image (64x48 conv5_3 locations) is 512·64·3072 floats = 0.4 GB,
and a batch of 8 on CUDA would need 3.2 GB for it alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from .errors import ConfigError, WeightsError
from .global_learned import LearnedGlobalDescriptor
from .weights import WeightFile, load_state_dict_strict, resolve_weights

logger = logging.getLogger(__name__)

VGG_LAYERS = 29  # torchvision VGG16 `features` without its last ReLU and max-pool
VLAD_LAYER = 30
WHITEN_LAYER = 33
DESCRIPTOR_DIM = 512  # conv5_3 channels

MODELS = {
    "pitts30k": WeightFile("Pitts30K_struct.mat", "https://cvg-data.inf.ethz.ch/hloc/netvlad/Pitts30K_struct.mat",
                           None, note="VGG16-NetVLAD-Pitts30K (MATLAB struct export used by hloc)"),
    "tokyotm": WeightFile("TokyoTM_struct.mat", "https://cvg-data.inf.ethz.ch/hloc/netvlad/TokyoTM_struct.mat",
                          None, note="VGG16-NetVLAD-TokyoTM (MATLAB struct export used by hloc)"),
}
HLOC_CACHE_NAMES = {"pitts30k": "VGG16-NetVLAD-Pitts30K.mat", "tokyotm": "VGG16-NetVLAD-TokyoTM.mat"}


class NetVLADPooling(nn.Module):
    """Soft-assignment VLAD with intra-normalisation; output flattened descriptor-major (d·K + k) and L2-normalised."""

    def __init__(self, dim: int, num_clusters: int):
        super().__init__()
        self.assignment = nn.Conv1d(dim, num_clusters, kernel_size=1, bias=False)
        self.centres = nn.Parameter(torch.zeros(num_clusters, dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B,D,N), each column L2-normalised → (B, D·K)."""
        assignment = self.assignment(features).softmax(dim=1)  # (B,K,N)
        vlad = assignment @ features.transpose(1, 2) - assignment.sum(dim=2, keepdim=True) * self.centres  # (B,K,D)
        vlad = nn.functional.normalize(vlad, dim=2)
        return nn.functional.normalize(vlad.transpose(1, 2).flatten(1), dim=1)


class NetVLADNet(nn.Module):
    def __init__(self, num_clusters: int = 64, whiten_dim: int | None = 4096):
        super().__init__()
        vgg = torchvision.models.vgg16(weights=None)
        self.backbone = nn.Sequential(*list(vgg.features.children())[:VGG_LAYERS])
        self.vlad = NetVLADPooling(DESCRIPTOR_DIM, num_clusters)
        self.whiten = nn.Linear(DESCRIPTOR_DIM * num_clusters, whiten_dim) if whiten_dim else None
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))  # RGB mean of the 0-255 image

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B,3,H,W) RGB in [0,1] → (B, whiten_dim or D·K)."""
        features = self.backbone(image.clamp(0, 1) * 255 - self.mean).flatten(2)
        descriptor = self.vlad(nn.functional.normalize(features, dim=1))
        if self.whiten is not None:
            descriptor = nn.functional.normalize(self.whiten(descriptor), dim=1)
        return descriptor


def _field(struct: Any, name: str, where: str) -> Any:
    if not hasattr(struct, name):
        raise WeightsError(f"{where} has no field '{name}': not a NetVLAD MATLAB struct export")
    return getattr(struct, name)


def _weights(layer: Any, index: int, count: int = 2) -> list[np.ndarray]:
    weights = _field(layer, "weights", f"net.layers[{index}]")
    weights = list(np.atleast_1d(np.asarray(weights, dtype=object)))
    if len(weights) != count:
        raise WeightsError(f"net.layers[{index}] has {len(weights)} weight arrays, expected {count}")
    return [np.asarray(w, dtype=np.float32) for w in weights]


def _check_name(layer: Any, index: int, expected: str) -> None:
    name = getattr(layer, "name", None)
    if name is not None and str(name) != expected:
        raise WeightsError(f"net.layers[{index}] is '{name}', expected '{expected}' (NetVLAD struct export layout)")


def _shaped(array: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    if array.size != int(np.prod(shape)):
        raise WeightsError(f"{what} has shape {array.shape}, expected {shape} (after dropping singleton axes)")
    return array.reshape(shape)


def state_dict_from_mat(mat: dict[str, Any], net: NetVLADNet) -> dict[str, torch.Tensor]:
    """Convert a loadmat(struct_as_record=False, squeeze_me=True) NetVLAD export to `net`'s state dict.

    Shapes are taken from `net`; any disagreement with the file is a WeightsError naming the layer.
    """
    if "net" not in mat:
        raise WeightsError("the .mat file has no 'net' variable: not a NetVLAD MATLAB struct export")
    layers = list(np.atleast_1d(_field(mat["net"], "layers", "net")))
    needed = WHITEN_LAYER + 1 if net.whiten is not None else VLAD_LAYER + 1
    if len(layers) < needed:
        raise WeightsError(f"net.layers has {len(layers)} layers, expected at least {needed}")
    state: dict[str, torch.Tensor] = {}
    for index, module in enumerate(net.backbone):
        if not isinstance(module, nn.Conv2d):
            continue
        layer_type = getattr(layers[index], "type", "conv")
        if str(layer_type) != "conv":
            raise WeightsError(f"net.layers[{index}] is a '{layer_type}' layer where VGG16 has a convolution")
        out_c, in_c, kh, kw = module.weight.shape
        weight, bias = _weights(layers[index], index)
        weight = _shaped(weight, (kh, kw, in_c, out_c), f"net.layers[{index}] weights")
        state[f"backbone.{index}.weight"] = torch.from_numpy(weight.transpose(3, 2, 0, 1).copy())
        state[f"backbone.{index}.bias"] = torch.from_numpy(_shaped(bias, (out_c,), f"net.layers[{index}] bias"))

    _check_name(layers[VLAD_LAYER], VLAD_LAYER, "vlad_core")
    num_clusters, dim = net.vlad.centres.shape
    assignment, centres = _weights(layers[VLAD_LAYER], VLAD_LAYER)
    assignment = _shaped(assignment, (dim, num_clusters), "vlad_core assignment weights")
    centres = _shaped(centres, (dim, num_clusters), "vlad_core centres")
    state["vlad.assignment.weight"] = torch.from_numpy(assignment.T[:, :, None].copy())
    state["vlad.centres"] = torch.from_numpy(-centres.T.copy())  # stored negated

    if net.whiten is not None:
        _check_name(layers[WHITEN_LAYER], WHITEN_LAYER, "WPCA")
        out_dim, in_dim = net.whiten.weight.shape
        weight, bias = _weights(layers[WHITEN_LAYER], WHITEN_LAYER)
        state["whiten.weight"] = torch.from_numpy(_shaped(weight, (in_dim, out_dim), "WPCA weights").T.copy())
        state["whiten.bias"] = torch.from_numpy(_shaped(bias, (out_dim,), "WPCA bias"))

    meta = _field(mat["net"], "meta", "net")
    average = np.asarray(_field(_field(meta, "normalization", "net.meta"), "averageImage",
                                "net.meta.normalization"), dtype=np.float32)
    # The export stores a mean image (H×W×3) or, after squeezing, the 3 channel means; hloc reads pixel (0,0).
    mean = average[0, 0] if average.ndim == 3 else average.reshape(-1)
    state["mean"] = torch.from_numpy(_shaped(np.ascontiguousarray(mean), (3,), "averageImage mean")).view(1, 3, 1, 1)
    return state


def load_mat(path: str | Path) -> dict[str, Any]:
    from scipy.io import loadmat

    try:
        return loadmat(str(path), struct_as_record=False, squeeze_me=True)
    except (ValueError, TypeError, OSError, NotImplementedError) as error:
        raise WeightsError(f"cannot read '{path}' as a MATLAB v5 NetVLAD export: {error}") from error


class NetVLAD(LearnedGlobalDescriptor):
    default_conf = {
        "model": "pitts30k",
        "whiten": True,
        "num_clusters": 64,  # must match the file; the published models have 64
        "whiten_dim": 4096,
        "resize_max": 1024,
    }
    weight_files = {name: (weight,) for name, weight in MODELS.items()}
    variant_key = "model"

    def _build(self, conf) -> nn.Module:
        if conf.model not in MODELS:
            raise ConfigError(f"unknown NetVLAD model '{conf.model}'; choose one of {', '.join(MODELS)}")
        net = NetVLADNet(conf.num_clusters, conf.whiten_dim if conf.whiten else None)
        explicit = conf.weights
        hloc_copy = Path(torch.hub.get_dir()) / "netvlad" / HLOC_CACHE_NAMES[conf.model]
        if explicit is None and hloc_copy.is_file():
            logger.info("NetVLAD: using hloc's cached %s", hloc_copy)
            explicit = hloc_copy
        path = resolve_weights(MODELS[conf.model], explicit)
        load_state_dict_strict(net, state_dict_from_mat(load_mat(path), net), str(path))
        return net

    def _describe(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)
