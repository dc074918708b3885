"""LightGlue (Lindenberger et al. 2023) through kornia's `kornia.feature.LightGlue`, loaded strictly.

The network is kornia's, built with `features=None` (no download) and the configuration kornia keeps for each
feature type. The official loaders (cvg/LightGlue and kornia) load the checkpoint with `strict=False`, so a
wrong or truncated file silently leaves layers random; here the legacy key names are renamed as those loaders do
(`self_attn.<i>` / `cross_attn.<i>` → `transformers.<i>.*`, a leading `matcher.` stripped), and any missing or
unexpected key is an error, except the `confidence_thresholds` buffer that LightGlue derives from its config.

Feature types with official weights: superpoint, sift, disk, aliked (cvg/LightGlue v0.1_arxiv) and dedodeb, dedodeg
(trained by kornia's maintainers, hosted at cmp.felk.cvut.cz; kornia's URL table). The weights depend on the
features, so the `features` key is required; `features_from_record` maps the record a recon features file keeps
(backend name and conf) to it. SIFT's LightGlue also reads each keypoint's scale and orientation: the SIFT backend
stores them as the `scales` (OpenCV keypoint size, pixels of the extraction resolution, as cvg's SIFT extractor
passes them) and `oris` (radians) datasets. No official SHA-256 is published for these files.

CPU cross-attention: kornia's CrossBlock (like cvg's) computes the (heads, N0, N1) similarity, both softmaxes and
a contiguous transposed copy explicitly off CUDA, i.e. four N0 x N1 x 4 float matrices per layer (1.6 GB at 5000
keypoints). `_SDPACrossBlock` computes the same two attentions, softmax(q0 q1^T / sqrt(d)) v1 and
softmax(q1 q0^T / sqrt(d)) v0, with torch's fused scaled_dot_product_attention, which never materialises them.
The arithmetic differs only in rounding (kornia's own self-attention already uses that kernel).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from kornia.feature import LightGlue as KorniaLightGlue
from kornia.feature.lightglue import CrossBlock

from .base import SparseMatcher, descriptor_family
from .errors import ConfigError, WeightsError
from .weights import WeightFile, load_checkpoint, load_state_dict_strict

_CVG = "https://github.com/cvg/LightGlue/releases/download/v0.1_arxiv"
_CMP = "https://cmp.felk.cvut.cz/~mishkdmy/models"
LIGHTGLUE_WEIGHTS = {
    "superpoint": WeightFile("superpoint_lightglue.pth", f"{_CVG}/superpoint_lightglue.pth"),
    "sift": WeightFile("sift_lightglue.pth", f"{_CVG}/sift_lightglue.pth"),
    "disk": WeightFile("disk_lightglue.pth", f"{_CVG}/disk_lightglue.pth"),
    "aliked": WeightFile("aliked_lightglue.pth", f"{_CVG}/aliked_lightglue.pth"),
    "dedodeb": WeightFile("dedodeb_lightglue.pth", f"{_CMP}/dedodeb_lightglue.pth"),
    "dedodeg": WeightFile("dedodeg_lightglue.pth", f"{_CMP}/dedodeg_lightglue.pth"),
}
#: Buffers LightGlue computes from its configuration; checkpoints may or may not carry them.
DERIVED_BUFFERS = frozenset({"confidence_thresholds"})


class _SDPACrossBlock(CrossBlock):
    """kornia's CrossBlock with the CPU attention through the fused kernel (see the module docstring)."""

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, mask: torch.Tensor | None = None):
        if mask is not None or x0.device.type == "cuda":  # CUDA already uses the fused kernel; masks stay kornia's
            return super().forward(x0, x1, mask)
        qk0, qk1 = self.map_(self.to_qk, x0, x1)
        v0, v1 = self.map_(self.to_v, x0, x1)
        qk0, qk1, v0, v1 = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2).contiguous()
                            for t in (qk0, qk1, v0, v1))
        m0 = F.scaled_dot_product_attention(qk0, qk1, v1)
        m1 = F.scaled_dot_product_attention(qk1, qk0, v0)
        m0, m1 = self.map_(lambda t: t.transpose(1, 2).flatten(start_dim=-2), m0, m1)
        m0, m1 = self.map_(self.to_out, m0, m1)
        return x0 + self.ffn(torch.cat([x0, m0], -1)), x1 + self.ffn(torch.cat([x1, m1], -1))


