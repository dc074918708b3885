"""RoMa v2 ("RoMa v2: Harder Better Faster Denser Feature Matching"), through the official `romav2` package, offline.

`romav2.RoMaV2(cfg)` cannot be constructed without the network: its constructor downloads
`https://github.com/Parskatt/RoMaV2/releases/download/v2.0.1/romav2.0.1.pt` (romav2 2.0.1, `romav2/romav2.py`) and
its descriptor fetches Meta's DINOv3 code with `torch.hub.load("facebookresearch/dinov3:adc2544…",
"dinov3_vitl16", pretrained=False)` (`romav2/features.py`). The DINOv3 *weights* are not fetched: they are inside
romav2.0.1.pt under `f.*` (the constructor loads that file strictly into a model whose `f` is the DINOv3 ViT-L/16).
So here:

- The checkpoint goes through feature_backends.weights (explicit path → $RECON_WEIGHTS_DIR → torch hub cache →
  official URL); no SHA-256 is published for it, so it is unpinned.
- DINOv3 ViT-L/16 is timm's `vit_large_patch16_dinov3_qkvb` (timm's Eva with DINOv3's rotary embedding, 4
  register tokens, LayerScale, LayerNorm eps 1e-5: Meta's `dinov3_vitl16` hub configuration), filled from the
  checkpoint's `f.*` keys by `dinov3_to_timm` below. Meta's attention has one qkv bias whose key third is masked
  to zero by a stored `bias_mask` (`mask_k_bias=True`); timm keeps q and v biases and a fixed zero k bias, so the
  map applies the mask and refuses a checkpoint whose masked key bias is not zero. Meta's `rope_embed.periods`
  buffer must equal the periods timm derives (base 100), and `mask_token` is unused at inference (it enters only
  as `cls + 0 * mask_token`); both are checked, not dropped silently. Only blocks up to the last one read
  (layers 11 and 17 of 24, romav2's `Descriptor.Cfg.layer_idx`) run; Meta's code runs all 24.
- Everything else is romav2's own code: its `Matcher`, `Refiners` and `FineFeatures` modules are built from its
  default `RoMaV2.Cfg` and the forward pass is `RoMaV2.forward`, run on an instance assembled without the
  downloading constructor; settings come from `RoMaV2.apply_setting` (turbo 320², fast 512², base 640²,
  precise 800² + 1280² refinement and bidirectional = the official default, mega1500/scannet1500/wxbs/satast
  800² + 1024² with overlap threshold 0.05).
- Inputs are resized as `RoMaV2.match` does (bicubic, antialiased, no clamping) from the image already decoded by
  feature_backends.images; the overlap is romav2's `sigmoid(confidence[..., 0])` (set to 1 above the setting's
  threshold, if any); the precision matrices are not used.
- Sampling is feature_backends.dense_warp's seeded KDE-balanced sampler (as for RoMa), on the raw overlap by
  default (`sample_thresh` 1.0): romav2's `sample` thresholds nothing unless the setting does. romav2 also drops
  samples within one coarse cell of the image border; this sampler does not.

Each pair runs the whole network, both images included, as `RoMaV2.match` does: unlike the RoMa backend there is
no per-image encoding cache yet (DINOv3 and the VGG pyramid of an image are recomputed in each of its pairs).

Precision: romav2's DPT head and refiners autocast to bfloat16 on its device, CPU included; that is kept (it is
the released code). The DINOv3 and matcher transformers take `enable_amp` from a configuration, so they run in
bfloat16 on CUDA with `mixed_precision` and in float32 on CPU. romav2 picks its device once at import
(`romav2.device.device`: CUDA > MPS > CPU) and creates tensors there, so the backend must run on that device.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Conf, StateDictBackend
from .dense_warp import Warp, WarpMatcher
from .errors import ConfigError, WeightsError
from .roma import resolution
from .weights import WeightFile, load_state_dict_strict

ROMAV2_WEIGHTS = WeightFile(
    "romav2.0.1.pt", "https://github.com/Parskatt/RoMaV2/releases/download/v2.0.1/romav2.0.1.pt",
    note="RoMa v2 2.0.1 (romav2 package); its DINOv3 ViT-L/16 backbone is inside (keys f.*)",
)
TIMM_DINOV3 = "vit_large_patch16_dinov3_qkvb"
DINOV3_PATCH = 16
DINOV3_LAYERS = (11, 17)  # romav2 Descriptor.Cfg.layer_idx
_RENAMES = (("storage_tokens", "reg_token"), (".ls1.gamma", ".gamma_1"), (".ls2.gamma", ".gamma_2"))


def dinov3_to_timm(state_dict: Mapping[str, torch.Tensor], vit: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Meta's DINOv3 key layout (`DinoVisionTransformer`) → timm's Eva, checking what has no timm counterpart."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "rope_embed.periods":
            expected = vit.rope.periods.float()
            if value.shape != expected.shape or not torch.allclose(value.float(), expected, rtol=1e-4):
                raise WeightsError(f"'{source}': rope_embed.periods differ from DINOv3's base-100 periods")
            continue
        if key == "mask_token":
            if not torch.isfinite(value).all():
                raise WeightsError(f"'{source}': mask_token is not finite (it enters the class token as 0 * value)")
            continue
        if key.endswith("attn.qkv.bias_mask"):
            continue  # applied with its bias below
        if key.endswith("attn.qkv.bias"):
            mask = state_dict.get(key + "_mask")
            bias = value * mask.to(value.dtype) if mask is not None else value
            query, key_bias, val = bias.chunk(3)
            if key_bias.abs().max() > 0:
                raise WeightsError(f"'{source}': {key} has a non-zero key bias; timm's DINOv3 fixes it at zero")
            prefix = key[: -len("qkv.bias")]
            out[prefix + "q_bias"], out[prefix + "v_bias"] = query, val
            continue
        for old, new in _RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


class DINOv3Features(nn.Module):
    """romav2's descriptor `f`: ImageNet-normalise, DINOv3 ViT-L/16, LayerNorm-ed patch tokens of blocks 11 and 17
    as (B, H/16, W/16, 1024) each (what romav2's `wrap_model` makes of Meta's `get_intermediate_layers`)."""

    def __init__(self, amp: bool = False):
        super().__init__()
        import timm

        # Built on the meta device: random initialisation of 300M weights (~9 s on 2 CPU cores) would be
        # overwritten by the checkpoint anyway. The buffers that no checkpoint carries are computed afterwards.
        with torch.device("meta"):
            vit = timm.create_model(TIMM_DINOV3, pretrained=False, num_classes=0)
        derived = {name for name, _ in vit.named_buffers()} - set(vit.state_dict())
        expected = {"rope.periods"} | {f"blocks.{i}.attn.k_bias" for i in range(len(vit.blocks))}
        if derived != expected:
            raise RuntimeError(f"timm's {TIMM_DINOV3} has unexpected derived buffers {sorted(derived - expected)}")
        self.vit = vit.to_empty(device="cpu")
        with torch.no_grad():
            self.vit.rope.reset_parameters()  # DINOv3's periods, base 100
            for block in self.vit.blocks:
                block.attn.k_bias.zero_()  # DINOv3 masks its key bias to zero
        self.amp = amp

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        from romav2.normalizers import imagenet

        batch, _, height, width = image.shape
        with torch.autocast(image.device.type, torch.bfloat16, enabled=self.amp):
            tokens = self.vit.forward_intermediates(
                imagenet(image), indices=list(DINOV3_LAYERS), norm=True, stop_early=True, output_fmt="NLC",
                intermediates_only=True)
        return [t.reshape(batch, height // DINOV3_PATCH, width // DINOV3_PATCH, -1) for t in tokens]


def build_romav2(checkpoint: Any, amp: bool, device: torch.device, source: str = ROMAV2_WEIGHTS.filename):
    """romav2's `RoMaV2` with the checkpoint loaded strictly (DINOv3 through the key map), without its constructor,
    which downloads the checkpoint and Meta's DINOv3 code."""
    from romav2 import RoMaV2
    from romav2.features import FineFeatures
    from romav2.matcher import Matcher
    from romav2.refiner import Refiners

    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"'{source}' is not a state dict (got {type(checkpoint).__name__})")
    cfg = RoMaV2.Cfg()
    cfg = dataclasses.replace(cfg, matcher=dataclasses.replace(cfg.matcher, enable_amp=amp))
    model = RoMaV2.__new__(RoMaV2)
    nn.Module.__init__(model)
    model.cfg, model.name = cfg, cfg.name
    model.anchor_width, model.anchor_height = cfg.anchor_width, cfg.anchor_height
    model.f = DINOv3Features(amp=amp)
    model.matcher = Matcher(cfg.matcher)
    model.refiners = Refiners(cfg.refiners)
    model.refiner_features = FineFeatures(cfg.refiner_features)
    backbone = {k[2:]: v for k, v in checkpoint.items() if k.startswith("f.")}
    state = {k: v for k, v in checkpoint.items() if not k.startswith("f.")}
    state.update({f"f.vit.{k}": v for k, v in dinov3_to_timm(backbone, model.f.vit, source).items()})
    load_state_dict_strict(model, state, source)
    if amp:
        model.f.vit.to(torch.bfloat16)  # romav2 casts its frozen descriptor to bfloat16 when amp is on
    return model.eval().requires_grad_(False).to(device)


