"""GIM's dense matchers (Shen et al., ICLR 2024): its RoMa and DKMv3 checkpoints, loaded unchanged.

Facts checked against the official code (xuelunshen/gim `demo.py`, `dkm/models/*`; Parskatt/DKM):
- The checkpoints are PyTorch-Lightning files: the weights sit under 'state_dict' with a 'model.' prefix.
  GIM's demo strips the first 'model.' and, for DKM, drops 'encoder.net.fc.*' (its ResNet-50 deletes the unused
  classification head that upstream DKM keeps); everything else loads strictly, and so it does here.
- GIM feeds raw [0, 1] RGB: its DKM copy resizes with bilinear `F.interpolate` and has no normalisation, and its
  RoMa was trained the same way. romatch normalises only on its PIL path, so passing normalised tensors to GIM's
  weights would be a silent accuracy loss; `normalize` defaults to False here.
- GIM's defaults: RoMa coarse 672² with upsampling to 1344²; DKM coarse 672x896 (h x w) with upsampling to
  1152x1536, symmetric, 5000 sampled matches, threshold 0.05. GIM pads images to the model's aspect ratio (zeros)
  and zeroes the certainty of near-black pixels; we resize without padding like romatch, so very elongated images
  are squeezed rather than padded (not measured with real weights: no GIM weights are reachable offline).

DKMv3 is in no package (the PyPI 'dkm' is unrelated). It is assembled from what romatch and torchvision already
ship, and only what differs is written here:
- from romatch: `GP` and `CosKernel` (the Gaussian-process matcher, identical modules; romatch solves with a
  Cholesky factor where DKM inverts the kernel matrix: the same posterior mean), `ConvRefiner` (identical layer
  layout; DKM's forward differs: its displacement embedding is not rescaled by resolution and its output channels
  are ordered (certainty, dx, dy) where romatch's are (dx, dy, certainty), so `DKMConvRefiner` re-implements only
  `forward`), and `local_correlation` (the same window, order and scaling as DKM's);
- from torchvision: ResNet-50 as the encoder (`encoder.net.*`, DKM's names);
- written here: DKM's coordinate decoder (DFN with RRB and CAB blocks), the coarse-to-fine decoder and the
  two-pass matching (coarse at (h, w), refinement at the upsampling resolution, certainty attenuated by the
  coarse certainty). tests/test_dense.py checks the module tree key by key against DKMv3's published layout and
  loads a checkpoint in GIM's layout with strict=True.
- In the dense stage each image is encoded once (both passes' ResNet pyramids, about 0.4 GB per image at GIM's
  672x896 / 1152x1536 in float32) and cached as RoMa's are (feature_backends.dense_warp.EncodedWarpMatcher): the
  same network one image at a time, where `DKMv3.match` encodes the two images of a pair as one batch (equal
  within float rounding; tested).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import Conf, StateDictBackend
from .dense_warp import EncodedWarpMatcher, Warp, identity_grid
from .errors import WeightsError
from .roma import RoMa, resolution
from .weights import DINOV2_VITL14, WeightFile, load_state_dict_strict

GIM_ROMA = WeightFile(
    "gim_roma_100h.ckpt", "https://drive.google.com/uc?export=download&id=1OGNbJdw9zn5zHC4WNQ0IMqdGCS0HMUfe",
    note="GIM README link (Google Drive); mirror: huggingface.co/Realcat/imcui_checkpoints roma/gim_roma_100h.ckpt",
)
GIM_DKM = WeightFile(
    "gim_dkm_100h.ckpt", "https://drive.google.com/uc?export=download&id=1gk97V4IROnR1Nprq10W9NCFUv2mxXR_-",
    sha256="bbe056bcf1b401e8dbc0ea983e69ed168eb0a330dcee35f3d9cf53048bf69ab8", size=843_735_230,
    note="GIM README link (Google Drive); checksum from the repo's former Git-LFS pointer",
)


def unpack_lightning(checkpoint: Any, prefix: str = "model.", drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """GIM's Lightning checkpoint → the model's state dict: 'state_dict', first `prefix` stripped, `drop`ped keys
    removed. A plain state dict is accepted too (e.g. a converted or safetensors copy)."""
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"a GIM checkpoint is a dict, got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    out = {}
    for key, value in state.items():
        key = key[len(prefix):] if key.startswith(prefix) else key
        if drop and key.startswith(drop):
            continue
        out[key] = value
    return out


class GIMRoMa(RoMa):
    """GIM's RoMa weights in romatch's unmodified RoMa; raw [0, 1] RGB input."""

    default_conf = {
        "variant": "gim",
        "coarse_res": 672,
        "upsample_res": 1344,
        "normalize": False,
        "num_matches": 5000,
    }
    variants: ClassVar[dict[str, WeightFile]] = {"gim": GIM_ROMA}
    weight_files = {"gim": (GIM_ROMA, DINOV2_VITL14)}

    def unpack_checkpoint(self, checkpoint: Any) -> Mapping[str, torch.Tensor]:
        return unpack_lightning(checkpoint)


# ---------------------------------------------------------------------------------------------------------------
# DKMv3


class RRB(nn.Module):
    """DKM's residual refinement block."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size, padding=padding)
        self.bn = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, kernel_size, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return F.relu(x + self.conv3(F.relu(self.bn(self.conv2(x)))))