def features_from_record(record: Mapping[str, Any] | None) -> str | None:
    """The LightGlue feature type for the {"backend", "conf"} record of a recon features file, if it has one."""
    if not record:
        return None
    family = descriptor_family(record)
    if family == "dedode":
        return "dedodeg" if str((record.get("conf") or {}).get("descriptor", "B")).startswith("G") else "dedodeb"
    return family if family in LIGHTGLUE_WEIGHTS else None


def rename_legacy_keys(state_dict: Mapping[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state_dict.items():
        key = key.removeprefix("matcher.")
        for i in range(n_layers):
            key = key.replace(f"self_attn.{i}.", f"transformers.{i}.self_attn.")
            key = key.replace(f"cross_attn.{i}.", f"transformers.{i}.cross_attn.")
        renamed[key] = value
    return renamed


class LightGlue(SparseMatcher):
    default_conf = {
        "features": None,  # superpoint | sift | disk | aliked | dedodeb | dedodeg
        "weights": None,  # explicit checkpoint path
        "filter_threshold": 0.1,
        "depth_confidence": 0.95,  # early stopping; -1 disables
        "width_confidence": 0.99,  # point pruning; -1 disables
        "flash": True,
    }

    @classmethod
    def conf_for_features(cls, record):
        features = features_from_record(record)
        return {"features": features} if features else {}

    weight_files: ClassVar[dict[str, Any]] = {name: (file,) for name, file in LIGHTGLUE_WEIGHTS.items()}
    variant_key = "features"
    #: Checkpoint per feature type; a subclass with other weights for the same architecture (MINIMA's, XFeat's
    #: LighterGlue) replaces it.
    weight_table: ClassVar[dict[str, WeightFile]] = LIGHTGLUE_WEIGHTS

    def _init(self, conf) -> None:
        if conf.features not in self.weight_table:
            raise ConfigError(
                f"LightGlue needs the feature type its weights were trained for: set features to one of "
                f"{', '.join(self.weight_table)} (e.g. --matcher-conf features=disk); got {conf.features!r}"
            )
        self.features = conf.features
        # kornia's preset minus what recon's conf sets (its xfeat preset carries thresholds of its own)
        passed = ("weights", "filter_threshold", "depth_confidence", "width_confidence")
        preset = {k: v for k, v in KorniaLightGlue.features[conf.features].items() if k not in passed}
        self.model = KorniaLightGlue(
            features=None, **preset, filter_threshold=conf.filter_threshold, depth_confidence=conf.depth_confidence,
            width_confidence=conf.width_confidence, flash=conf.flash,
            mp=self.device.type == "cuda" and conf.mixed_precision,
        )
        weight = self.weight_table[conf.features]
        state_dict = load_checkpoint(weight, conf.weights)
        if not isinstance(state_dict, Mapping):
            raise WeightsError(f"'{weight.filename}' is not a state dict (got {type(state_dict).__name__})")
        load_state_dict_strict(self.model, rename_legacy_keys(state_dict, self.model.conf.n_layers), weight.filename,
                               derived=DERIVED_BUFFERS)
        self.model.eval().to(self.device)
        for block in self.model.modules():
            if type(block) is CrossBlock:
                block.__class__ = _SDPACrossBlock
        if conf.features == "sift":
            self.required_inputs = ("keypoints", "descriptors", "scales", "oris")

    def _image(self, data: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
        descriptors = data["descriptors" + suffix].mT.float()
        if self.features.startswith("dedode") and descriptors.shape[1] > 1:
            norms = descriptors.norm(dim=-1)
            if torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
                raise ConfigError(
                    "LightGlue's DeDoDe weights take the raw DeDoDe descriptors, but these are L2-normalised: "
                    "extract with --conf normalize_descriptors=false"
                )
        image = {"keypoints": data["keypoints" + suffix].float(), "descriptors": descriptors,
                 "image_size": data["image_size" + suffix].float()}
        if self.model.conf.add_scale_ori:
            image["scales"] = data["scales" + suffix].float()
            image["oris"] = data["oris" + suffix].float()
        return image

    def _match(self, data):
        pred = self.model({"image0": self._image(data, "0"), "image1": self._image(data, "1")})
        return {"matches0": pred["matches0"], "matching_scores0": pred["matching_scores0"]}