class RoMaV2(WarpMatcher, StateDictBackend):
    """RoMa v2 2.0.1 with its released checkpoint. Resolutions default to the `setting`'s; override them for speed."""

    default_conf = {
        "weights": None,  # explicit path to romav2.0.1.pt
        "setting": "precise",  # romav2's: turbo | fast | base | precise | mega1500 | scannet1500 | wxbs | satast
        "coarse_res": None,  # int or [h, w], multiples of 16; None: the setting's (precise: 800)
        "upsample": None,  # second, refining pass; None: the setting's (precise: on)
        "upsample_res": None,  # int or [h, w], multiples of 8; None: the setting's (precise: 1280)
        "symmetric": None,  # both directions; None: the setting's (precise: on)
        "sample_thresh": 1.0,  # no thresholding: romav2 samples by the raw overlap
    }
    weight_files = {"v2.0.1": (ROMAV2_WEIGHTS,)}

    @classmethod
    def checkpoint_files(cls, conf: Conf) -> dict[str, tuple[WeightFile, str | None]]:
        return {"weights": (ROMAV2_WEIGHTS, conf.weights)}

    def _init(self, conf: Conf) -> None:
        from romav2.device import device as romav2_device

        if torch.device(romav2_device).type != self.device.type:
            raise ConfigError(f"romav2 runs on the device it chose at import ({romav2_device}); "
                              f"run recon with --device {romav2_device.type}")
        amp = bool(conf.mixed_precision) and self.device.type == "cuda"
        self.model = build_romav2(self.load_checkpoints(conf)["weights"], amp, self.device)
        try:
            self.model.apply_setting(conf.setting)
        except TypeError as error:
            raise ConfigError(f"unknown romav2 setting '{conf.setting}' ({error})") from error
        model = self.model
        if conf.coarse_res is not None:
            model.H_lr, model.W_lr = resolution(conf.coarse_res, "coarse_res", multiple=DINOV3_PATCH)
        if conf.upsample is False:
            model.H_hr = model.W_hr = None
        elif conf.upsample_res is not None:
            model.H_hr, model.W_hr = resolution(conf.upsample_res, "upsample_res", multiple=8)
        elif conf.upsample and model.H_hr is None:
            raise ConfigError(f"setting '{conf.setting}' has no refining pass; give upsample_res with upsample=true")
        if conf.symmetric is not None:
            model.bidirectional = bool(conf.symmetric)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # romav2's modules choose their own precision (see the module docstring)

    def _overlap(self, confidence: torch.Tensor) -> torch.Tensor:
        """romav2's `_map_confidence` overlap: sigmoid of the first channel, 1 above the setting's threshold."""
        overlap = confidence[..., 0].float().sigmoid()
        if self.model.threshold is not None:
            overlap[overlap > self.model.threshold] = 1.0
        return overlap

    def _warp(self, image0: torch.Tensor, image1: torch.Tensor) -> Warp:
        model = self.model
        sizes = [(model.H_lr, model.W_lr)] + ([(model.H_hr, model.W_hr)] if model.H_hr is not None else [])
        # As RoMaV2.match: bicubic with antialiasing, no clamping.
        inputs = [[F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True)
                   for image in (image0, image1)] for size in sizes]
        high = inputs[1] if len(inputs) > 1 else (None, None)
        preds = model(inputs[0][0], inputs[0][1], img_A_hr=high[0], img_B_hr=high[1])
        warp = Warp(preds["warp_AB"][0].float(), self._overlap(preds["confidence_AB"][0]), (0, 0), (0, 0))
        if model.bidirectional:
            warp.backward = preds["warp_BA"][0].float()
            warp.backward_certainty = self._overlap(preds["confidence_BA"][0])
        return warp