class CAB(nn.Module):
    """DKM's channel attention block: gates the new features by pooled (old, new) statistics."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 1)

    def forward(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([old, new], dim=1).mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(pooled))))
        return old + gate * new


class DFN(nn.Module):
    """DKM's coordinate decoder at strides 32 and 16: GP embedding + features → (flow, certainty, context)."""

    def __init__(self, scales=("32", "16"), feat_dim: int = 256, gp_dim: int = 256, internal_dim: int = 384):
        super().__init__()
        self.internal_dim = internal_dim
        self.feat_input_modules = nn.ModuleDict({s: nn.Conv2d(512, feat_dim, 1) for s in scales})
        self.rrb_d = nn.ModuleDict({s: RRB(gp_dim + feat_dim, internal_dim) for s in scales})
        self.cab = nn.ModuleDict({s: CAB(2 * internal_dim, internal_dim) for s in scales})
        self.rrb_u = nn.ModuleDict({s: RRB(internal_dim, internal_dim) for s in scales})
        self.terminal_module = nn.ModuleDict({s: nn.Conv2d(internal_dim, 3, 1) for s in scales})
        self.coarse_scales = tuple(int(s) for s in scales)

    def forward(self, embedding, features, context, scale: str):
        features = self.feat_input_modules[scale](features)
        embedding = self.rrb_d[scale](torch.cat([features, embedding], dim=1))
        context = self.rrb_u[scale](self.cab[scale](context, embedding))
        prediction = self.terminal_module[scale](context)
        return prediction[:, -2:], prediction[:, :-2], context


def _dkm_conv_refiner_class():
    from romatch.models.matcher import ConvRefiner
    from romatch.utils.local_correlation import local_correlation

    class DKMConvRefiner(ConvRefiner):
        """romatch's ConvRefiner layers with DKM's forward: unscaled displacement embedding, (certainty, dx, dy)."""

        def forward(self, x, y, flow, **_):
            batch, _, height, width = x.shape
            warped = F.grid_sample(y, flow.permute(0, 2, 3, 1), align_corners=False)
            grid = identity_grid(height, width, x.device).permute(2, 0, 1)[None].expand(batch, 2, height, width)
            parts = [x, warped, self.disp_emb(flow - grid)]
            if self.local_corr_radius:
                parts.append(local_correlation(x, y, self.local_corr_radius, flow, use_custom_corr=False))
            out = self.out_conv(self.hidden_blocks(self.block1(torch.cat(parts, dim=1))))
            return out[:, :-2], out[:, -2:]

    return DKMConvRefiner


class ResNet50Encoder(nn.Module):
    """torchvision's ResNet-50 under DKM's name `net`, returning features at strides 1-32 (no classifier)."""

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet50

        self.net = resnet50(weights=None)
        del self.net.fc

    def forward(self, x: torch.Tensor, coarse: bool = True) -> dict[int, torch.Tensor]:
        net = self.net
        features = {1: x}
        x = net.relu(net.bn1(net.conv1(x)))
        features[2] = x
        x = net.layer1(net.maxpool(x))
        features[4] = x
        x = net.layer2(x)
        features[8] = x
        if coarse:  # the refining pass only uses strides 8 and finer
            x = net.layer3(x)
            features[16] = x
            features[32] = net.layer4(x)
        return features


class DKMDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        from romatch.models.matcher import GP, CosKernel

        refiner = _dkm_conv_refiner_class()
        self.embedding_decoder = DFN()
        self.gps = nn.ModuleDict({s: GP(CosKernel, T=0.2, gp_dim=256, basis="fourier", no_cov=True)
                                  for s in ("32", "16")})
        self.proj = nn.ModuleDict({"16": nn.Conv2d(1024, 512, 1), "32": nn.Conv2d(2048, 512, 1)})
        common = {"kernel_size": 5, "dw": True, "hidden_blocks": 8, "displacement_emb": "linear"}
        self.conv_refiner = nn.ModuleDict({
            "16": refiner(2 * 512 + 128 + 15**2, 2 * 512 + 128 + 15**2, 3, displacement_emb_dim=128,
                          local_corr_radius=7, corr_in_other=True, **common),
            "8": refiner(2 * 512 + 64 + 7**2, 2 * 512 + 64 + 7**2, 3, displacement_emb_dim=64,
                         local_corr_radius=3, corr_in_other=True, **common),
            "4": refiner(2 * 256 + 32 + 5**2, 2 * 256 + 32 + 5**2, 3, displacement_emb_dim=32,
                         local_corr_radius=2, corr_in_other=True, **common),
            "2": refiner(2 * 64 + 16, 128 + 16, 3, displacement_emb_dim=16, **common),
            "1": refiner(2 * 3 + 6, 24, 3, displacement_emb_dim=6, **common),
        })

    def forward(self, f0: dict, f1: dict, flow=None, certainty=None) -> dict[int, dict[str, torch.Tensor]]:
        scales = ["32", "16", "8", "4", "2", "1"] if flow is None else ["8", "4", "2", "1"]
        sizes = {scale: f0[scale].shape[-2:] for scale in f0}
        height, width = sizes[1]
        coarsest = int(scales[0])
        context = torch.zeros(f0[1].shape[0], self.embedding_decoder.internal_dim, *sizes[coarsest],
                              device=f0[1].device)
        if flow is None:
            flow = identity_grid(*sizes[coarsest], f0[1].device).permute(2, 0, 1)[None].expand(
                f0[1].shape[0], 2, *sizes[coarsest])
            certainty = 0.0
        else:
            flow = F.interpolate(flow, size=sizes[coarsest], mode="bilinear", align_corners=False)
            certainty = F.interpolate(certainty, size=sizes[coarsest], mode="bilinear", align_corners=False)
        out = {}
        for scale in scales:
            stride = int(scale)
            x, y = f0[stride], f1[stride]
            if scale in self.proj:
                x, y = self.proj[scale](x), self.proj[scale](y)
            if stride in self.embedding_decoder.coarse_scales:
                context = F.interpolate(context, size=sizes[stride], mode="bilinear", align_corners=False)
                flow, certainty, context = self.embedding_decoder(self.gps[scale](x, y), x, context, scale)
            if scale in self.conv_refiner:
                delta_certainty, displacement = self.conv_refiner[scale](x, y, flow)
                flow = torch.stack((flow[:, 0] + stride * displacement[:, 0] / (4 * width),
                                    flow[:, 1] + stride * displacement[:, 1] / (4 * height)), dim=1)
                certainty = certainty + delta_certainty
            out[stride] = {"flow": flow, "certainty": certainty}
            if scale != "1":
                flow = F.interpolate(flow, size=sizes[stride // 2], mode="bilinear", align_corners=False)
                certainty = F.interpolate(certainty, size=sizes[stride // 2], mode="bilinear", align_corners=False)
        return out


class DKMv3(nn.Module):
    """DKMv3 (Edstedt et al., CVPR 2023): module tree `encoder.net.*`, `decoder.*` as published."""

    def __init__(self):
        super().__init__()
        self.encoder = ResNet50Encoder()
        self.decoder = DKMDecoder()

    def _pass(self, image0, image1, symmetric: bool, flow=None, certainty=None):
        features = self.encoder(torch.cat([image0, image1]), coarse=flow is None)
        first = {s: f.chunk(2)[0] for s, f in features.items()}
        second = {s: f.chunk(2)[1] for s, f in features.items()}
        return self._decode_pass(first, second, symmetric, flow, certainty)

    def _decode_pass(self, first, second, symmetric: bool, flow=None, certainty=None):
        if symmetric:  # both directions in one batch: (0→1, 1→0)
            first, second = ({s: torch.cat([first[s], second[s]]) for s in first},
                             {s: torch.cat([second[s], first[s]]) for s in first})
        return self.decoder(first, second, flow, certainty)

    def match(self, image0, image1, coarse_res, upsample_res, symmetric: bool):
        """Images (1, 3, H, W) in the model's input range → flow (B, H, W, 2) and certainty (B, H, W) at the
        output resolution; B = 2 (both directions) when symmetric. Both images go through the encoder as one
        batch, as published (`encode` + `decode` is the same network one image at a time)."""
        out = self._pass(_resize(image0, coarse_res), _resize(image1, coarse_res), symmetric)
        if upsample_res is None:
            return self._output(out, out, coarse_res)
        fine = self._pass(_resize(image0, upsample_res), _resize(image1, upsample_res), symmetric,
                          out[1]["flow"], out[1]["certainty"])
        return self._output(out, fine, upsample_res)

    def encode(self, image, coarse_res, upsample_res) -> dict[str, torch.Tensor]:
        """The encoder's pyramids of one image: {"coarse.<stride>": ...} at coarse_res (strides 1-32) and, with
        upsample_res, {"fine.<stride>": ...} (strides 1-8, all the refining pass uses)."""
        features = {f"coarse.{s}": f for s, f in self.encoder(_resize(image, coarse_res), coarse=True).items()}
        if upsample_res is not None:
            fine = self.encoder(_resize(image, upsample_res), coarse=False)
            features.update({f"fine.{s}": f for s, f in fine.items()})
        return features

    def decode(self, features0: dict, features1: dict, symmetric: bool):
        """`match` from two `encode` results."""
        level = lambda features, name: {int(k[len(name) + 1:]): v for k, v in features.items()  # noqa: E731
                                        if k.startswith(name + ".")}
        out = self._decode_pass(level(features0, "coarse"), level(features1, "coarse"), symmetric)
        if "fine.1" not in features0:
            return self._output(out, out, tuple(features0["coarse.1"].shape[-2:]))
        fine = self._decode_pass(level(features0, "fine"), level(features1, "fine"), symmetric,
                                 out[1]["flow"], out[1]["certainty"])
        return self._output(out, fine, tuple(features0["fine.1"].shape[-2:]))

    @staticmethod
    def _output(coarse: dict, final: dict, size):
        attenuation = F.interpolate(coarse[16]["certainty"], size=size, mode="bilinear", align_corners=False)
        attenuation = 0.5 * attenuation * (attenuation < 0)
        flow = final[1]["flow"].permute(0, 2, 3, 1)
        certainty = (final[1]["certainty"] - attenuation).sigmoid()[:, 0]
        certainty = certainty * ((flow.abs() <= 1).all(dim=-1))  # a warp leaving the image is not a match
        return flow.clamp(-1, 1), certainty


def _resize(image: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


class GIMDKM(EncodedWarpMatcher, StateDictBackend):
    """GIM's DKMv3 checkpoint in DKMv3 (built here from romatch and torchvision parts); raw [0, 1] RGB input."""

    default_conf = {
        "weights": None,
        "coarse_res": [672, 896],  # [h, w] as GIM's demo (multiples of 32 keep every stride aligned)
        "upsample_res": [1152, 1536],
        "upsample": True,
        "symmetric": True,
        "normalize": False,
        "num_matches": 5000,
    }
    weight_files = {"gim": (GIM_DKM,)}

    @classmethod
    def checkpoint_files(cls, conf: Conf) -> dict[str, tuple[WeightFile, str | None]]:
        return {"weights": (GIM_DKM, conf.weights)}

    def _init(self, conf: Conf) -> None:
        self.coarse_res = resolution(conf.coarse_res, "coarse_res", multiple=32)
        self.upsample_res = resolution(conf.upsample_res, "upsample_res", multiple=8) if conf.upsample else None
        model = DKMv3()
        state_dict = unpack_lightning(self.load_checkpoints(conf)["weights"], drop=("encoder.net.fc.",))
        load_state_dict_strict(model, state_dict, "GIM DKM weights")
        self.model = model.eval().to(self.device)
        from .roma import IMAGENET_MEAN, IMAGENET_STD

        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def _encoder_features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.conf.normalize:
            image = (image - self._mean) / self._std
        return self.model.encode(image, self.coarse_res, self.upsample_res)

    def _decode(self, features0: dict[str, torch.Tensor], features1: dict[str, torch.Tensor]) -> Warp:
        flow, certainty = self.model.decode(features0, features1, self.conf.symmetric)
        flow, certainty = flow.float(), certainty.float()
        if not self.conf.symmetric:
            return Warp(flow[0], certainty[0], (0, 0), (0, 0))
        return Warp(flow[0], certainty[0], (0, 0), (0, 0), backward=flow[1], backward_certainty=certainty[1])
